"""What one gateway request costs hal0's `serve` process in CPU time: a figure a shared,
busy machine does not blur the way it blurs wall-clock latency.

    .venv/bin/python bench/gateway_cpu.py [--requests 2000] [--concurrency 1,16]
                                          [--rounds 5] [--root DIR] [--compare DIR ...]
                                          [--limited] [--profile FILE] [--json FILE]

It starts the lemond simulator, `manage.py serve --no-reconciler` (fresh SQLite in a temp
dir, a token from `manage.py tokens create`) and the bare passthrough
(`bench/passthrough.py`), then sends non-streaming chat completions through each, and
reads the user + system CPU time of each server process from /proc/<pid>/stat before and
after every batch. Per request it reports:

* **CPU ms** of hal0's process and of the passthrough's, and their ratio (the passthrough
  does the same HTTP in and out with nothing else: what is left is hal0's own work), and
  how much of it the main thread took (Daphne's event loop, where requests are served;
  the rest is worker threads: database hops, the metrics writer);
* **context switches** of all the process's threads (voluntary + involuntary): a thread
  hop per request (`sync_to_async`, a thread pool) shows here as one or two more;
* the wall-clock p50, for orientation only.

Each figure is the median over `--rounds` batches of `--requests` requests, the targets
interleaved in each round so that the machine's load hits them alike. `--root` runs
another checkout's hal0 instead of this one; `--compare DIR` (repeatable) runs another
checkout's hal0 beside it as `hal0@<dir name>` (e.g. an older commit exported with
`mkdir /tmp/old && git archive COMMIT | tar -x -C /tmp/old`), against the same simulator,
passthrough and client: commits compare directly, in the same run. `--limited` adds
hal0 with a token with rpm/tpm limits and a slot with max_concurrency (none reached;
needs a hal0 that has them). `--profile FILE` runs `serve` under `bench/profiled.py` and
profiles its event-loop thread during the measured hal0 batches (or `--profile-target`'s,
e.g. hal0-limited) at the first concurrency:
it prints the function calls per request and the costliest functions, and keeps the
stats in FILE (`python -m pstats FILE`). Profiling slows hal0 down: its CPU figures in a
`--profile` run are not comparable with a plain run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway import wait_http  # noqa: E402  (the same start-up wait as gateway.py)
from tests.harness import free_port  # noqa: E402
from tests.sim_fixtures import start_simulator  # noqa: E402

MODEL = "Qwen3-4B-Instruct-2507-GGUF"  # the seeded chat slot's model
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
LIMITED_SLOT = {"name": "chat2", "capability": "chat", "device": "cpu",
                "model_name": MODEL, "max_concurrency": 10_000,
                "queue_timeout_s": 60, "idle_timeout_s": 0}


def _cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # utime, stime


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU time so far of the process (all its threads, the dead ones too)
    and of its main thread (under Daphne: the event loop, where requests are served)."""
    return _cpu(Path(f"/proc/{pid}/stat")), _cpu(Path(f"/proc/{pid}/task/{pid}/stat"))


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all the process's threads so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:  # voluntary_… and nonvoluntary_…
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total


