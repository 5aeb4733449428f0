"""Idle unload: which slots are idle, and the `idle-unload` action against the simulator."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.utils import timezone

from slots import idle, runtime, states
from slots.actions import lifecycle
from slots.models import Slot, SlotEvent, State
from slots.reconciler import Reconciler
from tests.harness import async_wait_for

EMBED_MODEL = "nomic-embed-text-v1-GGUF"
CHAT_MODEL = "Qwen3-4B-Instruct-2507-GGUF"


@pytest.fixture
def idle_embed(node, sim):
    """The seeded `embed` slot, loaded in the simulator, unused for ten minutes, 60 s timeout."""
    slot = lifecycle.do_load_slot("embed", actor="cli")
    past = timezone.now() - timedelta(minutes=10)
    Slot.objects.filter(pk=slot.pk).update(state_changed_at=past, last_use_at=past,
                                           idle_timeout_s=60)
    return Slot.objects.get(pk=slot.pk)


def test_an_idle_slot_is_unloaded_with_an_event(idle_embed, sim):
    assert EMBED_MODEL in sim.state()["loaded_names"]
    assert [s.name for s in idle.find_idle_slots()] == ["embed"]
    assert idle.unload_idle_slots() == ["embed"]
    idle_embed.refresh_from_db()
    assert idle_embed.state == State.OFFLINE and idle_embed.loaded_model == ""
    event = SlotEvent.objects.filter(slot=idle_embed).first()
    assert (event.action, event.actor, event.from_state, event.to_state, event.ok) == \
        ("idle-unload", "reconciler", "ready", "offline", True)
    assert EMBED_MODEL not in sim.state()["loaded_names"]
    assert idle.unload_idle_slots() == []  # nothing left to do


def test_idle_unload_leaves_a_model_another_slot_serves(idle_embed, sim, make_slot):
    """A second slot on embed's model, idle after one second: its idle unload must not
    take `embed` offline (it used to: the card said "unloaded outside hal0")."""
    twin = make_slot("twin", capability="embed", model_name=EMBED_MODEL, idle_timeout_s=1)
    past = timezone.now() - timedelta(minutes=10)
    Slot.objects.filter(pk=twin.pk).update(state=State.READY, loaded_model=EMBED_MODEL,
                                           state_changed_at=past, last_use_at=past)
    Slot.objects.filter(pk=idle_embed.pk).update(idle_timeout_s=0)  # embed itself never idles
    assert [s.name for s in idle.find_idle_slots()] == ["twin"]
    assert idle.unload_idle_slots() == []
    assert EMBED_MODEL in sim.state()["loaded_names"]
    assert Slot.objects.get(name="embed").state == State.READY
    assert Slot.objects.get(name="twin").state == State.READY  # lemond serves it anyway
    assert not SlotEvent.objects.filter(action="idle-unload").exists()
    # once embed is disabled, nobody else serves the model: the twin's idle unload goes on
    Slot.objects.filter(name="embed").update(enabled=False)
    assert idle.unload_idle_slots() == ["twin"]
    assert EMBED_MODEL not in sim.state()["loaded_names"]


def test_not_idle_before_its_timeout(idle_embed):
    Slot.objects.filter(pk=idle_embed.pk).update(
        last_use_at=timezone.now() - timedelta(seconds=30))
    assert idle.find_idle_slots() == []
    later = timezone.now() + timedelta(seconds=31)
    assert [s.name for s in idle.find_idle_slots(now=later)] == ["embed"]


@pytest.mark.parametrize("change", [{"pinned": True}, {"keep_loaded": True},
                                    {"idle_timeout_s": 0}])
def test_pinned_keep_loaded_and_never_idle_slots_stay(idle_embed, sim, change):
    Slot.objects.filter(pk=idle_embed.pk).update(**change)
    assert idle.find_idle_slots() == []
    assert idle.unload_idle_slots() == []
    assert lifecycle.do_idle_unload_slot("embed") is None  # the action re-checks, too
    assert EMBED_MODEL in sim.state()["loaded_names"]


def test_a_serving_slot_stays_and_counts_as_used(idle_embed, sim):
    runtime.current().serving.acquire(idle_embed)
    assert Slot.objects.get(pk=idle_embed.pk).state == State.SERVING
    assert idle.find_idle_slots() == []
    assert lifecycle.do_idle_unload_slot("embed") is None
    runtime.current().serving.acquire(idle_embed)  # a second, concurrent request
    runtime.current().serving.release(idle_embed)
    assert Slot.objects.get(pk=idle_embed.pk).state == State.SERVING  # one still in flight
    runtime.current().serving.release(idle_embed)
    assert Slot.objects.get(pk=idle_embed.pk).state == State.READY
    # it was just used: hal0's own request time keeps it loaded
    assert idle.find_idle_slots() == []
    later = timezone.now() + timedelta(seconds=61)
    assert [s.name for s in idle.find_idle_slots(now=later)] == ["embed"]
    assert EMBED_MODEL in sim.state()["loaded_names"]


def test_in_flight_requests_protect_a_slot_whose_state_says_ready(idle_embed):
    # e.g. the mirror write has not happened yet: the in-memory count is what counts
    runtime.current().serving.in_flight[idle_embed.pk] = 1
    assert idle.find_idle_slots() == []
    assert lifecycle.do_idle_unload_slot("embed") is None


def test_lemonds_last_use_counts_through_last_use_at(idle_embed):
    # lemond's last_use is steady-clock ms: the reconciler turns a rise between two polls
    # into last_use_at (test_lemond_truth); the raw value is never read as a date
    recent = int((time.time() - 5) * 1000)
    Slot.objects.filter(pk=idle_embed.pk).update(lemond_entry={"last_use": recent})
    assert [s.name for s in idle.find_idle_slots()] == ["embed"]
    Slot.objects.filter(pk=idle_embed.pk).update(last_use_at=timezone.now())
    assert idle.find_idle_slots() == []


def test_only_ready_slots_are_candidates(idle_embed):
    for state in (State.OFFLINE, State.LOADING, State.ERROR, State.UNLOADING):
        Slot.objects.filter(pk=idle_embed.pk).update(state=state)
        assert idle.find_idle_slots() == [], state


def test_a_failed_idle_unload_is_reported_not_raised(idle_embed, sim):
    from slots.models import Node

    Node.objects.filter(pk=idle_embed.node_id).update(base_url="http://127.0.0.1:9")
    assert idle.unload_idle_slots() == []
    event = SlotEvent.objects.filter(slot=idle_embed).first()
    assert event.action == "idle-unload" and not event.ok


@pytest.mark.django_db(transaction=True)
def test_the_reconcilers_loop_unloads_idle_slots(node, sim, settings):
    """Not `unload_idle_slots()` called by hand: the real loop (`run_forever`, lease and
    polls included) runs it once per HAL0_POLL_IDLE_S and honours the timeout."""
    settings.HAL0_POLL_IDLE_S = 0.5
    settings.HAL0_POLL_ACTIVE_S = 0.5
    settings.HAL0_RECONCILE_TIMEOUT_S = 1.0
    lifecycle.do_load_slot("chat", actor="cli")
    lifecycle.do_load_slot("embed", actor="cli")
    Slot.objects.filter(name="embed").update(idle_timeout_s=1)
    Slot.objects.filter(name="chat").update(idle_timeout_s=3600)
    loaded_at = Slot.objects.get(name="embed").state_changed_at

    async def run_until_unloaded(timeout: float) -> Slot:
        task = asyncio.ensure_future(Reconciler().run_forever())
        try:
            async def settled():
                embed = await Slot.objects.aget(name="embed")
                return embed if embed.state not in (State.READY, *states.BUSY) else None

            with contextlib.suppress(AssertionError):  # the caller says what it shows
                await async_wait_for(settled, timeout=timeout)
            return await Slot.objects.aget(name="embed")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await sync_to_async(runtime.current().wait_idle)(10)

    embed = async_to_sync(run_until_unloaded)(15)
    assert embed.state == State.OFFLINE and embed.loaded_model == "", embed.state_message
    event = SlotEvent.objects.filter(slot=embed).first()
    assert (event.action, event.actor, event.from_state, event.to_state, event.ok) == \
        ("idle-unload", "reconciler", "ready", "offline", True)
    # not before its 1 s timeout ran out (lemond's last_use, refreshed by the polls, is the
    # load time too)
    assert event.created_at - loaded_at >= timedelta(seconds=1)
    loaded = sim.state()["loaded_names"]
    assert EMBED_MODEL not in loaded and CHAT_MODEL in loaded
    chat = Slot.objects.get(name="chat")
    assert chat.state == State.READY
    assert not SlotEvent.objects.filter(slot=chat, action="idle-unload").exists()
