"""Dashboard benchmark: `GET /`, a slot page and the Activity page with 100 slots (SQL
queries and median render time), and the push latency from an action in one browser to the
card in another (p95).

    .venv/bin/python bench/dashboard.py [--slots 100] [--runs 50] [--pushes 50] [--no-push]

Everything runs against a throwaway SQLite database in a temporary directory; the push
part starts a lemond simulator and `manage.py serve` on free ports. Results go to stdout
(recorded in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TMP = Path(tempfile.mkdtemp(prefix="hal0-bench-"))
os.environ.update({
    "DJANGO_SETTINGS_MODULE": "hal0site.settings",
    "HAL0_VAR_DIR": str(TMP / "var"),
    "DATABASE_URL": f"sqlite:///{TMP / 'bench.sqlite3'}",
    "HAL0_LOG_LEVEL": "WARNING",
})
PASSWORD = "bench-password-123"


def setup_database(slot_count: int) -> None:
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    from django.contrib.auth import get_user_model

    from slots.models import Node, Slot

    node = Node.local()
    existing = Slot.objects.count()
    Slot.objects.bulk_create([
        Slot(name=f"bench{i:03d}", capability=("chat", "embed", "rerank")[i % 3],
             device="gpu-vulkan", model_name="Qwen3-0.6B-GGUF", node=node,
             state=("offline", "ready", "loading", "error")[i % 4],
             loaded_model="Qwen3-4B-Instruct-2507-GGUF" if i % 5 == 0 else "",
             pinned=i % 7 == 0, keep_loaded=i % 11 == 0, last_load_ms=1000 + i)
        for i in range(slot_count - existing)
    ])
    # the slot page's history and load chart: a slot that has been loaded many times
    from slots.models import SlotEvent

    first = Slot.objects.get(name="bench000")
    SlotEvent.objects.bulk_create([
        SlotEvent(slot=first, slot_name=first.name, action="load", duration_ms=900 + 10 * i,
                  from_state="offline", to_state="ready", model=first.model_name,
                  message=f"loaded in {0.9 + i / 100:.1f} s")
        for i in range(60)])
    get_user_model().objects.create_superuser("bench", "", PASSWORD)


# The pages with a render budget, and what each one's median must stay under (ms).
PAGES = {"/": 60, "/slots/bench000/": 60, "/activity/": 60}


def bench_get(runs: int, path: str = "/") -> dict:
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from slots.models import Slot

    client = Client(HTTP_HOST="127.0.0.1")
    # force_login: django-axes' backend needs the request that Client.login() leaves out
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.get(username="bench"))
    client.get(path)  # warm the template cache
    with CaptureQueriesContext(connection) as queries:
        response = client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    query_count = len(queries)  # now: the log is reset by the requests below
    cards = response.content.count(b'class="slot-card ')
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        client.get(path)
        times.append((time.perf_counter() - started) * 1000)
    return {"path": path, "slots": Slot.objects.count(), "cards": cards, "queries": query_count,
            "median_ms": statistics.median(times), "p95_ms": _p95(times),
            "min_ms": min(times)}


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def bench_push(pushes: int) -> dict:
    """Two websockets as two browsers; one clicks pin/unpin over HTTP (the dashboard's own
    button URL), the other waits for the pushed card."""
    import httpx
    from websockets.asyncio.client import connect

    from tests.harness import free_port
    from tests.sim_fixtures import start_simulator

    sim = start_simulator(load_delay=0.1)
    port = free_port()
    env = {**os.environ, "HAL0_LEMONADE_URL": sim.url}
    from slots.models import Node

    Node.objects.filter(name="local").update(base_url=sim.url)
    server = subprocess.Popen([sys.executable, "manage.py", "serve", "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        http = httpx.Client(base_url=base, timeout=10)
        for _ in range(100):
            try:
                http.get("/accounts/login/")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        login = http.get("/accounts/login/")
        token = login.cookies["csrftoken"]
        http.post("/accounts/login/", data={"username": "bench", "password": PASSWORD,
                                            "csrfmiddlewaretoken": token})
        cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
        headers = {"Cookie": cookie, "Origin": base}
        csrf = http.cookies["csrftoken"]

        async def run() -> list[float]:
            latencies = []
            url = f"ws://127.0.0.1:{port}/ws/slots/"
            async with connect(url, additional_headers=headers) as a, \
                    connect(url, additional_headers=headers) as b:
                await a.recv()
                await b.recv()
                async with httpx.AsyncClient(base_url=base, cookies=http.cookies,
                                             timeout=10) as click:
                    for i in range(pushes):
                        action = "pin" if i % 2 == 0 else "unpin"
                        marker = ">pinned<" if action == "pin" else None
                        started = time.perf_counter()
                        await click.post(f"/slots/chat/do/{action}/",
                                         headers={"HX-Request": "true", "X-CSRFToken": csrf})
                        while True:
                            html = await asyncio.wait_for(b.recv(), 5)
                            if 'id="slot-chat"' in html and \
                                    ((marker in html) if marker else ">pinned<" not in html):
                                break
                        latencies.append((time.perf_counter() - started) * 1000)
            return latencies

        latencies = asyncio.run(run())
    finally:
        server.terminate()
        server.wait(timeout=10)
        sim.stop()
    return {"pushes": len(latencies), "median_ms": statistics.median(latencies),
            "p95_ms": _p95(latencies), "max_ms": max(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=100)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--pushes", type=int, default=50)
    parser.add_argument("--no-push", action="store_true")
    args = parser.parse_args()
    setup_database(args.slots)
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f} at the start")
    ok = True
    for path, budget in PAGES.items():
        get = bench_get(args.runs, path)
        print(f"GET {path} with {get['slots']} slots ({get['cards']} cards): "
              f"{get['queries']} SQL queries, median {get['median_ms']:.1f} ms, "
              f"p95 {get['p95_ms']:.1f} ms, min {get['min_ms']:.1f} ms over {args.runs} runs")
        ok = ok and get["queries"] <= 10 and get["median_ms"] < budget
    if not args.no_push:
        push = bench_push(args.pushes)
        print(f"push latency (action in browser A -> card in browser B): median "
              f"{push['median_ms']:.1f} ms, p95 {push['p95_ms']:.1f} ms, max "
              f"{push['max_ms']:.1f} ms over {push['pushes']} actions")
        ok = ok and push["p95_ms"] < 300
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    print("OK" if ok else "OVER BUDGET (queries <= 10, median < 60 ms, push p95 < 300 ms)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
