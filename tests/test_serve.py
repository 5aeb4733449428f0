"""`manage.py serve` as a process: it answers, runs the reconciler inside, and on SIGTERM
exits cleanly and gives its node leases back (another process can take over at once)."""

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import Stack, login, wait_for, websocket

pytestmark = pytest.mark.e2e


def leases(db: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute("SELECT name, holder FROM slots_lease").fetchall()


def chat_state(stack: Stack) -> tuple[str, str]:
    """The chat slot's (state, state_message), read from the stack's database."""
    with contextlib.closing(sqlite3.connect(stack.tmp_path / "hal0.sqlite3", timeout=10)) as conn:
        return conn.execute("SELECT state, state_message FROM slots_slot "
                            "WHERE name = 'chat'").fetchone()


def stop_timed(proc: subprocess.Popen) -> float:
    """SIGTERM a Stack process (its group); seconds until it exited, with status 0."""
    stopped = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    return time.monotonic() - stopped


def test_serve_polls_and_releases_its_leases_on_sigterm(tmp_path, lemond_sim):
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=lemond_sim.url, HAL0_POLL_IDLE_S="0.3")
    stack.setup()
    try:
        url = stack.serve()
        proc = stack.procs[-1]
        db = tmp_path / "hal0.sqlite3"
        [(name, holder)], _ = wait_for(lambda: leases(db), timeout=30)
        assert httpx.get(f"{url}/api/health").json()["status"] == "ok"
        assert name == "reconciler:local" and f":{proc.pid}:" in holder
        assert stop_timed(proc) < 15
        assert leases(db) == []
    finally:
        stack.stop()
    assert "Traceback" not in stack.logs()


def test_a_slot_imported_with_the_cli_appears_on_open_dashboards(tmp_path, lemond_sim):
    """`manage.py slots import` is another process: with the embedded in-memory channel
    layer it cannot push to `serve`'s dashboards, so serve's reconciler notices where the
    cards sit has changed and pushes the grid itself."""
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=lemond_sim.url, HAL0_POLL_ACTIVE_S="0.25")
    stack.setup()
    try:
        url = stack.serve()
        client = login(url)
        dashboard = websocket(url, client)
        try:
            dashboard.wait(lambda m: 'id="slot-chat"' in m)  # the resync
            exported = json.loads(stack.manage("slots", "export").stdout)
            exported["slots"].append({**next(s for s in exported["slots"]
                                             if s["name"] == "chat"),
                                      "name": "chat-cli", "is_default": False})
            (tmp_path / "slots.json").write_text(json.dumps(exported))
            started = time.monotonic()
            stack.manage("slots", "import", str(tmp_path / "slots.json"))
            imported = time.monotonic()
            layout, at = dashboard.wait(lambda m: 'id="layout"' in m and "slot-chat-cli" in m,
                                        timeout=5)
            print(f"\nCLI import (a {imported - started:.1f} s command) on the dashboard "
                  f"{(at - imported) * 1000:.0f} ms after it returned")
            assert 'id="group-chat"' in layout
            assert layout.index('id="slot-chat-cli"') > layout.index('id="group-chat"')

            # made in serve itself (a page): pushed once, not again by the watcher
            response = client.post("/new-slot/", data={
                "name": "chat-page", "capability": "chat", "device": "cpu",
                "model_name": "Qwen3-0.6B-GGUF", "idle_timeout_s": "0", "enabled": "on",
                "csrfmiddlewaretoken": client.cookies["csrftoken"]})
            assert response.status_code == 302, response.text[-2000:]
            dashboard.wait(lambda m: 'id="layout"' in m and "slot-chat-page" in m, timeout=5)
            dashboard.drain(1.5)  # six of the watcher's periods
            layouts = [m for _, m in dashboard.received if 'id="layout"' in m]
            assert len(layouts) == 2, len(layouts)  # the CLI's and the page's
        finally:
            dashboard.close()
            client.close()
    finally:
        stack.stop()
    assert "Traceback" not in stack.logs()


