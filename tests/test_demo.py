"""`manage.py demo` (what `make demo` runs after installing): from an empty var directory it
migrates, prints the admin login once, starts the lemond simulator when no lemond answers,
serves the dashboard — labelled "simulated" — and stops the simulator again on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.sim_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=0.5)
        return True
    except httpx.HTTPError:
        return False


def test_demo_sets_up_and_serves_with_the_simulator(tmp_path):
    port, sim_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "HAL0_SECRET_KEY")}
    env.update({"HAL0_VAR_DIR": str(tmp_path / "var"), "PYTHONUNBUFFERED": "1",
                "HAL0_LEMONADE_URL": f"http://127.0.0.1:{sim_port}",
                "DJANGO_SETTINGS_MODULE": "hal0site.settings"})
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen([sys.executable, "manage.py", "demo", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not _answers(f"{url}/accounts/login/"):
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert "Database ready." in text
        assert "starting the lemond simulator" in text
        login = re.search(r"Created admin login: (\S+) / (\S+)", text)
        assert login, text
        assert (tmp_path / "var" / "hal0.sqlite3").is_file()
        assert (tmp_path / "var" / "secret_key").is_file()  # a demo key, kept for restarts

        with httpx.Client(base_url=url, timeout=10) as client:
            client.get("/accounts/login/")
            response = client.post("/accounts/login/", data={
                "username": login[1], "password": login[2],
                "csrfmiddlewaretoken": client.cookies["csrftoken"]})
            assert response.status_code == 302, response.text[:300]
            dashboard = client.get("/").text
        assert "simulated" in dashboard
        for seeded in ("chat", "embed", "rerank", "stt", "tts", "img"):
            assert f'id="slot-{seeded}"' in dashboard, seeded
        assert _answers(f"http://127.0.0.1:{sim_port}/live")

        demo.send_signal(signal.SIGINT)  # Ctrl-C
        assert demo.wait(timeout=20) is not None
        deadline = time.monotonic() + 10
        while _answers(f"http://127.0.0.1:{sim_port}/live"):
            assert time.monotonic() < deadline, "the simulator outlived the demo"
            time.sleep(0.2)
        assert "Traceback" not in log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