class Stack:
    """The simulator, hal0 (from `root`, and from each `compare` checkout) and the
    passthrough, started and stopped together."""

    def __init__(self, root: Path, compare: list[Path], limited: bool,
                 profile: Path | None):
        self.root, self.compare, self.limited, self.profile = root, compare, limited, profile
        self.tmp = Path(tempfile.mkdtemp(prefix="hal0-cpu-"))
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.tokens: dict[str, str] = {}
        self.sim = None

    def __enter__(self) -> Stack:
        self.sim = start_simulator(load_delay=0.1, ttft=0.0, token_delay=0.001,
                                   max_loaded_models=-1)
        self.env = {**os.environ, "HAL0_LEMONADE_URL": self.sim.url,
                    "DJANGO_SETTINGS_MODULE": "hal0site.settings", "PYTHONUNBUFFERED": "1",
                    "HAL0_LOG_LEVEL": "WARNING"}
        self._hal0("hal0", self.root, self.limited, self.profile)
        for other in self.compare:
            self._hal0(f"hal0@{other.name}", other, False, None)
        self.ports["passthrough"] = free_port()
        self._start("passthrough", [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p",
                                    str(self.ports["passthrough"]), "bench.passthrough:app"],
                    {**self.env, "PASSTHROUGH_UPSTREAM": self.sim.url,
                     "PYTHONPATH": str(ROOT)}, ROOT)
        for name, process in self.processes.items():
            wait_http(f"http://127.0.0.1:{self.ports[name]}/"
                      + ("live" if name == "passthrough" else "api/health"),
                      timeout=60, process=process)
        return self

    def _hal0(self, name: str, root: Path, limited: bool, profile: Path | None) -> None:
        """Migrate a fresh database for the checkout `root`, make its tokens, start serve."""
        var = self.tmp / name
        var.mkdir()
        env = {**self.env, "HAL0_VAR_DIR": str(var), "PYTHONPATH": str(root)}

        def manage(*args: str) -> str:
            return subprocess.run([sys.executable, "manage.py", *args], cwd=root, env=env,
                                  check=True, capture_output=True, text=True).stdout.strip()

        manage("migrate", "-v0")
        self.tokens[name] = manage("tokens", "create", "bench")
        if limited:
            slots_file = var / "slots.json"
            slots_file.write_text(json.dumps({"slots": [LIMITED_SLOT]}))
            manage("slots", "import", str(slots_file))
            self.tokens[f"{name}-limited"] = manage(
                "tokens", "create", "bench-limited", "--rpm", str(10**9), "--tpm", str(10**9))
        self.ports[name] = free_port()
        serve = ["serve", "--port", str(self.ports[name]), "--no-reconciler"]
        if profile is not None:
            cmd = [sys.executable, str(ROOT / "bench" / "profiled.py"), *serve]
            env["HAL0_PROFILE_OUT"] = str(profile)
        else:
            cmd = [sys.executable, "manage.py", *serve]
        self._start(name, cmd, env, root)

    def _start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # closed with the process
        self.processes[name] = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log,
                                                stderr=subprocess.STDOUT)

    def __exit__(self, *exc) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.sim is not None:
            self.sim.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def targets(self) -> dict[str, tuple[str, dict, str, int]]:
        """name -> (base URL, headers, model, server pid)."""
        found = {}
        for name, process in self.processes.items():
            url = f"http://127.0.0.1:{self.ports[name]}"
            if name == "passthrough":
                continue
            found[name] = (url, {"Authorization": f"Bearer {self.tokens[name]}"}, "chat",
                           process.pid)
            if f"{name}-limited" in self.tokens:
                found[f"{name}-limited"] = (
                    url, {"Authorization": f"Bearer {self.tokens[name + '-limited']}"},
                    "chat2", process.pid)
        found["passthrough"] = (f"http://127.0.0.1:{self.ports['passthrough']}", {}, MODEL,
                                self.processes["passthrough"].pid)
        return found


