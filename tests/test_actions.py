"""Slot actions against the real simulator: transitions, events, errors → envelopes,
swap safety, joining concurrent loads."""

import os
import subprocess
import threading

import httpx
import pytest
from django.core.management import call_command
from django.utils import timezone

from providers.lemonade.errors import LemonadeConflict
from slots import runtime
from slots.actions import config, lifecycle
from slots.actions.errors import SlotError, error_code_for
from slots.models import Lease, Node, Slot, SlotEvent

pytestmark = pytest.mark.django_db


def slot(name="chat") -> Slot:
    return Slot.objects.select_related("node").get(name=name)


def health(sim) -> dict:
    return httpx.get(f"{sim.url}/v1/health").json()


def test_load_makes_the_slot_ready(node, sim):
    result = lifecycle.do_load_slot("chat", actor="cli")
    assert result.state == "ready" and result.loaded_model == "Qwen3-4B-Instruct-2507-GGUF"
    fresh = slot()
    assert fresh.state == "ready" and fresh.last_load_ms >= 100 and fresh.error_code == ""
    entry = health(sim)["all_models_loaded"][0]
    assert entry["model_name"] == "Qwen3-4B-Instruct-2507-GGUF"
    assert entry["recipe_options"]["llamacpp_backend"] == "rocm"
    assert entry["recipe_options"]["ctx_size"] == 16384
    event = SlotEvent.objects.get(slot_name="chat", action="load")
    assert event.ok and event.from_state == "offline" and event.to_state == "ready"
    assert event.duration_ms >= 100 and event.actor == "cli"


def test_cli_load_then_unload(node, sim, capsys):
    call_command("slots", "load", "chat")
    assert "chat: load ok — state ready" in capsys.readouterr().out
    assert [m["model_name"] for m in health(sim)["all_models_loaded"]] == [
        "Qwen3-4B-Instruct-2507-GGUF"]
    call_command("slots", "unload", "chat")
    assert health(sim)["all_models_loaded"] == []
    assert slot().state == "offline"


def test_cli_error_exit_code_and_envelope(dead_node, capsys):
    with pytest.raises(SystemExit) as exc:
        call_command("slots", "load", "chat")
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert '"code": "lemond.unavailable"' in err and '"slot": "chat"' in err


def test_unload_is_idempotent(node, sim):
    lifecycle.do_unload_slot("chat", actor="cli")  # lemond never had it: still success
    lifecycle.do_unload_slot("chat", actor="cli")
    assert slot().state == "offline"
    assert SlotEvent.objects.filter(slot_name="chat", action="unload", ok=True).count() == 2


def test_unknown_model_is_a_config_error(node, sim):
    Slot.objects.filter(name="chat").update(model_name="No-Such-Model")
    with pytest.raises(SlotError) as exc:
        lifecycle.do_load_slot("chat", actor="cli")
    assert exc.value.code == "slot.config_error"
    assert exc.value.envelope()["error"]["slot"] == "chat"
    assert "lemond does not know model 'No-Such-Model'" in exc.value.message
    assert slot().state == "error" and slot().error_code == "slot.config_error"


def test_failed_load_is_spawn_failed_and_recorded(node, sim):
    sim.fault("fail_next_load")
    with pytest.raises(SlotError) as exc:
        lifecycle.do_load_slot("chat", actor="cli")
    assert exc.value.code == "slot.spawn_failed" and exc.value.http_status == 502
    event = SlotEvent.objects.get(slot_name="chat", action="load")
    assert not event.ok and event.error_code == "slot.spawn_failed" and event.to_state == "error"
    # the next load works again
    assert lifecycle.do_load_slot("chat", actor="cli").state == "ready"


def test_unreachable_is_lemond_unavailable(dead_node):
    for action in (lifecycle.do_load_slot, lifecycle.do_unload_slot, lifecycle.do_restart_slot,
                   lifecycle.do_pin_slot, lifecycle.do_unpin_slot):
        with pytest.raises(SlotError) as exc:
            action("chat", actor="cli")
        assert exc.value.code == "lemond.unavailable", action
        assert exc.value.http_status == 503
    with pytest.raises(SlotError) as exc:
        lifecycle.do_swap_slot("chat", "Qwen3-0.6B-GGUF", actor="cli")
    assert exc.value.code == "lemond.unavailable"
    assert slot().model_name == "Qwen3-4B-Instruct-2507-GGUF"
    assert slot().pinned is False


