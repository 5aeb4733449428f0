"""`manage.py demo` (what `make demo` runs after installing): from an empty var directory it
migrates, prints the admin login once, starts the lemond simulator when no lemond answers,
serves the dashboard — labelled "simulated" — and stops the simulator again on Ctrl-C."""

from __future__ import annotations

import re
import signal

import httpx
import pytest

from tests.harness import Stack, answers, free_port, wait_for

pytestmark = pytest.mark.e2e


def test_demo_sets_up_and_serves_with_the_simulator(tmp_path):
    port, sim_port = free_port(), free_port()
    var = tmp_path / "var"
    var.mkdir()
    stack = Stack(var, HAL0_LEMONADE_URL=f"http://127.0.0.1:{sim_port}")
    demo = stack.start("demo", "--port", str(port), name="demo")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: demo.poll() is not None or answers(f"{url}/accounts/login/"),
                 timeout=90, interval=0.1)
        assert demo.poll() is None, stack.logs()
        text = stack.logs()
        assert "Database ready." in text
        assert "starting the lemond simulator" in text
        login = re.search(r"Created admin login: (\S+) / (\S+)", text)
        assert login, text
        assert (var / "hal0.sqlite3").is_file()
        assert (var / "secret_key").is_file()  # a demo key, kept for restarts

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
        assert answers(f"http://127.0.0.1:{sim_port}/live")

        demo.send_signal(signal.SIGINT)  # Ctrl-C
        assert demo.wait(timeout=20) is not None
        wait_for(lambda: not answers(f"http://127.0.0.1:{sim_port}/live"), timeout=10)
        assert "Traceback" not in stack.logs()
    finally:
        stack.stop()
