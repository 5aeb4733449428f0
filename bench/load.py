"""Load benchmark: many browsers on one Daphne process, a big dashboard, the reconciler's CPU.

    .venv/bin/python bench/load.py [--clients 200] [--changes 20] [--slots 100] [--nodes 4]
                                   [--gets 200] [--cycles 50] [--json FILE]

Everything runs in a temporary directory (its own SQLite database and HAL0_VAR_DIR, never
the checkout's `var/`), on loopback, against lemond simulators (one per node):

1. **Dashboard `GET /`** with `--slots` slots spread over `--nodes` nodes: p50/p99 over
   `--gets` requests (Django test client, templates warm) and the SQL query count.
2. **Reconciler CPU per poll cycle**: `Reconciler.poll_once()` in this process against the
   `--nodes` simulators (a few models loaded on each), `--cycles` times; CPU time
   (`time.process_time()`, every thread of the process) and wall time per cycle, for
   health-only polls and for polls that also read system/request stats.
3. **Websocket fan-out**: one `manage.py serve` (Daphne, in-memory channel layer, the
   reconciler inside, polling the same nodes every second while dashboards are open);
   `--clients` websockets logged in with the same session and Origin as a browser on
   `/ws/slots/`. A slot is pinned/unpinned through the JSON API `--changes` times; for each
   change the time from the API call to the pushed card's arrival is recorded on every
   socket (p50/p99 over all arrivals, the worst change's spread). The serve process's RSS
   (`VmRSS`) idle, with the clients connected, and after the changes.

Targets (issue #7): a change reaches all 200 clients within 500 ms p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TMP = Path(tempfile.mkdtemp(prefix="hal0-load-"))
ENV = {
    "DJANGO_SETTINGS_MODULE": "hal0site.settings",
    "HAL0_VAR_DIR": str(TMP / "var"),
    "DATABASE_URL": f"sqlite:///{TMP / 'load.sqlite3'}",
    "HAL0_LOG_LEVEL": "WARNING",
}
os.environ.update(ENV)
for key in ("HAL0_DEBUG", "REDIS_URL"):
    os.environ.pop(key, None)
PASSWORD = "load-bench-password"
CAPABILITIES = [("chat", "gpu-vulkan", "Qwen3-0.6B-GGUF"),
                ("chat", "cpu", "Qwen3-4B-Instruct-2507-GGUF"),
                ("embed", "gpu-vulkan", "nomic-embed-text-v1-GGUF"),
                ("rerank", "cpu", "bge-reranker-v2-m3-GGUF")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def rss_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def machine() -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "?"

    import django

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = run("free", "-h").splitlines()
    return {"nproc": run("nproc"), "cpu": cpu, "memory": mem[1] if len(mem) > 1 else "?",
            "python": platform.python_version(), "django": django.get_version(),
            "kernel": platform.release(), "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


# --- setup ---------------------------------------------------------------------------------------

def setup(slot_count: int, node_count: int, sims) -> None:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from slots.models import Node, Slot

    call_command("migrate", verbosity=0)
    nodes = []
    for i, sim in enumerate(sims):
        node = Node.local() if i == 0 else Node(name=f"node{i}")
        node.base_url = sim.url
        node.save()
        nodes.append(node)
    existing = Slot.objects.count()
    per_node = max(1, (slot_count - existing) // node_count)
    Slot.objects.bulk_create([
        Slot(name=f"s{i:03d}", capability=CAPABILITIES[i % 4][0], device=CAPABILITIES[i % 4][1],
             model_name=CAPABILITIES[i % 4][2], node=nodes[min(i // per_node, node_count - 1)],
             pinned=i % 7 == 0, keep_loaded=False, idle_timeout_s=0)
        for i in range(slot_count - existing)
    ])
    get_user_model().objects.create_superuser("bench", "", PASSWORD)
    # a couple of models loaded on every node, so health answers have entries to reconcile
    from slots.actions import lifecycle

    for node in nodes:
        for slot in list(Slot.objects.filter(node=node, capability__in=("chat", "embed")))[:2]:
            lifecycle.do_load_slot(slot, actor="bench")


# --- 1. GET / ------------------------------------------------------------------------------------

def bench_get(runs: int) -> dict:
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from slots.models import Node, Slot

    client = Client(HTTP_HOST="127.0.0.1")
    # force_login: django-axes' backend needs the request that Client.login() leaves out
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.get(username="bench"))
    client.get("/")
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/")
    assert response.status_code == 200
    query_count = len(queries)  # now: the requests below reset the captured log
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        client.get("/")
        times.append((time.perf_counter() - started) * 1000)
    return {"slots": Slot.objects.count(), "nodes": Node.objects.count(),
            "queries": query_count, "bytes": len(response.content),
            "p50_ms": statistics.median(times), "p99_ms": percentile(times, 0.99),
            "runs": runs}


# --- 2. reconciler CPU -----------------------------------------------------------------------------

def bench_reconciler(cycles: int) -> dict:
    from django.conf import settings

    from slots.reconciler import Reconciler

    async def run(stats_every: float) -> tuple[float, float]:
        settings.HAL0_STATS_EVERY_S = stats_every
        reconciler = Reconciler(use_leases=False)
        await reconciler.poll_once()  # first poll records everything; not counted
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(cycles):
            await reconciler.poll_once()
        return ((time.process_time() - cpu0) / cycles * 1000,
                (time.perf_counter() - wall0) / cycles * 1000)

    health_cpu, health_wall = asyncio.run(run(3600.0))
    stats_cpu, stats_wall = asyncio.run(run(0.0))
    return {"cycles": cycles, "health_cpu_ms": health_cpu, "health_wall_ms": health_wall,
            "stats_cpu_ms": stats_cpu, "stats_wall_ms": stats_wall}


# --- 3. websocket fan-out --------------------------------------------------------------------------

def start_serve(port: int) -> subprocess.Popen:
    log = open(TMP / "serve.log", "w")
    return subprocess.Popen([sys.executable, "manage.py", "serve", "--port", str(port)],
                            cwd=ROOT, env={**os.environ, **ENV}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def login(base: str):
    import httpx

    http = httpx.Client(base_url=base, timeout=30)
    for _ in range(200):
        try:
            if http.get("/accounts/login/").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    else:
        raise RuntimeError("serve did not start:\n" + (TMP / "serve.log").read_text())
    token = http.cookies["csrftoken"]
    response = http.post("/accounts/login/", data={"username": "bench", "password": PASSWORD,
                                                   "csrfmiddlewaretoken": token})
    assert response.status_code == 302, response.text[:300]
    return http


async def fan_out(base: str, http, clients: int, changes: int, pid: int) -> dict:
    import httpx
    from websockets.asyncio.client import connect

    cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
    headers = {"Cookie": cookie, "Origin": base}
    url = base.replace("http://", "ws://") + "/ws/slots/"
    slot = "s001"
    round_ = {"n": -1, "pinned": False, "t0": 0.0}
    arrivals: list[list[float]] = [[] for _ in range(changes)]
    done = [asyncio.Event() for _ in range(changes)]
    sockets = []

    async def open_one():
        ws = await connect(url, additional_headers=headers, max_size=None, open_timeout=60,
                           ping_interval=None)
        await ws.recv()  # the resync of the whole page
        sockets.append(ws)

    async def reader(ws):
        marker = f'id="slot-{slot}"'
        async for message in ws:
            n = round_["n"]
            if n < 0 or marker not in message:
                continue
            if (">pinned<" in message) == round_["pinned"]:
                now = time.perf_counter()
                arrivals[n].append((now - round_["t0"]) * 1000)
                round_["n_seen"] = n
                if len(arrivals[n]) == clients:
                    done[n].set()

    started = time.perf_counter()
    for i in range(0, clients, 20):  # 20 at a time, as a room of browsers would open
        await asyncio.gather(*(open_one() for _ in range(min(20, clients - i))))
    connect_s = time.perf_counter() - started
    await asyncio.sleep(2)
    rss_connected = rss_kb(pid)
    readers = [asyncio.ensure_future(reader(ws)) for ws in sockets]
    csrf = http.cookies["csrftoken"]
    api_ms = []
    missing = 0
    async with httpx.AsyncClient(base_url=base, cookies=http.cookies, timeout=30) as api:
        for n in range(changes):
            action = "pin" if n % 2 == 0 else "unpin"
            round_.update(n=n, pinned=action == "pin", t0=time.perf_counter())
            response = await api.post(f"/api/slots/{slot}/{action}",
                                      headers={"X-CSRFToken": csrf})
            api_ms.append((time.perf_counter() - round_["t0"]) * 1000)
            assert response.status_code == 200, response.text[:300]
            try:
                await asyncio.wait_for(done[n].wait(), 10)
            except TimeoutError:
                missing += clients - len(arrivals[n])
            await asyncio.sleep(0.3)
    rss_after = rss_kb(pid)
    for task in readers:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    everything = [ms for per in arrivals for ms in per]
    worst = max(range(changes), key=lambda n: max(arrivals[n] or [0]))
    return {
        "clients": len(sockets), "changes": changes, "arrivals": len(everything),
        "missing": missing, "connect_s": connect_s,
        "p50_ms": statistics.median(everything), "p99_ms": percentile(everything, 0.99),
        "max_ms": max(everything),
        "first_p50_ms": statistics.median(min(per) for per in arrivals if per),
        # first socket to last socket within one change: the fan-out itself
        "spread_p50_ms": statistics.median(max(per) - min(per) for per in arrivals if per),
        "spread_max_ms": max(max(per) - min(per) for per in arrivals if per),
        "worst_change_first_last_ms": (min(arrivals[worst]), max(arrivals[worst])),
        "api_p50_ms": statistics.median(api_ms),
        "rss_connected_kb": rss_connected, "rss_after_kb": rss_after,
    }


def bench_ws(clients: int, changes: int) -> dict:
    from tests.harness import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_serve(port)
    try:
        http = login(base)
        http.get("/")
        time.sleep(3)  # the reconciler's first polls and the stats reads settle
        idle = rss_kb(server.pid)
        result = asyncio.run(fan_out(base, http, clients, changes, server.pid))
        result["rss_idle_kb"] = idle
        return result
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--slots", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gets", type=int, default=200)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from tests.sim_fixtures import start_simulator

    before = machine()
    sims = [start_simulator(load_delay=0.1, max_loaded_models=2) for _ in range(args.nodes)]
    results: dict = {"machine": before}
    try:
        setup(args.slots, args.nodes, sims)
        get = results["get"] = bench_get(args.gets)
        print(f"GET / with {get['slots']} slots x {get['nodes']} nodes: {get['queries']} "
              f"queries, {get['bytes'] // 1024} KiB, p50 {get['p50_ms']:.1f} ms, "
              f"p99 {get['p99_ms']:.1f} ms ({get['runs']} requests)")
        rec = results["reconciler"] = bench_reconciler(args.cycles)
        print(f"reconciler poll cycle ({args.nodes} nodes, {args.slots} slots): CPU "
              f"{rec['health_cpu_ms']:.1f} ms (wall {rec['health_wall_ms']:.1f} ms) health only; "
              f"{rec['stats_cpu_ms']:.1f} ms (wall {rec['stats_wall_ms']:.1f} ms) with stats")
        ws = results["ws"] = bench_ws(args.clients, args.changes)
        print(f"websocket fan-out: {ws['clients']} clients, {ws['changes']} changes, "
              f"{ws['arrivals']} arrivals ({ws['missing']} missing): p50 {ws['p50_ms']:.0f} ms, "
              f"p99 {ws['p99_ms']:.0f} ms, max {ws['max_ms']:.0f} ms; first client p50 "
              f"{ws['first_p50_ms']:.0f} ms; first-to-last spread p50 "
              f"{ws['spread_p50_ms']:.0f} ms, max {ws['spread_max_ms']:.0f} ms; "
              f"API call p50 {ws['api_p50_ms']:.0f} ms; "
              f"connecting took {ws['connect_s']:.1f} s")
        print(f"serve RSS: idle {ws['rss_idle_kb']['VmRSS'] / 1024:.0f} MiB, "
              f"{ws['clients']} clients {ws['rss_connected_kb']['VmRSS'] / 1024:.0f} MiB, "
              f"after {ws['rss_after_kb']['VmRSS'] / 1024:.0f} MiB "
              f"(peak {ws['rss_after_kb']['VmHWM'] / 1024:.0f} MiB)")
    finally:
        for sim in sims:
            sim.stop()
    results["machine_after"] = {"loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    m = results["machine"]
    print(f"machine: {m['nproc']} x {m['cpu']}; mem {m['memory']}; Python {m['python']}, "
          f"Django {m['django']}; load average before {' '.join(m['loadavg'])}, after "
          f"{' '.join(results['machine_after']['loadavg'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    ok = ws["p99_ms"] <= 500 and ws["missing"] == 0
    print("OK" if ok else "OVER TARGET (p99 <= 500 ms, every client gets every change)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