def test_hanging_lemond_is_lemond_timeout(node, sim, settings):
    settings.HAL0_LEMONADE_LOAD_TIMEOUT = 0.5
    sim.fault("hang", seconds=3)
    with pytest.raises(SlotError) as exc:
        lifecycle.do_load_slot("chat", actor="cli")
    assert exc.value.code == "lemond.timeout" and exc.value.http_status == 504


@pytest.fixture
def sim11(lemond_sim_factory, db):
    """A lemond with pins (v11 shape), and the local node pointed at it."""
    sim = lemond_sim_factory(version_shape="11")
    node = Node.local()
    node.base_url, node.version = sim.url, "11.7.0-sim"
    node.save()
    return sim


def test_pinned_pool_is_refused_before_lemond_refuses_it(sim11):
    """lemond would answer 409 slots_pinned_error; the fit check says so first (#12)."""
    sim = sim11
    httpx.post(f"{sim.url}/v1/load", json={"model_name": "Qwen3-0.6B-GGUF", "pinned": True})
    with pytest.raises(SlotError) as exc:
        lifecycle.do_load_slot("chat", actor="cli")
    assert exc.value.code == "slot.wont_fit" and exc.value.http_status == 409
    assert "every loaded llm model is pinned in lemond" in exc.value.message
    assert "Qwen3-4B-Instruct-2507-GGUF" not in sim.state()["load_calls"]
    # should lemond still answer 409 (a pin set meanwhile), it is a lemond.conflict
    assert error_code_for(LemonadeConflict(409, "All loaded models of type standard/llm "
                                                "are pinned.")) == "lemond.conflict"


def test_pin_on_a_lemond_with_pins(sim11):
    sim = sim11
    lifecycle.do_load_slot("chat", actor="cli")
    lifecycle.do_pin_slot("chat", actor="cli")
    assert slot().pinned is True
    assert health(sim)["all_models_loaded"][0]["pinned"] is True
    lifecycle.do_unpin_slot("chat", actor="cli")
    assert health(sim)["all_models_loaded"][0]["pinned"] is False


def test_pin_on_lemond_without_pins_is_kept_by_hal0(node, sim):
    lifecycle.do_pin_slot("chat", actor="cli")
    assert slot().pinned is True
    event = SlotEvent.objects.get(slot_name="chat", action="pin")
    assert "hal0 protects the slot itself" in event.message


def test_restart(node, sim):
    lifecycle.do_load_slot("chat", actor="cli")
    lifecycle.do_restart_slot("chat", actor="cli")
    assert slot().state == "ready"
    assert sim.state()["load_calls"]["Qwen3-4B-Instruct-2507-GGUF"] == 2
    assert SlotEvent.objects.filter(slot_name="chat", action="restart", ok=True).exists()


def test_swap_success_changes_the_desired_model(node, sim, settings):
    lifecycle.do_load_slot("chat", actor="cli")
    lifecycle.do_swap_slot("chat", "Qwen3-0.6B-GGUF", actor="cli")
    fresh = slot()
    assert (fresh.model_name, fresh.loaded_model, fresh.state) == (
        "Qwen3-0.6B-GGUF", "Qwen3-0.6B-GGUF", "ready")
    assert [m["model_name"] for m in health(sim)["all_models_loaded"]] == ["Qwen3-0.6B-GGUF"]
    assert SlotEvent.objects.get(slot_name="chat", action="swap").message == \
        "swapped Qwen3-4B-Instruct-2507-GGUF → Qwen3-0.6B-GGUF"


def test_swap_to_unknown_model_keeps_the_old_one_serving(node, sim):
    lifecycle.do_load_slot("chat", actor="cli")
    with pytest.raises(SlotError) as exc:
        lifecycle.do_swap_slot("chat", "No-Such-Model", actor="cli")
    assert exc.value.code == "slot.config_error"
    fresh = slot()
    assert fresh.model_name == "Qwen3-4B-Instruct-2507-GGUF"
    assert fresh.loaded_model == "Qwen3-4B-Instruct-2507-GGUF" and fresh.state == "ready"
    assert "No-Such-Model" in fresh.state_message and fresh.error_code == "slot.config_error"