@pytest.fixture
def short_grace(tmp_path, lemond_sim):
    """A migrated Stack on the simulator whose processes give running actions 1 s at
    SIGTERM."""
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=lemond_sim.url, HAL0_SHUTDOWN_GRACE_S="1")
    stack.setup()
    try:
        yield stack
    finally:
        stack.stop()
    assert "Traceback" not in stack.logs()


def test_sigterm_during_a_load_exits_at_once_and_the_next_start_shows_the_truth(
        short_grace, lemond_sim):
    """A restart (the installer's, an upgrade's) while lemond loads a big model: serve
    does not wait minutes for the load (systemd would kill it at 90 s with the slot left
    `loading`), it records the load as interrupted, and the next serve adopts the model
    once lemond has it."""
    stack = short_grace
    lemond_sim.configure(load_delay=20)
    client = login(stack.serve())
    response = client.post("/slots/chat/do/load/", headers={"HX-Request": "true"})
    assert response.status_code == 200
    wait_for(lambda: chat_state(stack)[0] == "loading", timeout=5)
    took = stop_timed(stack.procs[-1])
    print(f"\nserve exited {took:.1f} s after SIGTERM during a 20 s load (grace 1 s)")
    assert took < 6  # not the load's remaining ~19 s
    state, message = chat_state(stack)
    assert state == "error" and "interrupted (hal0 stopped)" in message
    client.close()

    stack.serve()  # lemond goes on loading; the new process adopts what it has
    wait_for(lambda: chat_state(stack)[0] == "ready", timeout=40)
    model = json.loads(stack.manage("slots", "show", "chat", "--json").stdout)["model_name"]
    assert model in lemond_sim.state()["loaded_names"]


def test_sigterm_during_a_restore_exits_at_once_and_records_it(short_grace, lemond_sim):
    """`manage.py reconcile` reloading a keep-loaded slot lemond dropped: a SIGTERM then
    does not wait for the load, and the slot says the restore was interrupted instead of
    staying `loading` until the busy state goes stale."""
    stack = short_grace
    stack.manage("slots", "load", "chat")
    with contextlib.closing(sqlite3.connect(stack.tmp_path / "hal0.sqlite3")) as conn, conn:
        conn.execute("UPDATE slots_slot SET keep_loaded = 1 WHERE name = 'chat'")
    reconcile = stack.start("reconcile", name="reconcile")
    model = json.loads(stack.manage("slots", "show", "chat", "--json").stdout)["model_name"]
    lemond_sim.configure(load_delay=20)
    httpx.post(f"{lemond_sim.url}/v1/unload", json={"model_name": model}, timeout=5)
    wait_for(lambda: chat_state(stack) == ("loading", f"restoring {model}"), timeout=15)
    took = stop_timed(reconcile)
    print(f"\nreconcile exited {took:.1f} s after SIGTERM during a 20 s restore")
    assert took < 6
    state, message = chat_state(stack)
    assert state == "error" and "restore interrupted (hal0 stopped)" in message


# --- a serve killed mid-action (#14 Medium 4) --------------------------------------------------

def busy_leases(stack: Stack) -> list[tuple[str, str]]:
    return [(name, holder) for name, holder in leases(stack.tmp_path / "hal0.sqlite3")
            if name.startswith("busy:")]


def chat_events(stack: Stack, action: str) -> list[tuple[str, str, str]]:
    """The chat slot's audit rows of `action`: (from_state, to_state, message), oldest first."""
    with contextlib.closing(sqlite3.connect(stack.tmp_path / "hal0.sqlite3", timeout=10)) as conn:
        return conn.execute("SELECT from_state, to_state, message FROM slots_slotevent "
                            "WHERE slot_name = 'chat' AND action = ? ORDER BY id",
                            (action,)).fetchall()


