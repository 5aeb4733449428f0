"""hal0 keeps telling the truth when lemond misbehaves.

A real `serve` (its reconciler inside, polling every 0.2 s) drives two lemond simulators:
`local` (v10.6 shape: no pins in lemond) and `v11` (v11 shape: lemond pins). Each fault is
injected with the simulator's fault routes, and each test checks:

* every page (`/`, `/slots/<name>/`, `/api/slots/`, `/api/health`) answers 200 without
  waiting on lemond, while the fault is on: under 1 s each, where waiting on lemond would
  take its 2 s timeout or the 30 s hang. The issue's 200 ms target is a speed target, so
  `bench/faults.py` measures it (p50/p99 per fault, docs/benchmarks.md) from the timings
  these tests print;
* the state shown comes to match lemond's after lemond's recovery (the slots' states against
  the simulator's loaded and loading models, and each node's reachability). The 2 s target
  is a speed target: the tests print the time and `bench/faults.py` measures it, while the
  tests allow 10 s, so that a slow or busy CI machine fails only on a state that stays wrong;
* no "Traceback" in hal0's or the simulators' output;
* `slots export` is byte-for-byte what it was before the fault: no slot definition lost
  or changed.

The slots in play: `chat` (keep loaded) and `embed` (pinned) on `local`, `pin11` (pinned)
on `v11`; lemond keeps one model per type.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time

import httpx
import pytest

from tests.harness import Stack, free_port, login, wait_for
from tests.sim_fixtures import TEST_DEFAULTS, start_simulator

pytestmark = pytest.mark.e2e

PAGES = ("/", "/slots/chat/", "/api/slots/", "/api/health")
PAGE_BLOCK_S = 1.0  # far below any wait on lemond (HAL0_LEMONADE_TIMEOUT 2 s, hang 30 s)
PAGE_ROUNDS = int(os.environ.get("HAL0_FAULT_PAGE_ROUNDS", "2"))  # bench/faults.py: more
TRUTH_BUDGET_S = 10.0  # the 2 s target is bench/faults.py's (see above)
LOADED = ("ready", "serving")
MODELS = {"chat": "Qwen3-4B-Instruct-2507-GGUF", "embed": "nomic-embed-text-v1-GGUF",
          "rerank": "bge-reranker-v2-m3-GGUF", "pin11": "Qwen3-0.6B-GGUF"}
SIM_OPTIONS = {**TEST_DEFAULTS, "load_delay": 0.3}


class Rig:
    """The serve process, its simulators (restartable on their ports) and checks."""

    def __init__(self, stack: Stack, sims: dict, url: str):
        self.stack, self.sims, self.url = stack, sims, url
        self.ports = {name: sim.port for name, sim in sims.items()}
        self.options = {"local": SIM_OPTIONS, "v11": {**SIM_OPTIONS, "version_shape": "11"}}
        self.client = login(url)
        self.sim_logs: list[str] = []
        self.baseline = ""

    # --- lemond ------------------------------------------------------------------------
    def kill(self, node: str) -> None:
        self.sim_logs.append(self.sims[node].output())
        self.sims[node].kill()

    def start(self, node: str) -> None:
        """(Re)start a node's simulator on its port: lemond coming back with nothing."""
        old = self.sims.get(node)
        if old is not None and old.alive:
            return
        if old is not None:
            self.sim_logs.append(old.output())
            old.stop()
        self.sims[node] = start_simulator(port=self.ports[node], **self.options[node])

    # --- hal0 --------------------------------------------------------------------------
    def api(self, method: str, path: str) -> httpx.Response:
        return self.client.request(method, path)

    def slots(self) -> dict[str, dict]:
        return {s["name"]: s for s in self.api("GET", "/api/slots/").json()["slots"]}

    def export(self) -> str:
        return self.stack.manage("slots", "export").stdout

    def pages(self, rounds: int = PAGE_ROUNDS) -> list[float]:
        """Every page, `rounds` times: each answers 200 without waiting on lemond.
        Returns the timings (seconds)."""
        timings = []
        for _ in range(rounds):
            for path in PAGES:
                started = time.perf_counter()
                response = self.client.get(path)
                took = time.perf_counter() - started
                assert response.status_code == 200, (path, response.status_code)
                assert took < PAGE_BLOCK_S, f"{path} took {took * 1000:.0f} ms: waiting on lemond?"
                timings.append(took)
        return timings

    def untruths(self) -> list[str]:
        """What the pages show that lemond contradicts (empty: the truth)."""
        problems = []
        nodes = {n["name"]: n for n in self.api("GET", "/api/health").json()["nodes"]}
        slots = self.slots()
        for node, sim in self.sims.items():
            alive = sim.alive
            if nodes[node]["reachable"] != alive:
                problems.append(f"node {node} shown reachable={nodes[node]['reachable']}")
            if not alive:
                continue
            state = sim.state()
            if state["faults"].get("hang") or any(state["faults"].get(k) for k in
                                                   ("error_500", "malformed_json",
                                                    "html_error")):
                problems.append(f"node {node} is still faulty")
                continue
            loaded = set(state["loaded_names"])
            loading = {m.split(".", 1)[-1] if m.startswith(("builtin.", "user.")) else m
                       for m in state["in_flight_loads"]}
            for slot in slots.values():
                if slot["node"] != node or not slot["enabled"]:
                    continue
                model, shown = slot["model_name"], slot["state"]
                if shown in LOADED and model not in loaded:
                    problems.append(f"{slot['name']} shown {shown}, lemond has not got {model}")
                elif shown == "loading" and model not in loading:
                    problems.append(f"{slot['name']} shown loading, lemond is not loading it")
                elif shown not in (*LOADED, "loading") and model in loaded:
                    problems.append(f"{slot['name']} shown {shown}, lemond serves {model}")
        return problems

    def time_to_truth(self, since: float, budget: float = TRUTH_BUDGET_S) -> float:
        """Seconds from `since` (lemond's recovery) until the pages tell the truth."""
        problems: list[str] = []
        while time.monotonic() - since < budget:
            problems = self.untruths()
            if not problems:
                return time.monotonic() - since
            time.sleep(0.05)
        raise AssertionError(f"still untrue {budget} s after recovery: {problems}")

    def settled(self, timeout: float = 5.0) -> float:
        """Wait until the protected slots are loaded again and the truth is shown."""
        def ok():
            slots = self.slots()
            return not self.untruths() and all(
                slots[name]["state"] in LOADED for name in ("chat", "embed", "pin11"))
        return wait_for(ok, timeout=timeout, interval=0.05)[1]

    def ensure_loaded(self, *names: str) -> None:
        for name in names:
            if self.slots()[name]["state"] not in LOADED:
                response = self.api("POST", f"/api/slots/{name}/load")
                assert response.status_code == 200, response.text

    def check_clean(self) -> None:
        logs = self.stack.logs() + "".join(self.sim_logs) + \
            "".join(s.output() for s in self.sims.values())
        assert "Traceback" not in logs, logs[-5000:]
        assert self.export() == self.baseline, "a slot definition changed"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    sims = {"local": start_simulator(port=free_port(), **SIM_OPTIONS),
            "v11": start_simulator(port=free_port(), **SIM_OPTIONS, version_shape="11")}
    tmp = tmp_path_factory.mktemp("faults")
    stack = Stack(tmp, HAL0_LEMONADE_URL=sims["local"].url, HAL0_POLL_ACTIVE_S="0.2",
                  HAL0_POLL_IDLE_S="0.2", HAL0_RECONCILE_TIMEOUT_S="1",
                  HAL0_STATS_EVERY_S="0.5", HAL0_RESTORE_BACKOFF_S="0.2",
                  HAL0_RESTORE_BACKOFF_MAX_S="1", HAL0_LEMONADE_TIMEOUT="2")
    stack.setup()
    rig = None
    try:
        rig = Rig(stack, sims, stack.serve())
        response = rig.client.post("/nodes/", data={
            "name": "v11", "base_url": sims["v11"].url, "enabled": "on",
            "csrfmiddlewaretoken": rig.client.cookies["csrftoken"]})
        assert response.status_code == 302
        doc = json.loads(rig.export())
        for slot in doc["slots"]:
            if slot["name"] == "chat":
                slot["keep_loaded"] = True
            if slot["name"] == "embed":
                slot["pinned"] = True
        pin11 = {**next(s for s in doc["slots"] if s["name"] == "chat"), "name": "pin11",
                 "node": "v11", "model_name": MODELS["pin11"], "pinned": True,
                 "keep_loaded": False, "is_default": False}
        doc["slots"].append(pin11)
        (tmp / "slots.json").write_text(json.dumps(doc))
        stack.manage("slots", "import", str(tmp / "slots.json"))
        rig.baseline = rig.export()
        assert '"pin11"' in rig.baseline
        rig.ensure_loaded("chat", "embed", "pin11")
        yield rig
    finally:
        stack.stop()
        for sim in (rig.sims if rig else sims).values():
            sim.stop()