def test_swap_failure_after_evict_all_keeps_old_desired(node, sim):
    lifecycle.do_load_slot("chat", actor="cli")
    sim.fault("fail_next_load")  # lemond evicts everything, then fails
    with pytest.raises(SlotError) as exc:
        lifecycle.do_swap_slot("chat", "Qwen3-0.6B-GGUF", actor="cli")
    assert exc.value.code == "slot.spawn_failed"
    fresh = slot()
    assert fresh.model_name == "Qwen3-4B-Instruct-2507-GGUF"
    # the old model was reloaded (test_lemond_truth.test_a_failed_swap_reloads_the_old_model)
    assert fresh.state == "ready" and fresh.loaded_model == "Qwen3-4B-Instruct-2507-GGUF"


def test_swap_validates_the_model_name(node):
    with pytest.raises(SlotError) as exc:
        lifecycle.do_swap_slot("chat", "  ", actor="cli")
    assert exc.value.code == "slot.config_error" and "model_name" in exc.value.fields


def test_disabled_slot_refuses_load(node):
    Slot.objects.filter(name="chat").update(enabled=False)
    with pytest.raises(SlotError) as exc:
        lifecycle.do_load_slot("chat", actor="cli")
    assert exc.value.code == "slot.disabled" and exc.value.http_status == 409


def test_illegal_transition(node):
    Slot.objects.filter(name="chat").update(state="unloading")
    for action in (lifecycle.do_load_slot, lifecycle.do_unload_slot, lifecycle.do_restart_slot):
        with pytest.raises(SlotError) as exc:
            action("chat", actor="cli")
        assert exc.value.code == "slot.illegal_transition"
        assert "while it is unloading" in exc.value.message


def test_unknown_slot():
    with pytest.raises(SlotError) as exc:
        lifecycle.do_load_slot("nope", actor="cli")
    assert exc.value.envelope() == {"error": {"code": "slot.not_found",
                                              "message": "No slot named 'nope'.", "slot": "nope"}}


@pytest.mark.django_db(transaction=True)
def test_ten_concurrent_loads_reach_lemond_once(sim):
    node = Node.local()
    node.base_url = sim.url
    node.save()
    sim.configure(load_delay=0.5)
    results, errors = [], []

    def load():
        from django.db import connection
        try:
            results.append(lifecycle.do_load_slot("chat", actor="t").state)
        except SlotError as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=load) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and results == ["ready"] * 10
    assert sim.state()["load_requests"]["Qwen3-4B-Instruct-2507-GGUF"] == 1
    assert SlotEvent.objects.filter(slot_name="chat", action="load").count() == 1


def test_create_update_delete(node):
    created = config.do_create_slot({"name": "coder", "capability": "chat", "device": "cpu",
                                    "model_name": "Qwen3-0.6B-GGUF"}, actor="cli")
    assert created.node.name == "local" and not created.seeded
    with pytest.raises(SlotError) as exc:
        config.do_create_slot({"name": "coder", "capability": "chat", "device": "cpu",
                              "model_name": "m"}, actor="cli")
    assert exc.value.code == "slot.config_error" and "name" in exc.value.fields
    updated = config.do_update_slot("coder", {"ctx_size": 4096}, actor="cli")
    assert updated.ctx_size == 4096
    with pytest.raises(SlotError) as exc:
        config.do_update_slot("coder", {"extra_args": "--port 1"}, actor="cli")
    assert "extra_args may not contain --port" in exc.value.message
    assert Slot.objects.get(name="coder").extra_args == ""
    config.do_delete_slot("coder", actor="cli")
    assert not Slot.objects.filter(name="coder").exists()
    assert list(SlotEvent.objects.filter(slot_name="coder").values_list("action", flat=True)) == [
        "delete", "update", "create"]


def test_seeded_slots_cannot_be_deleted_or_renamed(node):
    with pytest.raises(SlotError, match="disable it instead"):
        config.do_delete_slot("chat", actor="cli")
    with pytest.raises(SlotError, match="cannot be renamed"):
        config.do_update_slot("chat", {"name": "talk"}, actor="cli")
    config.do_update_slot("chat", {"enabled": False}, actor="cli")
    assert slot().enabled is False


def test_a_load_left_behind_by_a_dead_process_is_taken_over(node, sim, settings):
    from datetime import timedelta

    from django.utils import timezone

    settings.HAL0_LEMONADE_LOAD_TIMEOUT = 60
    Slot.objects.filter(name="chat").update(
        state="loading", state_changed_at=timezone.now() - timedelta(minutes=5))
    assert lifecycle.do_load_slot("chat", actor="cli").state == "ready"
    assert sim.state()["load_calls"]["Qwen3-4B-Instruct-2507-GGUF"] == 1