async def batch(client: httpx.AsyncClient, url: str, headers: dict, model: str, count: int,
                concurrency: int) -> tuple[list[float], int]:
    """`count` chat completions with `concurrency` workers: (latencies ms, errors)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8}
    latencies: list[float] = []
    errors, remaining = 0, count

    async def worker():
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            try:
                response = await client.post(f"{url}/v1/chat/completions", json=body,
                                             headers=headers)
                errors += response.status_code != 200
            except httpx.HTTPError:
                errors += 1
            latencies.append((time.perf_counter() - start) * 1000.0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def measure(stack: Stack, requests: int, levels: list[int], rounds: int,
                  profiled: str = "hal0") -> dict:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    targets = stack.targets()
    clients = {name: httpx.AsyncClient(timeout=60, limits=limits, trust_env=False)
               for name in targets}
    results: dict = {}
    try:
        for name, (url, headers, model, _) in targets.items():  # connections, load, caches
            await batch(clients[name], url, headers, model, 200, 4)
        await asyncio.sleep(1.0)  # the metrics writer's first batches
        for level_no, concurrency in enumerate(levels):
            samples: dict[str, dict[str, list[float]]] = {
                name: {"cpu_ms": [], "loop_cpu_ms": [], "switches": [], "p50_ms": []} for name in targets}
            errors = dict.fromkeys(targets, 0)
            for round_no in range(rounds):
                names = list(targets)
                shift = round_no % len(names)
                for name in names[shift:] + names[:shift]:
                    url, headers, model, pid = targets[name]
                    profiling = stack.profile is not None and level_no == 0 and name == profiled
                    if profiling:
                        os.kill(pid, signal.SIGUSR1)
                    cpu, switches = cpu_seconds(pid), context_switches(pid)
                    latencies, failed = await batch(clients[name], url, headers, model,
                                                    requests, concurrency)
                    if profiling:
                        os.kill(pid, signal.SIGUSR2)
                    (total, loop), (total_before, loop_before) = cpu_seconds(pid), cpu
                    switches = context_switches(pid) - switches
                    samples[name]["cpu_ms"].append((total - total_before) * 1000.0 / requests)
                    samples[name]["loop_cpu_ms"].append((loop - loop_before) * 1000.0 / requests)
                    samples[name]["switches"].append(switches / requests)
                    samples[name]["p50_ms"].append(statistics.median(latencies))
                    errors[name] += failed
            results[concurrency] = {
                name: {**{key: statistics.median(values) for key, values in figures.items()},
                       "cpu_ms_rounds": figures["cpu_ms"], "errors": errors[name]}
                for name, figures in samples.items()}
    finally:
        for client in clients.values():
            await client.aclose()
    return results


def report(results: dict, requests: int, rounds: int) -> str:
    lines = [f"{rounds} rounds of {requests} requests per target and concurrency; medians", "",
             "| concurrency | target | CPU ms / request | / passthrough | of it, main thread "
             "| ctx switches / request | wall p50 ms | errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for concurrency, row in results.items():
        base = row["passthrough"]["cpu_ms"]
        for name, figures in row.items():
            lines.append(f"| {concurrency} | {name} | {figures['cpu_ms']:.3f} | "
                         f"{figures['cpu_ms'] / base:.2f}× | {figures['loop_cpu_ms']:.3f} | "
                         f"{figures['switches']:.2f} | "
                         f"{figures['p50_ms']:.2f} | {figures['errors']} |")
    return "\n".join(lines)


def profile_report(path: Path, requests: int, rounds: int, top: int = 25) -> str:
    stats = pstats.Stats(str(path))
    measured = requests * rounds
    lines = [f"event-loop thread, {measured} requests profiled: "
             f"{stats.total_calls / measured:.0f} function calls per request "  # type: ignore[attr-defined]
             f"({stats.prim_calls / measured:.0f} primitive)", "",  # type: ignore[attr-defined]
             "| calls / request | own ms / request | cumulative ms / request | function |",
             "|---:|---:|---:|---|"]
    rows = sorted(stats.stats.items(), key=lambda item: item[1][3], reverse=True)  # type: ignore[attr-defined]
    for (file, line, func), (_, calls, own, cumulative, _) in rows[:top]:
        where = f"{Path(file).name}:{line}({func})" if line else func
        lines.append(f"| {calls / measured:.1f} | {own * 1000 / measured:.3f} | "
                     f"{cumulative * 1000 / measured:.3f} | `{where}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the hal0 checkout whose `manage.py serve` runs")
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="another checkout whose serve is measured in the same rounds "
                             "(repeatable)")
    parser.add_argument("--limited", action="store_true",
                        help="also a token with limits and a slot with max_concurrency")
    parser.add_argument("--profile", type=Path, help="profile serve's event loop into FILE")
    parser.add_argument("--profile-target", default="hal0",
                        help="the target --profile profiles (e.g. hal0-limited)")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    load_before = "/".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.monotonic()
    profile = args.profile.resolve() if args.profile else None
    compare = [path.resolve() for path in args.compare]
    with Stack(args.root.resolve(), compare, args.limited, profile) as stack:
        results = asyncio.run(measure(stack, args.requests, levels, args.rounds,
                                        args.profile_target))
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    head = (f"hal0 from {args.root.resolve()}"
            + "".join(f", hal0@{path.name} from {path}" for path in compare)
            + f", {os.cpu_count()} CPUs, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, {time.monotonic() - started:.0f} s, "
            f"load average {load_before} at the start, {load} at the end")
    print(head + "\n\n" + report(results, args.requests, args.rounds))
    if profile is not None:
        print("\n" + profile_report(profile, args.requests, args.rounds))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": head, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
