"""Body-size benchmark: `serve`'s memory while strangers send huge bodies (issue #14,
finding 2; target: a 1.5 GB unauthenticated body leaves `serve` under 150 MiB RSS).

    .venv/bin/python bench/bodies.py [--gb 1.5] [--chunked]

It migrates a throwaway SQLite database, starts `manage.py serve` on a free loopback port
(no lemond needed: the bodies are refused or answered 401/403 before one would be asked),
then streams a body of --gb gigabytes without credentials to /v1/chat/completions,
/api/slots/chat/load and /accounts/login/ in turn, with a Content-Length (or chunked with
--chunked), and reads serve's resident memory (VmRSS) and its peak (VmHWM) from /proc
before and after. Results go to stdout (recorded in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1024 * 1024
PATHS = ("/v1/chat/completions", "/api/slots/chat/load", "/accounts/login/")
TARGET_MIB = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def send(url: str, path: str, size: int, chunked: bool) -> tuple[str, float]:
    """Stream `size` bytes to `path`; (what came back, seconds)."""
    sent = 0

    def body():
        nonlocal sent
        block = b"x" * CHUNK
        while sent < size:
            piece = block[: min(CHUNK, size - sent)]
            sent += len(piece)
            yield piece

    headers = {"Content-Type": "application/json"}
    if not chunked:
        headers["Content-Length"] = str(size)
    started = time.perf_counter()
    try:
        response = httpx.post(f"{url}{path}", content=body(), headers=headers, timeout=120)
        outcome = f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        outcome = f"{exc.__class__.__name__} (connection closed by serve)"
    return f"{outcome} after {sent / 2**20:.0f} MiB sent", time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.5, help="body size in GB (10^9 bytes)")
    parser.add_argument("--chunked", action="store_true",
                        help="send without a Content-Length (chunked transfer encoding)")
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HAL0_", "DATABASE_URL", "REDIS_URL"))}
        env.update(HAL0_VAR_DIR=tmp, HAL0_LOG_LEVEL="WARNING",
                   HAL0_LEMONADE_URL=f"http://127.0.0.1:{free_port()}")
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env,
                       check=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "serve.log", "w")
        proc = subprocess.Popen([sys.executable, "manage.py", "serve", "--port", str(port),
                                 "--no-reconciler"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    print(Path(log.name).read_text())
                    return 1
                time.sleep(0.2)
            rss, peak = memory(proc.pid)
            print(f"serve at rest: RSS {rss:.0f} MiB (peak {peak:.0f} MiB)")
            mode = "chunked" if args.chunked else "with Content-Length"
            for path in PATHS:
                outcome, took = send(url, path, size, args.chunked)
                rss, peak = memory(proc.pid)
                print(f"{args.gb:g} GB {mode} to {path}: {outcome} in {took:.2f} s; "
                      f"serve RSS {rss:.0f} MiB, peak {peak:.0f} MiB")
            ok = httpx.get(f"{url}/api/health", timeout=10).status_code == 200
            print(f"serve still answers: {ok}; peak RSS {peak:.0f} MiB = "
                  f"{peak / TARGET_MIB:.2f}× the {TARGET_MIB} MiB target")
            return 0 if ok and peak < TARGET_MIB else 1
        finally:
            proc.terminate()
            proc.wait(15)
            log.close()


if __name__ == "__main__":
    sys.exit(main())
