"""Memory and capacity against the real simulator: what lemond reports per version, the
node's gauges, each loaded model's estimate, and the fit check before loads, swaps and
downloads (refusals change nothing; `?dry_run=1` and `--dry-run` answer the plan)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command

from providers.lemonade import hardware
from slots import capacity, live
from slots.actions import fit, lifecycle, pulls
from slots.actions.errors import SlotError
from slots.models import Node, Slot, SlotEvent
from slots.reconciler import Reconciler

pytestmark = pytest.mark.django_db
SMALL = "Qwen3-0.6B-GGUF"
CHAT = "Qwen3-4B-Instruct-2507-GGUF"


def slot(name="chat") -> Slot:
    return Slot.objects.select_related("node").get(name=name)


def loaded(sim) -> list[str]:
    return [m["model_name"] for m in httpx.get(f"{sim.url}/v1/health").json()
            ["all_models_loaded"]]


def test_system_info_fields_follow_the_version(sim):
    """v10.6.0: MemTotal as "31.26 GB", each AMD GPU's VRAM and GTT totals, no
    `model_storage` (v10.9) and no `integrated` (v11.0); v11.7.0 has both."""
    old = httpx.get(f"{sim.url}/v1/system-info").json()
    assert old["Physical Memory"] == "31.26 GB" and "model_storage" not in old
    gpu = old["devices"]["amd_gpu"][0]
    assert gpu["vram_gb"] == 96.0 and gpu["virtual_mem_gb"] == 15.63 and "integrated" not in gpu
    sim.configure(version_shape="11")  # the shared simulator, until the next reset
    new = httpx.get(f"{sim.url}/v1/system-info").json()
    assert new["devices"]["amd_gpu"][0]["integrated"] is True
    storage = new["model_storage"]
    assert storage["total_bytes"] == storage["used_bytes"] + storage["free_bytes"]
    # hal0's reading: the APU's GPU budget is VRAM + GTT either way (an APU's CPU name
    # carries its Radeon before v11.0); the disk only where lemond reports it
    assert hardware.totals(old, "10.6.0") == {
        "ram_total_gb": 31.26, "gpu_total_gb": 111.63, "vram_total_gb": 96.0, "apu": True,
        "gtt_total_gb": 15.63}
    totals = hardware.totals(new, "11.7.0")
    assert totals["disk_total_gb"] == 2048.0 and 0 < totals["disk_free_gb"] < 2048
    assert hardware.totals({"Physical Memory": "lots", "devices": "x",
                            "model_storage": {"total_bytes": None}}, "11.7.0") == {}


def test_node_gauges_and_loaded_model_estimate(node, sim):
    """The reconciler keeps used and total per node; a loaded card shows what its model
    takes, labelled as an estimate, and the dashboard's query count does not grow."""
    lifecycle.do_load_slot("chat", actor="cli")
    async_to_sync(Reconciler(use_leases=False).poll_once)()
    stats = Node.objects.get(pk=node.pk).system_stats
    assert stats["ram_total_gb"] == 31.26 and stats["gpu_total_gb"] == 111.63
    assert stats["vram_gb"] > 2.5  # the 4B model's weights and KV cache sit on the GPU
    ram, gpu = capacity.gauges(stats)
    assert (ram.label, gpu.label) == ("RAM", "VRAM+GTT") and 0 < gpu.percent < 10
    chat = slot()
    share = capacity.slot_footprint(chat)
    assert share.estimate and share.ctx == 16384 and share.gb > share.weights_gb
    html = live.render_slot_card(chat)
    assert f"~{share.gb:.1f} GB" in html and "estimate" in html
    node_html = live.render_node(Node.objects.get(pk=node.pk))
    assert "31.3 GB" in node_html and "VRAM+GTT" in node_html and "<meter" in node_html


@pytest.fixture
def second_chat(make_slot, node):
    return make_slot("chat2", model_name=SMALL, node=node)


@pytest.mark.parametrize("flag", ["pinned", "keep_loaded"])
def test_fit_check_refuses_evicting_a_protected_slot(sim, second_chat, flag):
    """lemond 10.6 keeps one llm and knows no pins: loading chat2 would evict chat's model.
    hal0 refuses with the reason and changes nothing."""
    lifecycle.do_load_slot("chat", actor="cli")
    Slot.objects.filter(name="chat").update(**{flag: True})
    calls = sim.state()["load_calls"]
    with pytest.raises(SlotError) as exc:
        lifecycle.do_load_slot("chat2", actor="cli")
    why = "pinned" if flag == "pinned" else "keep-loaded"
    assert exc.value.code == "slot.wont_fit" and exc.value.http_status == 409
    assert f"evict {CHAT} ({why} slot 'chat')" in exc.value.message
    assert "max_loaded_models is 1" in exc.value.message
    assert loaded(sim) == [CHAT] and sim.state()["load_calls"] == calls
    assert slot("chat2").state == "offline"
    assert not SlotEvent.objects.filter(slot_name="chat2").exclude(action="create").exists()
    with pytest.raises(SlotError):  # a swap onto another model is checked the same way
        lifecycle.do_swap_slot("chat2", "Qwen3-1.7B-GGUF", actor="cli")