def test_joining_a_load_gives_up_after_its_timeout(node, sim):
    Slot.objects.filter(name="chat").update(state="loading")  # someone else is loading
    with pytest.raises(SlotError) as exc:
        lifecycle.do_load_slot("chat", join_timeout=0.3, actor="cli")
    assert exc.value.code == "lemond.timeout"
    assert sim.state()["load_requests_total"] == 0


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_action_does_not_leave_the_slot_busy(node, sim, monkeypatch,
                                                             interruption):
    """Ctrl-C in `slots load`, or a bug: the slot leaves `loading` with an audit row."""
    import providers

    def interrupted(*args, **kwargs):
        raise interruption("stop")

    monkeypatch.setattr(providers.get(), "load", interrupted)
    with pytest.raises(interruption):
        lifecycle.do_load_slot("chat", actor="cli")
    fresh = slot()
    assert fresh.state == "error" and "interrupted" in fresh.state_message
    event = SlotEvent.objects.get(slot_name="chat", action="load")
    assert not event.ok and event.from_state == "offline"
    monkeypatch.undo()
    assert lifecycle.do_load_slot("chat", actor="cli").state == "ready"  # and it can be loaded again


def test_swap_keeps_a_model_another_slot_serves(node, sim, make_slot):
    sim.configure(max_loaded_models=-1)
    make_slot("twin", model_name="Qwen3-4B-Instruct-2507-GGUF")
    lifecycle.do_load_slot("twin", actor="cli")
    lifecycle.do_load_slot("chat", actor="cli")
    lifecycle.do_swap_slot("chat", "Qwen3-0.6B-GGUF", actor="cli")
    assert set(sim.state()["loaded_names"]) == {"Qwen3-4B-Instruct-2507-GGUF", "Qwen3-0.6B-GGUF"}


def test_serving_left_by_a_dead_gateway_process_is_settled(dead_node, make_slot):
    """A slot stays serving while any live process claims it; once the claim of a process
    that died has expired, the reconciler's housekeeping turns it back to ready."""
    from datetime import timedelta

    from django.utils import timezone

    from slots.models import Lease, State

    alive = make_slot("alive", node=dead_node)
    orphan = make_slot("orphan", node=dead_node)
    Slot.objects.filter(pk__in=[alive.pk, orphan.pk]).update(state=State.SERVING)
    soon, past = timezone.now() + timedelta(seconds=30), timezone.now() - timedelta(seconds=1)
    Lease.objects.create(name=f"serving:{alive.pk}:other", holder="box:1:aa", expires_at=soon)
    Lease.objects.create(name=f"serving:{orphan.pk}:dead", holder="box:2:bb", expires_at=past)
    assert runtime.current().serving.settle() == ["orphan"]
    assert Slot.objects.get(pk=orphan.pk).state == State.READY
    assert Slot.objects.get(pk=alive.pk).state == State.SERVING
    assert not Lease.objects.filter(name__startswith=f"serving:{orphan.pk}:").exists()
    # this process going idle does not turn a slot another process serves to ready
    assert runtime.current().serving.sync_state(alive) is None
    assert Slot.objects.get(pk=alive.pk).state == State.SERVING


def test_serving_claims_are_renewed_while_requests_run(dead_node, make_slot, monkeypatch,
                                                       settings):
    from slots.models import Lease

    settings.HAL0_SERVING_CLAIM_TTL_S = 60
    busy, idle = make_slot("busy", node=dead_node), make_slot("idle", node=dead_node)
    runtime.current().serving.in_flight.update({busy.pk: 2, idle.pk: 0})
    assert runtime.current().serving.renew_leases() == 1
    claims = Lease.objects.filter(name__startswith="serving:")
    assert [c.name.split(":")[1] for c in claims] == [str(busy.pk)]
    left = (claims[0].expires_at - timezone.now()).total_seconds()
    assert 55 < left <= 60


