"""Gateway benchmark: what hal0's gateway adds to a request, next to a bare passthrough.

    .venv/bin/python bench/gateway.py [--requests 1000] [--concurrency 1,16]
                                      [--stream-requests 200] [--json FILE]

In one run it starts the lemond simulator, hal0 (`manage.py serve`, fresh SQLite in a temp
dir, a token from `manage.py tokens create`) and the bare passthrough (`bench/passthrough.py`:
Daphne + httpx, no auth, no routing), all on loopback, then sends the same non-streaming
chat completion

* directly to the simulator (model = the lemond model),
* through hal0 (model = "chat": token check, routing, model substitution, serving count,
  metrics),
* through hal0 with limits set but never reached (**hal0-limited**: a token with rpm and
  tpm limits, to the slot "chat2" with `max_concurrency` and the same model as "chat"),
* through the passthrough,

`--requests` times per target at each concurrency, interleaved in rounds so that noise
hits every target alike. "Added" latency is a target's percentile minus the direct
percentile; the limits' cost (hal0-limited − hal0) is also given paired by round. Then, with the simulator answering its first token after 50 ms, it measures
the time to the first streamed byte direct and through hal0 (and the passthrough). Last,
with the simulator streaming 2000-word answers as fast as it can (no token delay), it
measures the **relay rate**: streamed bytes per second of wall time over 8 streams at once,
in `--rounds` rounds, per target (hal0's relay against the passthrough's). Then the **SSE
chunk rate**: one stream at a time from an upstream emitting about 2000 SSE chunks per
second (token delay 0.5 ms), events per second as the client receives them. Last, **queue
fairness**: on the slot "chatq" (`max_concurrency` 1, a 100 ms answer), token A sends 20
requests at once and token B one request once A's are queued; B's wait is reported in
service times (the target: at most 2, not 20).
Prints a Markdown report (the "Gateway" section of docs/benchmarks.md) and optionally JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import free_port  # noqa: E402
from tests.sim_fixtures import start_simulator  # noqa: E402

MODEL = "Qwen3-4B-Instruct-2507-GGUF"  # the seeded chat slot's model
# hal0 = `manage.py serve`; hal0-limited = the same process, a token with rpm/tpm limits
# and a slot with max_concurrency, none of them reached
TARGETS = ("direct", "hal0", "hal0-limited", "passthrough")
# the extra slots: "chat2" for hal0-limited (the same model as "chat", so that the two
# targets differ only in their limits), "chatq" for the fairness run
EXTRA_SLOTS = [
    {"name": "chat2", "capability": "chat", "device": "cpu", "model_name": MODEL,
     "max_concurrency": 10_000, "queue_timeout_s": 60, "idle_timeout_s": 0},
    {"name": "chatq", "capability": "chat", "device": "cpu", "model_name": "Qwen3-1.7B-GGUF",
     "max_concurrency": 1, "queue_timeout_s": 120, "idle_timeout_s": 0},
]
UNREACHABLE = str(10**9)  # rpm / tpm limits the benchmark never reaches


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}")
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


class Stack:
    """The simulator, hal0 and the passthrough, started and stopped together."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="hal0-bench-"))
        self.processes: list[subprocess.Popen] = []
        self.sim = None

    def __enter__(self) -> Stack:
        self.sim = start_simulator(load_delay=0.1, ttft=0.0, token_delay=0.001,
                                   max_loaded_models=-1)
        env = {**os.environ, "HAL0_VAR_DIR": str(self.tmp), "HAL0_LEMONADE_URL": self.sim.url,
               "DJANGO_SETTINGS_MODULE": "hal0site.settings", "PYTHONUNBUFFERED": "1",
               "HAL0_LOG_LEVEL": "WARNING"}
        python = sys.executable
        subprocess.run([python, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)

        def manage(*args: str) -> str:
            return subprocess.run([python, "manage.py", *args], cwd=ROOT, env=env, check=True,
                                  capture_output=True, text=True).stdout.strip()

        slots_file = self.tmp / "slots.json"
        slots_file.write_text(json.dumps({"slots": EXTRA_SLOTS}))
        manage("slots", "import", str(slots_file))
        self.token = manage("tokens", "create", "bench")
        self.token_b = manage("tokens", "create", "bench-b")
        self.limited_token = manage("tokens", "create", "bench-limited", "--rpm", UNREACHABLE,
                                    "--tpm", UNREACHABLE)
        self.ports = {"hal0": free_port(), "passthrough": free_port()}
        self._start([python, "manage.py", "serve", "--port", str(self.ports["hal0"]),
                     "--no-reconciler"], env, "hal0")
        self._start([python, "-m", "daphne", "-b", "127.0.0.1", "-p",
                     str(self.ports["passthrough"]), "bench.passthrough:app"],
                    {**env, "PASSTHROUGH_UPSTREAM": self.sim.url}, "passthrough")
        for (name, port), process in zip(self.ports.items(), self.processes, strict=True):
            wait_http(f"http://127.0.0.1:{port}/live" if name == "passthrough"
                      else f"http://127.0.0.1:{port}/api/health", process=process)
        return self

    def _start(self, cmd: list[str], env: dict, name: str) -> None:
        log = open(self.tmp / f"{name}.log", "wb")
        self.processes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                               stderr=subprocess.STDOUT))

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.sim is not None:
            self.sim.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def target(self, name: str) -> tuple[str, dict, str]:
        """(base URL, headers, model) for a target."""
        if name == "direct":
            return self.sim.url, {}, MODEL
        if name == "hal0-limited":
            return (f"http://127.0.0.1:{self.ports['hal0']}",
                    {"Authorization": f"Bearer {self.limited_token}"}, "chat2")
        url = f"http://127.0.0.1:{self.ports[name]}"
        if name == "hal0":
            return url, {"Authorization": f"Bearer {self.token}"}, "chat"
        return url, {}, MODEL