def test_plan_lists_lru_evictions_and_memory(sim, second_chat):
    lifecycle.do_load_slot("chat", actor="cli")
    plan = fit.plan("chat2")
    assert plan.ok and plan.verdict == "warning" and plan.budget == "GPU memory"
    assert plan.evicts == [{"model": CHAT, "slots": ["chat"], "own": False}]
    assert plan.needs.gb is not None and plan.freed_gb > 0
    assert plan.headline().startswith(f"needs ~{plan.needs.gb:.1f} GB")
    # the slot's own model is loaded: nothing more needed, nothing evicted
    own = fit.plan("chat")
    assert own.already_loaded and own.evicts == [] and own.verdict == "fits"
    # lemond down: nothing refused, and the plan says it could not check
    Node.objects.filter(name="local").update(base_url="http://127.0.0.1:9")
    down = fit.plan("chat2")
    assert down.ok and down.verdict == "unknown"


@pytest.mark.django_db(transaction=True)
def test_api_dry_run_answers_the_plan_and_does_nothing(admin_client, sim, second_chat):
    lifecycle.do_load_slot("chat", actor="cli")
    Slot.objects.filter(name="chat").update(pinned=True)
    calls = sim.state()["load_calls"]
    answer = admin_client.post("/api/slots/chat2/load?dry_run=1")
    assert answer.status_code == 200
    plan = answer.json()["plan"]
    assert plan["ok"] is False and plan["verdict"] == "refused"
    assert "pinned slot 'chat'" in plan["refusal"] and plan["evicts"][0]["slots"] == ["chat"]
    swap = admin_client.post("/api/slots/chat/swap?dry_run=1", {"model": SMALL})
    assert swap.status_code == 200 and swap.json()["plan"]["model"] == SMALL
    assert sim.state()["load_calls"] == calls and slot("chat2").state == "offline"
    refused = admin_client.post("/api/slots/chat2/load")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "slot.wont_fit"
    for bad, why in (("/api/slots/chat2/load?dry_run=maybe", "dry_run is 1"),
                     ("/api/slots/chat2/unload?dry_run=1", "unload has none")):
        response = admin_client.post(bad)
        assert response.status_code == 400 and why in response.json()["error"]["message"]
    assert loaded(sim) == [CHAT]


def test_cli_dry_run_prints_the_plan(sim, second_chat, capsys):
    lifecycle.do_load_slot("chat", actor="cli")
    call_command("slots", "load", "chat2", "--dry-run")
    out = capsys.readouterr().out
    assert "chat2: load Qwen3-0.6B-GGUF — warning (dry run: nothing done)" in out
    assert f"lemond's LRU would evict {CHAT} (slot chat)" in out and "needs ~" in out
    Slot.objects.filter(name="chat").update(keep_loaded=True)
    with pytest.raises(SystemExit) as exc:
        call_command("slots", "swap", "chat2", "Qwen3-1.7B-GGUF", "--dry-run", "--json")
    assert exc.value.code == 1
    assert json.loads(capsys.readouterr().out)["verdict"] == "refused"
    assert loaded(sim) == [CHAT]


@pytest.mark.django_db(transaction=True)
def test_download_that_does_not_fit_on_disk_is_refused(sim, node):
    """The reconciler keeps the model disk's free space; a larger download never starts."""
    Node.objects.filter(pk=node.pk).update(system_stats={"disk_free_gb": 1.0,
                                                         "disk_total_gb": 100.0})
    chat = slot()
    seen: list[tuple[str, dict]] = []

    async def progress(phase, data):
        seen.append((phase, data))

    async def run():
        pulls.do_start_pull(chat, "Qwen3-8B-GGUF", actor="cli", progress=progress)
        await asyncio.gather(*list(pulls.runtime.current().pulls.values()))

    asyncio.run(run())
    assert seen[-1][0] == "error" and "does not fit on lemond's model disk (1.0 GB free)" \
        in seen[-1][1]["message"]
    assert "Qwen3-8B-GGUF" not in sim.state().get("downloaded", [])
    event = SlotEvent.objects.get(slot_name="chat", action="pull")
    assert not event.ok and event.error_code == "pull.error"


@pytest.mark.django_db(transaction=True)
def test_download_and_swap_in_one_step(sim, node, hal0_runtime):
    chat = slot()

    async def progress(phase, data):
        pass

    async def run():
        pulls.do_start_pull(chat, "Qwen3-1.7B-GGUF", actor="cli", progress=progress,
                            then_serve=True)
        await asyncio.gather(*list(pulls.runtime.current().pulls.values()))

    asyncio.run(run())
    assert hal0_runtime.wait_idle(30)
    swapped = slot()
    assert (swapped.model_name, swapped.state) == ("Qwen3-1.7B-GGUF", "ready")
    assert loaded(sim) == ["Qwen3-1.7B-GGUF"]
    assert list(SlotEvent.objects.filter(slot_name="chat").values_list("action", flat=True)
                [:2]) == ["swap", "pull"]


@pytest.mark.django_db(transaction=True)
def test_download_and_load_of_the_slots_own_model_loads_it(sim, node, hal0_runtime):
    """"Download & load" from the Model field's picker, for the model the slot already
    names (never downloaded): downloaded, then a load (no swap to itself)."""
    Slot.objects.filter(name="chat").update(model_name="Qwen3-1.7B-GGUF")
    chat = slot()
    assert "Qwen3-1.7B-GGUF" not in sim.state().get("downloaded", [])

    async def progress(phase, data):
        pass

    async def run():
        pulls.do_start_pull(chat, "Qwen3-1.7B-GGUF", actor="cli", progress=progress,
                            then_serve=True)
        await asyncio.gather(*list(pulls.runtime.current().pulls.values()))

    asyncio.run(run())
    assert hal0_runtime.wait_idle(30)
    assert slot().state == "ready" and loaded(sim) == ["Qwen3-1.7B-GGUF"]
    assert list(SlotEvent.objects.filter(slot_name="chat").values_list("action", flat=True)
                [:2]) == ["load", "pull"]