def test_renewal_puts_back_serving_a_racing_idle_edge_turned_ready(dead_node, make_slot,
                                                                    monkeypatch):
    """PostgreSQL can let another process's idle edge write ready just before our claim
    commits; the next renewal (every third of the TTL) heals it."""
    from slots.models import State

    slot = make_slot("raced", node=dead_node)
    Slot.objects.filter(pk=slot.pk).update(state=State.READY)
    runtime.current().serving.in_flight[slot.pk] = 1
    runtime.current().serving.renew_leases()
    assert Slot.objects.get(pk=slot.pk).state == State.SERVING


def test_idle_unload_skips_a_slot_another_process_serves(node, sim):
    """The reconciler's process sees no requests of its own; a live claim of another
    gateway process keeps the slot loaded."""
    from datetime import timedelta

    from slots.models import Lease, State

    slot = lifecycle.do_load_slot("chat", actor="cli")
    Slot.objects.filter(pk=slot.pk).update(idle_timeout_s=1)
    Lease.objects.create(name=f"serving:{slot.pk}:elsewhere", holder="box:9:cc",
                         expires_at=timezone.now() + timedelta(seconds=30))
    assert lifecycle.do_idle_unload_slot("chat") is None
    assert Slot.objects.get(pk=slot.pk).state == State.READY
    Lease.objects.all().delete()
    assert lifecycle.do_idle_unload_slot("chat").state == State.OFFLINE


@pytest.mark.django_db(transaction=True)
def test_loading_a_slot_loaded_with_the_same_options_is_a_no_op(node, sim):
    """50 concurrent loads of a ready slot made ~20 `/v1/load` calls and as many
    "loaded in 0.0 s" rows; now none, until the options change."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    lifecycle.do_load_slot("chat", actor="cli")
    calls, events = sim.state()["load_calls_total"], SlotEvent.objects.count()

    def load(_):
        try:
            return lifecycle.do_load_slot("chat", actor="cli").state
        finally:
            connection.close()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(load, range(50)))
    assert set(answers) == {"ready"}
    assert sim.state()["load_calls_total"] == calls
    assert SlotEvent.objects.count() == events
    # other options: a real load, with its row
    config.do_update_slot("chat", {"ctx_size": 8192}, actor="cli")
    lifecycle.do_load_slot("chat", actor="cli")
    assert sim.state()["load_calls_total"] == calls + 1
    assert SlotEvent.objects.filter(slot_name="chat", action="load").count() == 2
    # unloaded: loading again calls lemond again
    lifecycle.do_unload_slot("chat", actor="cli")
    lifecycle.do_load_slot("chat", actor="cli")
    assert sim.state()["load_calls_total"] == calls + 2


@pytest.mark.parametrize("seen_by_hal0", ["offline", "adopted"])
def test_a_load_lemond_already_holds_records_no_load_time(node, sim, seen_by_hal0):
    """lemond has the slot's model up with the very options hal0 would send, but hal0 did
    not load it (another tool did; or the reconciler adopted it, options unknown). The
    load is a no-op in lemond: no "loaded in 0.0 s" in "last load" or the chart."""
    import providers
    from slots.views import load_chart

    chat = slot()
    body = providers.get().load_body(chat)
    httpx.post(f"{sim.url}/v1/load", json=body, timeout=10).raise_for_status()
    before = health(sim)["all_models_loaded"][0]
    fields = {"last_load_ms": 41000}
    if seen_by_hal0 == "adopted":
        fields.update(state="ready", loaded_model=chat.model_name, loaded_options={})
    Slot.objects.filter(name="chat").update(**fields)

    result = lifecycle.do_load_slot("chat", actor="cli")

    assert result.state == "ready"
    after = health(sim)["all_models_loaded"][0]
    assert after["pid"] == before["pid"]  # lemond really did not reload it
    fresh = slot()
    assert fresh.state == "ready" and fresh.last_load_ms == 41000
    assert fresh.loaded_options == body  # known now: the next load is hal0's own no-op
    event = SlotEvent.objects.get(slot_name="chat", action="load")
    assert event.ok and event.duration_ms is None and "not reloaded" in event.message
    assert load_chart(fresh)["bars"] == []


def test_a_load_over_other_options_is_a_real_load_with_its_time(node, sim):
    """The same model up in lemond with another context size: lemond reloads it, and that
    load's time is recorded as usual."""
    import providers

    chat = slot()
    body = {**providers.get().load_body(chat), "ctx_size": 4096}
    httpx.post(f"{sim.url}/v1/load", json=body, timeout=10).raise_for_status()
    before = health(sim)["all_models_loaded"][0]

    lifecycle.do_load_slot("chat", actor="cli")

    assert health(sim)["all_models_loaded"][0]["pid"] != before["pid"]
    event = SlotEvent.objects.get(slot_name="chat", action="load")
    assert event.duration_ms is not None and event.duration_ms >= 100
    assert slot().last_load_ms == event.duration_ms


