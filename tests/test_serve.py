"""`manage.py serve` as a process: it answers, runs the reconciler inside, and on SIGTERM
exits cleanly and gives its node leases back (another process can take over at once)."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.sim_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent


def leases(db: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute("SELECT name, holder FROM slots_lease").fetchall()


def test_serve_polls_and_releases_its_leases_on_sigterm(tmp_path, lemond_sim):
    env = {**os.environ, "HAL0_VAR_DIR": str(tmp_path), "HAL0_LEMONADE_URL": lemond_sim.url,
           "HAL0_POLL_IDLE_S": "0.3", "DATABASE_URL": ""}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env,
                   check=True, timeout=120)
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "manage.py", "serve", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        db = tmp_path / "hal0.sqlite3"
        deadline = time.monotonic() + 30
        while not leases(db):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/api/health").json()["status"] == "ok"
        [(name, holder)] = leases(db)
        assert name == "reconciler:local" and f":{proc.pid}:" in holder
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert leases(db) == []
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