async def run_batch(client: httpx.AsyncClient, url: str, headers: dict, model: str,
                    count: int, concurrency: int) -> tuple[list[float], int]:
    """`count` chat completions with `concurrency` workers: (latencies ms, errors)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8}
    latencies: list[float] = []
    errors = 0
    remaining = count

    async def worker():
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            try:
                response = await client.post(f"{url}/v1/chat/completions", json=body,
                                             headers=headers)
                ok = response.status_code == 200 and b"choices" in response.content
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - start) * 1000.0)
            errors += not ok

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def first_byte(client: httpx.AsyncClient, url: str, headers: dict, model: str) -> float:
    body = {"model": model, "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say hello."}]}
    start = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers=headers) as response:
        response.raise_for_status()
        ttfb = None
        async for _chunk in response.aiter_raw():  # read to the end: a reusable connection
            if ttfb is None:
                ttfb = (time.perf_counter() - start) * 1000.0
    return ttfb


async def relay(client: httpx.AsyncClient, url: str, headers: dict, model: str,
                count: int, concurrency: int) -> float:
    """Streamed bytes per second of wall time over `count` streams (`concurrency` at once)."""
    body = {"model": model, "stream": True,
            "messages": [{"role": "user", "content": "Tell me everything."}]}
    total, remaining = 0, count

    async def worker():
        nonlocal total, remaining
        while remaining > 0:
            remaining -= 1
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                                     headers=headers) as response:
                response.raise_for_status()
                async for chunk in response.aiter_raw():
                    total += len(chunk)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - start)


async def sse_rate(client: httpx.AsyncClient, url: str, headers: dict, model: str) -> float:
    """SSE events per second of one stream, as the client receives them."""
    body = {"model": model, "stream": True,
            "messages": [{"role": "user", "content": "Count to two thousand."}]}
    events = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers=headers) as response:
        response.raise_for_status()
        start = time.perf_counter()
        async for chunk in response.aiter_raw():
            events += chunk.count(b"data: ")
    return events / (time.perf_counter() - start)


async def fairness(stack: Stack, burst: int = 20) -> dict:
    """Token A sends `burst` requests at once to "chatq" (max_concurrency 1), token B one
    request once A's are queued: B's wait in service times."""
    url = f"http://127.0.0.1:{stack.ports['hal0']}"
    body = {"model": "chatq", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Say hello."}]}
    a = {"Authorization": f"Bearer {stack.token}"}
    b = {"Authorization": f"Bearer {stack.token_b}"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
        async def one(headers: dict) -> float:
            start = time.perf_counter()
            response = await client.post(f"{url}/v1/chat/completions", json=body,
                                         headers=headers)
            response.raise_for_status()
            return time.perf_counter() - start

        await one(a)  # loaded
        service = statistics.median([await one(a) for _ in range(10)])
        results = []
        for _ in range(3):
            burst_tasks = [asyncio.ensure_future(one(a)) for _ in range(burst)]
            # until A's burst waits in the queue (the slot's JSON says so), at most 2 s: the
            # head of the burst is being served meanwhile
            deadline = time.monotonic() + 2.0
            depth = 0
            while time.monotonic() < deadline:
                queue = (await client.get(f"{url}/api/slots/chatq/", headers=a)).json()["queue"]
                depth = queue["depth"]
                if depth >= burst - 2:
                    break
                await asyncio.sleep(0.005)
            lone = await one(b)
            burst_times = await asyncio.gather(*burst_tasks)
            results.append({"lone_s": lone, "waited_services": max(0.0, lone - service) / service,
                            "burst_last_s": max(burst_times), "queued_ahead": depth})
    return {"service_s": service, "burst": burst, "runs": results}


async def bench(stack: Stack, requests: int, levels: list[int], stream_requests: int,
                rounds: int) -> dict:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    clients = {name: httpx.AsyncClient(timeout=60, limits=limits, trust_env=False)
               for name in TARGETS}
    results: dict = {"latency": {}, "stream": {}}
    try:
        for name in TARGETS:  # warm up: connections, the chat slot's load, Django's caches
            url, headers, model = stack.target(name)
            await run_batch(clients[name], url, headers, model, 50, 4)
        for concurrency in levels:
            collected = {name: ([], 0) for name in TARGETS}
            paired: list[float] = []  # each round's p50 of hal0-limited minus hal0's
            per_round = max(1, requests // rounds)
            for round_no in range(rounds):
                shift = round_no % len(TARGETS)
                order = TARGETS[shift:] + TARGETS[:shift]
                round_p50 = {}
                for name in order:
                    url, headers, model = stack.target(name)
                    lat, err = await run_batch(clients[name], url, headers, model, per_round,
                                               concurrency)
                    collected[name] = (collected[name][0] + lat, collected[name][1] + err)
                    round_p50[name] = percentile(lat, 0.50)
                paired.append(round_p50["hal0-limited"] - round_p50["hal0"])
            results["latency"][concurrency] = {
                name: {"n": len(lat), "errors": err, "p50": percentile(lat, 0.50),
                       "p99": percentile(lat, 0.99), "mean": statistics.fmean(lat)}
                for name, (lat, err) in collected.items()}
            results["latency"][concurrency]["paired_limits_ms"] = paired
        stack.sim.configure(ttft=0.05)
        ttfb: dict[str, list[float]] = {name: [] for name in TARGETS}
        for i in range(stream_requests):
            shift = i % len(TARGETS)
            for name in TARGETS[shift:] + TARGETS[:shift]:
                url, headers, model = stack.target(name)
                ttfb[name].append(await first_byte(clients[name], url, headers, model))
        results["stream"] = {name: {"n": len(v), "p50": percentile(v, 0.5),
                                    "p99": percentile(v, 0.99)} for name, v in ttfb.items()}
        stack.sim.configure(ttft=0.0, token_delay=0.0, reply_length=2000)
        rates: dict[str, list[float]] = {name: [] for name in TARGETS}
        for round_no in range(rounds):
            shift = round_no % len(TARGETS)
            for name in TARGETS[shift:] + TARGETS[:shift]:
                url, headers, model = stack.target(name)
                rates[name].append(await relay(clients[name], url, headers, model, 8, 8))
        results["relay"] = {name: {"rounds": len(v), "median_bytes_per_s": statistics.median(v)}
                            for name, v in rates.items()}
        stack.sim.configure(ttft=0.0, token_delay=0.0005, reply_length=2000)
        events: dict[str, list[float]] = {name: [] for name in TARGETS}
        for round_no in range(rounds):
            shift = round_no % len(TARGETS)
            for name in TARGETS[shift:] + TARGETS[:shift]:
                url, headers, model = stack.target(name)
                events[name].append(await sse_rate(clients[name], url, headers, model))
        results["sse"] = {name: {"rounds": len(v), "median_events_per_s": statistics.median(v)}
                          for name, v in events.items()}
        stack.sim.configure(ttft=0.1, token_delay=0.001, reply_length=0)
        results["fairness"] = await fairness(stack)
    finally:
        for client in clients.values():
            await client.aclose()
    return results


def report(results: dict, requests: int) -> str:
    lines = []
    for concurrency, row in results["latency"].items():
        paired = row.pop("paired_limits_ms")
        direct = row["direct"]
        added = {name: (row[name]["p50"] - direct["p50"], row[name]["p99"] - direct["p99"])
                 for name in TARGETS[1:]}
        lines += [f"**Concurrency {concurrency}** ({requests} requests per target)", "",
                  "| target | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in TARGETS:
            a50, a99 = added.get(name, (0.0, 0.0))
            lines.append(f"| {name} | {row[name]['p50']:.2f} | {row[name]['p99']:.2f} | "
                         f"{a50:.2f} | {a99:.2f} | {row[name]['errors']} |")
        lines.append("")
        base = added["passthrough"]
        row["added"], row["ratios"] = added, {}
        for name in ("hal0", "hal0-limited"):
            ratios = tuple(a / b if b > 0 else float("inf")
                           for a, b in zip(added[name], base, strict=True))
            row["ratios"][name] = ratios
            lines.append(f"{name} added / passthrough added: p50 **{ratios[0]:.2f}×**, "
                         f"p99 **{ratios[1]:.2f}×**  ")
        extra = row["hal0-limited"]["p50"] - row["hal0"]["p50"]
        row["limits_cost_p50_ms"] = extra
        lines.append(f"limits set, not reached (hal0-limited − hal0), p50: **{extra:+.2f} ms**  ")
        # The same difference taken within each round (the two batches run back to back)
        # and its median over the rounds: the host's speed drifts over a run, and a pooled
        # p50 carries that drift between the targets' batches.
        row["limits_cost_paired_ms"] = statistics.median(paired)
        lines.append(f"the same, paired by round (median of {len(paired)} rounds' p50 "
                     f"differences): **{statistics.median(paired):+.2f} ms**  ")
        lines.append("")
    stream = results["stream"]
    lines += [f"**Streaming, time to first byte** (upstream first token after 50 ms, "
              f"{stream['direct']['n']} streams per target, concurrency 1)", "",
              "| target | p50 ms | p99 ms | p50 / direct |", "|---|---:|---:|---:|"]
    for name in TARGETS:
        lines.append(f"| {name} | {stream[name]['p50']:.2f} | {stream[name]['p99']:.2f} | "
                     f"{stream[name]['p50'] / stream['direct']['p50']:.3f} |")
    rate = results["relay"]
    lines += ["", f"**Streaming relay rate** (2000-word streams, no token delay, concurrency 8, median of "
              f"{rate['direct']['rounds']} rounds)", "",
              "| target | KiB/s | / passthrough |", "|---|---:|---:|"]
    for name in TARGETS:
        value = rate[name]["median_bytes_per_s"]
        lines.append(f"| {name} | {value / 1024:.0f} | "
                     f"{value / rate['passthrough']['median_bytes_per_s']:.3f} |")
    sse = results["sse"]
    lines += ["", f"**SSE chunk rate** (one stream of 2000 chunks, upstream token delay 0.5 ms, "
              f"median of {sse['direct']['rounds']} rounds)", "",
              "| target | events/s | / passthrough |", "|---|---:|---:|"]
    for name in TARGETS:
        value = sse[name]["median_events_per_s"]
        lines.append(f"| {name} | {value:.0f} | "
                     f"{value / sse['passthrough']['median_events_per_s']:.3f} |")
    fair = results["fairness"]
    lines += ["", f"**Queue fairness** (slot max_concurrency 1, service time "
              f"{fair['service_s'] * 1000:.1f} ms; token A sends {fair['burst']} at once, "
              "token B one after them)", "",
              "| run | A's requests queued when B sent | B's latency ms | "
              "B waited (service times) | A's last done ms |",
              "|---:|---:|---:|---:|---:|"]
    for i, run in enumerate(fair["runs"], 1):
        lines.append(f"| {i} | {run['queued_ahead']} | {run['lone_s'] * 1000:.1f} | "
                     f"{run['waited_services']:.2f} | {run['burst_last_s'] * 1000:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--stream-requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    started = time.monotonic()
    load_before = "/".join(f"{x:.2f}" for x in os.getloadavg())
    with Stack() as stack:
        results = asyncio.run(bench(stack, args.requests, levels, args.stream_requests,
                                    args.rounds))
    text = report(results, args.requests)
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    header = (f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}, run took {time.monotonic() - started:.0f} s, "
              f"load average at the end {load} (at the start {load_before})")
    print(header + "\n\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": header, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