@pytest.fixture
def fresh(rig):
    """Each test starts with both lemonds up, no faults, the protected slots loaded."""
    for node in rig.sims:
        rig.start(node)
        rig.sims[node].fault("clear")
    rig.ensure_loaded("chat", "embed", "pin11")
    rig.settled()
    yield rig
    rig.check_clean()


def report(what: str, pages: list[float], **numbers: float) -> None:
    """One line per fault; bench/faults.py reads these (keep the format)."""
    numbers = {"page_p50": statistics.median(pages),
               "page_p99": statistics.quantiles(pages, n=100, method="inclusive")[98],
               "page_max": max(pages), **numbers}
    print(f"\nFAULT {what}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in numbers.items())
          + f", pages {len(pages)}")


def test_lemond_down_when_hal0_starts(fresh):
    rig = fresh
    # the box restarts: hal0 comes back before lemond does
    serve = next(p for p in rig.stack.procs if p.poll() is None)
    rig.stack.kill(serve)
    rig.kill("local")
    cookies = rig.client.cookies
    rig.url = rig.stack.serve()
    rig.client = login(rig.url)
    del cookies
    wait_for(lambda: not {n["name"]: n for n in rig.api("GET", "/api/health").json()["nodes"]}
             ["local"]["reachable"], timeout=3)
    pages = rig.pages(3 * PAGE_ROUNDS // 2)
    assert "unreachable since" in rig.client.get("/").text  # the banner
    assert rig.slots()["chat"]["state"] == "ready"  # last seen, not invented
    rig.start("local")
    back = time.monotonic()
    truth = rig.time_to_truth(back)
    restored = rig.settled()
    report("lemond down at start", pages, truth_after_recovery=truth,
           protected_slots_restored=time.monotonic() - back)
    assert restored < 5


def test_lemond_dies_during_a_load(fresh):
    rig = fresh
    rig.sims["local"].configure(load_delay=3)
    outcome = {}

    def load():
        outcome["response"] = rig.client.post("/api/slots/rerank/load")

    thread = threading.Thread(target=load)
    thread.start()
    wait_for(lambda: rig.sims["local"].state()["in_flight_loads"], timeout=5)
    rig.kill("local")  # SIGKILL mid-load
    thread.join(10)
    assert outcome["response"].status_code == 503, outcome["response"].text
    assert outcome["response"].json()["error"]["code"] == "lemond.unavailable"
    pages = rig.pages()
    assert rig.slots()["rerank"]["state"] == "error"
    rig.start("local")
    back = time.monotonic()
    truth = rig.time_to_truth(back)
    rig.settled()
    report("lemond dies during a load", pages, truth_after_recovery=truth,
           protected_slots_restored=time.monotonic() - back)
    assert rig.slots()["rerank"]["state"] in ("error", "offline")


def test_lemond_hangs_for_30_s(fresh):
    rig = fresh
    rig.sims["local"].fault("hang", seconds=30)
    hung = time.monotonic()
    wait_for(lambda: not {n["name"]: n for n in rig.api("GET", "/api/health").json()["nodes"]}
             ["local"]["reachable"], timeout=3)
    shown_down = time.monotonic() - hung
    pages: list[float] = []
    while time.monotonic() - hung < 4 or len(pages) < 4 * PAGE_ROUNDS:  # the whole time
        pages += rig.pages(rounds=1)
    nodes = {n["name"]: n for n in rig.api("GET", "/api/health").json()["nodes"]}
    assert nodes["v11"]["reachable"] and "did not answer" in nodes["local"]["last_error"]
    assert rig.slots()["chat"]["state"] == "ready"  # a hang is not an eviction
    rig.sims["local"].fault("clear")
    back = time.monotonic()
    truth = rig.time_to_truth(back)
    report("lemond hangs", pages, shown_unreachable_after=shown_down,
           truth_after_recovery=truth)


@pytest.mark.parametrize("fault", ["error_500", "malformed_json", "html_error"])
def test_lemond_answers_garbage(fresh, fault):
    rig = fresh
    rig.sims["local"].fault(fault)
    faulted = time.monotonic()
    wait_for(lambda: not {n["name"]: n for n in rig.api("GET", "/api/health").json()["nodes"]}
             ["local"]["reachable"], timeout=3)
    shown_down = time.monotonic() - faulted
    pages = rig.pages(3 * PAGE_ROUNDS // 2)
    page = rig.client.get("/").text
    assert "unreachable since" in page
    slots = rig.slots()
    assert slots["chat"]["state"] == "ready" and slots["embed"]["state"] == "ready"
    # an action while lemond answers garbage fails cleanly, with an error envelope
    response = rig.api("POST", "/api/slots/rerank/load")
    assert 500 < response.status_code < 600 and response.status_code != 500, response.text
    assert response.json()["error"]["code"].startswith(("lemond.", "slot."))
    rig.sims["local"].fault("clear")
    back = time.monotonic()
    truth = rig.time_to_truth(back)
    report(f"lemond answers {fault}", pages, shown_unreachable_after=shown_down,
           truth_after_recovery=truth)


def test_lemond_evicts_everything_after_a_failed_load(fresh):
    rig = fresh
    assert rig.api("POST", "/api/slots/rerank/unload").status_code == 200
    loaded = set(rig.sims["local"].state()["loaded_names"])
    assert {MODELS["chat"], MODELS["embed"]} <= loaded
    seen = len(rig.sims["local"].state()["evictions"])
    rig.sims["local"].fault("fail_next_load", model=MODELS["rerank"])
    response = rig.api("POST", "/api/slots/rerank/load")
    failed = time.monotonic()
    assert response.status_code == 502 and response.json()["error"]["code"] == "slot.spawn_failed"
    # lemond dropped everything it had. hal0 may already be reloading the protected slots
    # (it hears the evictions within milliseconds), so "nothing loaded right now" would be a
    # race: check lemond's own record of what it evicted.
    evicted = {e["model"] for e in rig.sims["local"].state()["evictions"][seen:]
               if e["reason"] != "unload"}
    assert loaded <= evicted, (loaded, evicted)
    pages = rig.pages()
    truth = rig.time_to_truth(failed)
    restored = rig.settled()
    events = rig.client.get("/slots/chat/").text
    assert "failed load" in events or "restored" in events
    report("evict-all after a failed load", pages, truth_after_recovery=truth,
           protected_slots_restored=time.monotonic() - failed)
    assert restored < 5


def test_lemond_restarts_with_nothing_loaded(fresh):
    rig = fresh
    health = httpx.get(f"{rig.sims['v11'].url}/v1/health", timeout=5).json()
    assert [m["pinned"] for m in health["all_models_loaded"]] == [True]
    generation = rig.sims["local"].state()["generation"]
    for node in ("local", "v11"):
        rig.sims[node].fault("restart")
    restarted = time.monotonic()
    # lemond came back empty. hal0 may already be reloading (its log relay sees the restart
    # within milliseconds), so "nothing loaded right now" would be a race: check the restart.
    assert rig.sims["local"].state()["generation"] == generation + 1
    pages = rig.pages()
    truth = rig.time_to_truth(restarted)
    rig.settled()
    report("lemond restarts with nothing loaded", pages,
           truth_after_recovery=truth, protected_slots_restored=time.monotonic() - restarted)
    # keep-loaded and (lemond < 10.8) hal0-protected pinned slots are back on local
    assert set(rig.sims["local"].state()["loaded_names"]) == {MODELS["chat"], MODELS["embed"]}
    # lemond 11 forgot the pin; hal0 reloaded the slot pinned
    health = httpx.get(f"{rig.sims['v11'].url}/v1/health", timeout=5).json()
    assert [(m["model_name"], m["pinned"]) for m in health["all_models_loaded"]] == \
        [(MODELS["pin11"], True)]
    history = rig.client.get("/slots/chat/").text.split('class="compact events"')[1]
    newest = [row.split("</td>")[4] for row in history.split("<tr")[2:4]]
    assert "restored" in history and "reloaded" in newest[0], newest
    assert "every model at once" in newest[1] or "restarted" in newest[1], newest
