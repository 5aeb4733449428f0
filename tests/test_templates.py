"""Every partial the pages render and the websockets push, rendered on its own."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.template.loader import render_to_string
from django.utils import timezone

from slots.models import Node, Slot, State

pytestmark = pytest.mark.django_db


def card(**fields) -> str:
    slot = Slot.objects.select_related("node").get(name="chat")
    oob = fields.pop("oob", False)
    for key, value in fields.items():
        setattr(slot, key, value)
    return render_to_string("slots/_slot_card.html", {"slot": slot, "oob": oob})


def test_card_basics():
    html = card()
    assert html.lstrip().startswith("<article id=\"slot-chat\"")
    assert "hx-swap-oob" not in html
    assert 'class="badge state-offline"' in html and ">offline<" in html
    assert "Qwen3-4B-Instruct-2507-GGUF" in html and "GPU (ROCm)" in html and "local" in html
    assert "never" in html  # last use
    assert 'href="/slots/chat/"' in html


def test_card_out_of_band():
    assert 'hx-swap-oob="true"' in card(oob=True)


@pytest.mark.parametrize("state", State.values)
def test_card_badge_and_buttons_follow_the_state(state):
    html = card(state=state)
    assert f'class="badge state-{state}"' in html and f'data-state="{state}"' in html
    load_button = html.split('do/load/"')[1].split(">")[0]
    # aria-disabled, not disabled: the button keeps focus across a re-render
    assert ('aria-disabled="true"' in load_button) == (not Slot.can("load", state))


def test_card_drift_markers_and_durations():
    html = card(state=State.READY, loaded_model="Qwen3-0.6B-GGUF", pinned=True,
                keep_loaded=True, last_use_at=timezone.now() - timedelta(minutes=3),
                last_load_ms=12345, state_message="evicted: lemond restarted")
    assert "Drift: lemond has Qwen3-0.6B-GGUF loaded, the slot wants" in html
    assert ">pinned<" in html and ">keep loaded<" in html
    assert "3 min ago" in html and "12.3 s" in html
    assert "evicted: lemond restarted" in html
    assert "do/unpin/" in html and "do/pin/" not in html


def test_card_error_and_disabled():
    html = card(state=State.ERROR, state_message="llama-server failed", enabled=False)
    assert 'class="message error"' in html and "is-disabled" in html and ">disabled<" in html
    assert 'do/load/" hx-swap="none" aria-disabled="true">' in html
    assert 'do/unload/" hx-swap="none">' in html  # unloading stays possible


def test_card_buttons_name_their_slot_and_keep_their_ids():
    html = card()
    for action in ("load", "unload", "restart", "swap"):
        assert f'id="act-chat-{action}"' in html
    assert 'Load<span class="vh"> chat</span>' in html
    assert 'Pin<span class="vh"> chat</span>' in html
    # pin and unpin are one control: focus stays on it when it flips
    assert 'id="act-chat-pin"' in card(pinned=True) and "Unpin<" in card(pinned=True)
    assert 'aria-haspopup="dialog"' in html


def test_card_elapsed_time_while_loading():
    html = card(state=State.LOADING, state_changed_at=timezone.now() - timedelta(seconds=75))
    assert "data-elapsed" in html and ">1:15<" in html
    assert "data-elapsed" not in card(state=State.READY)


def node_html(**fields) -> str:
    node = Node.local()
    for key, value in fields.items():
        setattr(node, key, value)
    return render_to_string("slots/_node.html", {"node": node, "oob": True})


def test_node_reachable_header():
    html = node_html(reachable=True, version="10.6.0-sim", simulated=True,
                     system_stats={"cpu_percent": 12.0, "memory_gb": 8.4, "gpu_percent": None,
                                   "vram_gb": 2.1},
                     request_stats={"tokens_per_second": 33.3, "time_to_first_token": 0.21})
    assert html.lstrip().startswith('<section id="node-local"') and 'hx-swap-oob="true"' in html
    assert "reachable" in html and "lemond 10.6.0-sim" in html and ">simulated<" in html
    assert "12 %" in html and "8.4 GB" in html and "2.1 GB" in html
    assert "33.3 tok/s" in html and "TTFT 210 ms" in html
    assert "—" in html  # gpu_percent null
    assert 'class="banner"' not in html


def test_node_unreachable_banner():
    html = node_html(reachable=False, unreachable_since=timezone.now() - timedelta(minutes=2),
                     last_error="cannot reach lemond: ConnectError")
    assert 'class="banner" role="alert"' in html
    assert "unreachable since" in html and "2 min ago" in html and "ConnectError" in html
    assert " UTC (" in html  # the time says its zone
    assert "The cards show what was last seen" in html  # local has the seeded slots


def test_dead_empty_node_is_one_line_without_the_cards_sentence():
    node = Node.objects.create(name="spare", base_url="http://127.0.0.1:9",
                               unreachable_since=timezone.now() - timedelta(minutes=5))
    html = render_to_string("slots/_node.html", {"node": node})
    assert 'class="node down dead"' in html and "<details>" in html
    assert "no slots" in html.split("</summary>")[0]
    assert "The cards show what was last seen" not in html


def test_no_request_yet_is_a_dash_not_zero():
    html = node_html(reachable=True, request_stats={"tokens_per_second": 0.0,
                                                    "time_to_first_token": 0.0})
    assert "0 tok/s" not in html and "TTFT 0" not in html
    assert "<dt>last request</dt><dd>—</dd>" in html
    html = node_html(reachable=True, request_stats={
        "tokens_per_second": 0.0, "time_to_first_token": 0.0, "request_count_total": 0})
    assert "<dt>last request</dt><dd>—</dd>" in html


def test_node_never_polled_and_warning():
    html = node_html(config_warning="2 keep-loaded llm slots")
    assert "not polled yet" in html and "Configuration: 2 keep-loaded llm slots" in html
    assert "api_key" not in html


def test_toasts():
    assert 'id="toasts"' in render_to_string("slots/_toasts.html", {})
    html = render_to_string("slots/_toast.html", {"level": "error", "text": "Nope <b>"})
    assert 'class="toast error"' in html and "Nope &lt;b&gt;" in html and 'role="alert"' in html
    assert 'role="alert"' not in render_to_string("slots/_toast.html", {"level": "success",
                                                                         "text": "Done"})


def test_live_status():
    on = render_to_string("slots/_live_status.html", {"live": True, "oob": True})
    assert 'class="live on"' in on and 'hx-swap-oob="true"' in on
    assert 'class="live off"' in render_to_string("slots/_live_status.html", {"live": False})


def test_resync_has_everything_out_of_band():
    html = render_to_string("slots/_resync.html", {
        "slots": Slot.objects.for_dashboard(), "nodes": [Node.local()]})
    assert html.count('hx-swap-oob="true"') == 1 + 1 + Slot.objects.count()


@pytest.mark.parametrize("phase, expect", [
    ("idle", "Download"), ("starting", "<progress"), ("progress", "40 %"),
    ("cancelling", "cancelling"), ("complete", "Swap to this"), ("error", "disk full"),
    ("cancelled", "cancelled"),
])
def test_pull_phases(phase, expect):
    slot = Slot.objects.get(name="chat")
    html = render_to_string("slots/_pull.html", {
        "slot": slot, "model": "M-1", "dom_id": "M-1", "phase": phase, "percent": 40,
        "done_mb": 40, "total_mb": 100, "message": "disk full", "oob": True})
    assert 'id="pull-M-1"' in html and expect in html


def test_a_big_download_asks_first():
    slot = Slot.objects.get(name="chat")
    context = {"slot": slot, "model": "M-1", "dom_id": "M-1", "phase": "idle"}
    big = render_to_string("slots/_pull.html", {**context, "size": 67.7, "big": True})
    assert 'hx-confirm="Download M-1? It is 67.7 GB."' in big
    small = render_to_string("slots/_pull.html", {**context, "size": 2.5, "big": False})
    assert "hx-confirm" not in small and "Download<span class=\"vh\"> M-1, 2.5 GB" in small


def test_swap_picker_rows_and_error():
    slot = Slot.objects.get(name="chat")
    rows = [{"id": "A", "downloaded": True, "current": True, "recipe": "llamacpp", "size": 1,
             "suggested": True, "dom_id": "A"},
            {"id": "B", "downloaded": False, "current": False, "recipe": "llamacpp",
             "size": 2, "suggested": False, "dom_id": "B"}]
    html = render_to_string("slots/_swap_picker.html", {"slot": slot, "rows": rows,
                                                        "pulling": set(), "more": 3})
    assert "<dialog" in html and 'id="picker-rows"' in html and "autofocus" in html
    assert 'id="pull-B"' in html and "and 3 more" in html
    assert "disabled>Swap to this" in html  # the current model
    error = render_to_string("slots/_swap_picker.html", {"slot": slot, "error": "lemond down"})
    assert "lemond down" in error and "picker-rows" not in error


def test_log_partials():
    entries = [{"seq": 1, "timestamp": "t1", "severity": "Info", "tag": "Router", "line": "a"},
               {"seq": 2, "timestamp": "t2", "severity": "Error", "tag": "", "line": "b<"}]
    html = render_to_string("slots/_log_lines.html", {"entries": entries})
    assert 'hx-swap-oob="afterbegin"' in html
    assert html.index("b&lt;") < html.index(">a<")  # newest first (the list is reversed)
    assert "lvl-error" in html and "lvl-info" in html
    assert 'hx-swap-oob="innerHTML"' in render_to_string("slots/_log_lines.html",
                                                         {"entries": [], "replace": True})
    status = render_to_string("slots/_log_status.html", {"message": "down", "error": True})
    assert 'id="log-status"' in status and 'class="error"' in status
    paused = render_to_string("slots/_log_controls.html", {"paused": True, "oob": True})
    assert "Resume" in paused and 'value="0"' in paused and "ws-send" in paused


def test_lemond_model_partial():
    assert "<pre" in render_to_string("slots/_lemond_model.html", {"entry": "{}"})
    assert "down" in render_to_string("slots/_lemond_model.html", {"error": "down"})