def sigkill_during_a_load(stack: Stack, url: str, lemond_sim) -> tuple[int, str]:
    """Start a load in the stack's serve (at `url`, `procs[-1]`) and SIGKILL serve while
    lemond is loading (an OOM kill: nothing runs at exit). Returns serve's pid and the
    model."""
    serve = stack.procs[-1]
    client = login(url)
    response = client.post("/slots/chat/do/load/", headers={"HX-Request": "true"})
    assert response.status_code == 200
    client.close()
    wait_for(lambda: chat_state(stack)[0] == "loading", timeout=10)
    # killed once lemond has the request (a loaded box may take a while to send it)
    wait_for(lambda: lemond_sim.state()["in_flight_loads"], timeout=30)
    [(_, holder)] = busy_leases(stack)  # the busy state's owner: this serve
    assert f":{serve.pid}:" in holder
    stack.kill(serve)
    assert chat_state(stack)[0] == "loading"  # nothing was recorded at the kill
    model = json.loads(stack.manage("slots", "show", "chat", "--json").stdout)["model_name"]
    return serve.pid, model


def test_a_sigkilled_serve_leaves_no_slot_loading_after_the_next_start(tmp_path, lemond_sim):
    """#14 Medium 4: serve is SIGKILLed (an OOM kill) while lemond loads a model, and lemond
    finishes the load. The next serve settles the slot at once from lemond's truth: ready
    (the model adopted), with an `interrupted` audit row, the dead process's lease gone and
    the slot usable (unload was 409). It used to stay `loading` for the whole load timeout
    (15 min) plus a minute."""
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=lemond_sim.url)
    stack.setup()
    lemond_sim.configure(load_delay=6)
    try:
        pid, model = sigkill_during_a_load(stack, stack.serve(), lemond_sim)
        wait_for(lambda: model in lemond_sim.state()["loaded_names"], timeout=30)
        assert chat_state(stack)[0] == "loading"  # lemond has it; the dead serve never said so
        stack.serve()
        wait_for(lambda: chat_state(stack)[0] == "ready", timeout=30)
        [(from_state, to_state, message)] = chat_events(stack, "interrupted")
        assert (from_state, to_state) == ("loading", "ready")
        assert f":{pid}:" in message and "adopted" in message, message
        assert busy_leases(stack) == []
        assert lemond_sim.state()["load_calls"][model] == 1  # adopted, not loaded again
        stack.manage("slots", "unload", "chat")
        assert chat_state(stack)[0] == "offline"
    finally:
        stack.stop()
        print(stack.logs())  # shown when the test fails


def test_another_running_process_settles_a_killed_serves_load(tmp_path, lemond_sim):
    """With another process running (`manage.py reconcile`, polling lemond for every hal0
    process), a SIGKILL of serve mid-load is settled by that process without any restart:
    lemond has not finished, so the slot goes offline with an `interrupted` row instead of
    `loading` nobody runs, and is adopted once lemond has the model."""
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=lemond_sim.url)
    stack.setup()
    lemond_sim.configure(load_delay=8)
    try:
        reconcile = stack.start("reconcile", name="reconcile")
        wait_for(lambda: (("reconciler:local", reconcile.pid) in [
            (name, int(holder.split(":")[1])) for name, holder in leases(
                tmp_path / "hal0.sqlite3")]), timeout=60)  # it polls lemond; serve's waits
        pid, model = sigkill_during_a_load(stack, stack.serve(), lemond_sim)
        wait_for(lambda: chat_events(stack, "interrupted"), timeout=30)
        [(from_state, to_state, message)] = chat_events(stack, "interrupted")
        assert from_state == "loading" and f":{pid}:" in message, message
        if to_state == "offline":  # settled before lemond finished: adopted when it has
            assert f"does not have {model}" in message
            wait_for(lambda: chat_events(stack, "adopted"), timeout=30)
        wait_for(lambda: chat_state(stack)[0] == "ready", timeout=30)
        assert busy_leases(stack) == []
    finally:
        stack.stop()
        print(stack.logs())  # shown when the test fails