# --- a busy state whose process is gone (#14 Medium 4) ------------------------------------------

def events(name="chat") -> list[tuple[str, str, str, bool]]:
    return [(e.action, e.from_state, e.to_state, e.ok)
            for e in SlotEvent.objects.filter(slot_name=name).order_by("created_at", "id")]


def test_a_load_left_by_a_dead_process_is_settled_and_loaded_at_once(node, sim, busy_owner,
                                                                     dead_pid):
    """A SIGKILLed process's load: the next load does not join it (it used to wait the
    whole join timeout, then fail); it settles the slot from lemond (nothing loaded:
    offline, `interrupted`) and loads."""
    busy_owner("chat", dead_pid)
    assert lifecycle.do_load_slot("chat", actor="cli", join_timeout=5).state == "ready"
    assert events() == [("interrupted", "loading", "offline", True),
                        ("load", "offline", "ready", True)]
    message = SlotEvent.objects.get(action="interrupted").message
    assert f":{dead_pid}:" in message and "does not have" in message
    assert sim.state()["load_calls"]["Qwen3-4B-Instruct-2507-GGUF"] == 1
    assert not Lease.objects.filter(name__startswith="busy:").exists()  # released after


def test_an_unload_left_by_a_dead_process_is_no_longer_refused(node, sim, busy_owner,
                                                               dead_pid):
    """`unload` of a slot a dead process left `unloading` was 409 until the stale rule; now
    the slot is settled from lemond's truth (it still has the model: adopted) and unloaded."""
    httpx.post(f"{sim.url}/v1/load", json={"model_name": "Qwen3-4B-Instruct-2507-GGUF"},
               timeout=10).raise_for_status()
    busy_owner("chat", dead_pid, state="unloading")
    assert lifecycle.do_unload_slot("chat", actor="cli").state == "offline"
    assert events() == [("interrupted", "unloading", "ready", True),
                        ("unload", "ready", "offline", True)]
    assert health(sim)["all_models_loaded"] == []


@pytest.mark.parametrize("wait", ["load", "gateway"])
def test_a_joiner_stops_waiting_when_the_loads_process_dies(node, sim, busy_owner, wait):
    """Requests joining another process's load (a `load` click, a gateway request) used to
    wait for a load nobody runs any more once that process was killed. They notice its
    death, settle the slot and load it themselves."""
    owner = subprocess.Popen(["sleep", "60"])
    busy_owner("chat", owner.pid)

    def die():
        owner.kill()
        owner.wait()  # reaped: a zombie's pid still answers kill(pid, 0)

    threading.Timer(0.5, die).start()
    try:
        if wait == "load":
            chat = lifecycle.do_load_slot("chat", actor="cli", join_timeout=15)
        else:
            chat = lifecycle.do_ensure_loaded("chat", 15)
    finally:
        die()
    assert chat.state == "ready"
    assert [e[0] for e in events()] == ["interrupted", "load"]


def test_a_busy_slot_of_a_live_process_is_joined_not_taken(node, sim, busy_owner):
    busy_owner("chat", os.getpid())  # alive: its load is running
    with pytest.raises(SlotError) as exc:
        lifecycle.do_load_slot("chat", join_timeout=0.3, actor="cli")
    assert exc.value.code == "lemond.timeout"
    assert slot().state == "loading" and events() == []


def test_an_action_owns_its_busy_state_while_it_runs(node, sim):
    """The lease that says who runs a busy state is taken with the transition and given
    back once the outcome is recorded."""
    seen = []
    real_load = lifecycle.providers.get().load

    def load(chat, **kwargs):
        seen.append(list(Lease.objects.filter(name__startswith="busy:")
                         .values_list("name", "holder")))
        return real_load(chat, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lifecycle.providers.get(), "load", load)
        lifecycle.do_load_slot("chat", actor="cli")
    [[(name, holder)]] = seen
    assert name == f"busy:{slot().pk}" and f":{os.getpid()}:" in holder
    assert not Lease.objects.filter(name__startswith="busy:").exists()
