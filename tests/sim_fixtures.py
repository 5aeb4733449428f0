"""Pytest fixtures that run the lemond simulator as a real subprocess on loopback.

Tests talk to it over real HTTP (no mocks of our own client):

    def test_something(lemond_sim):              # shared process, reset before each test
        httpx.post(f"{lemond_sim.url}/v1/load", json={"model_name": "Qwen3-0.6B-GGUF"})
        assert lemond_sim.state()["load_calls_total"] == 1

    def test_old_lemond(lemond_sim_factory):     # a private process with its own options
        sim = lemond_sim_factory(version_shape="10.0", api_key="k")

`start_simulator(**options)` takes the simulator's options (`version_shape`,
`max_loaded_models`, `load_delay`, `pull_delay`, `fail_models`, `api_key`, `admin_api_key`,
`downloaded`, `ttft`, `token_delay`, `verbose`) and optionally `port` and `websocket_port`
(the separate log websocket listener; by default the simulator picks a free one, like
lemond's `websocket_port: "auto"`, and reports it as `websocket_port` in health).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import ROOT, free_port

STARTUP_TIMEOUT = 60.0  # a ceiling: a loaded 2-core CI machine needs more than 15 s

# Fast enough for a test suite, slow enough that "loading" and progress stay observable.
TEST_DEFAULTS: dict[str, Any] = {"load_delay": 0.1, "pull_delay": 0.3, "token_delay": 0.005}

_FLAGS = {
    "version_shape": "--version-shape",
    "max_loaded_models": "--max-loaded-models",
    "load_delay": "--load-delay",
    "pull_delay": "--pull-delay",
    "api_key": "--api-key",
    "admin_api_key": "--admin-api-key",
    "ttft": "--ttft",
    "token_delay": "--token-delay",
    "websocket_port": "--websocket-port",
}


class SimHandle:
    """A running simulator process: its URL plus the `/__sim__/` control surface."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: str,
                 options: dict[str, Any]):
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.options = options

    @property
    def websocket_port(self) -> int | None:
        """The separate websocket listener's port (lemond's `websocket_port`)."""
        return self.state()["websocket_port"]

    def __repr__(self) -> str:
        return f"<SimHandle {self.url} pid={self.process.pid}>"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def _control(self, method: str, path: str, body: dict | None = None) -> dict:
        response = httpx.request(method, f"{self.url}/__sim__/{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def fault(self, kind: str, **params: Any) -> dict:
        """Inject a fault: fail_next_load(model=, message=, count=, transient=), evict_all,
        hang(seconds=), malformed_json, html_error, error_500, restart, clear."""
        return self._control("POST", "fault", {"kind": kind, **params})

    def state(self) -> dict:
        """The simulator's internals (`GET /__sim__/state`)."""
        return self._control("GET", "state")

    def reset(self) -> dict:
        """Back to the startup state: nothing loaded, counters zero, faults cleared."""
        return self._control("POST", "reset")["state"]

    def configure(self, **options: Any) -> dict:
        """Change simulator options live (undone by `reset()`)."""
        return self._control("POST", "configure", options)["state"]

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 10), **kwargs)

    def output(self) -> str:
        """Everything the process printed so far."""
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, as a crash would (for crash/reconnect tests)."""
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM and wait for a clean exit (SIGKILL after 5 s)."""
        if self.alive:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


def _cli_args(options: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        if key in _FLAGS:
            args += [_FLAGS[key], str(value)]
        elif key == "fail_models":
            for name in [value] if isinstance(value, str) else value:
                args += ["--fail-model", name]
        elif key == "downloaded":
            args += ["--downloaded", value if isinstance(value, str) else ",".join(value)]
        elif key == "verbose":
            args += ["--verbose"] if value else []
        else:
            raise TypeError(f"unknown simulator option {key!r}")
    return args


def start_simulator(**options: Any) -> SimHandle:
    """Start the simulator on a free loopback port and wait until `/live` answers.

    It runs as `python -m providers.lemonade.simulator`, the same server `manage.py
    lemond_sim` starts, without setting Django up first: 0.36 s of CPU instead of 0.6 s,
    and the suite starts dozens. `manage=True` starts it through `manage.py lemond_sim`
    (the command users run; tests/test_simulator.py checks it)."""
    port = options.pop("port", None) or free_port()
    manage = options.pop("manage", False)
    args = ["--port", str(port), *_cli_args(options)]
    if manage:
        cmd = [sys.executable, "manage.py", "lemond_sim", *args]
    else:
        cmd = [sys.executable, "-m", "providers.lemonade.simulator", *args]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "hal0site.settings",
           "PYTHONUNBUFFERED": "1"}
    # A file, not a pipe: nobody reads the pipe during the test and a full pipe blocks.
    log = tempfile.NamedTemporaryFile(prefix="lemond-sim-", suffix=".log", delete=False)
    with log:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    handle = SimHandle(process, port, log.name, options)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if not handle.alive:
            break
        try:
            if httpx.get(f"{handle.url}/live", timeout=0.5).status_code == 200:
                return handle
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    output = handle.output()
    handle.kill()
    handle.stop()
    raise RuntimeError(f"lemond simulator did not answer GET /live within {STARTUP_TIMEOUT:.0f}"
                       f" s (exit code {process.returncode}); command: {' '.join(cmd)}\n"
                       f"--- output ---\n{output}")


class _SharedSim:
    """The session's simulator, restarted if a test killed it."""

    def __init__(self):
        self.handle: SimHandle | None = None

    def get(self) -> SimHandle:
        if self.handle is None or not self.handle.alive:
            if self.handle is not None:
                self.handle.stop()
            self.handle = start_simulator(**TEST_DEFAULTS)
        return self.handle

    def close(self) -> None:
        if self.handle is not None:
            self.handle.stop()


@pytest.fixture(scope="session")
def lemond_sim_session():
    shared = _SharedSim()
    yield shared
    shared.close()


@pytest.fixture
def lemond_sim(lemond_sim_session) -> SimHandle:
    """A lemond simulator (v10.6 shape, max_loaded_models 1, fast loads), reset for this
    test. Shared by the session; `configure(...)` changes last until the next test."""
    handle = lemond_sim_session.get()
    handle.reset()
    return handle


@pytest.fixture
def lemond_sim_factory():
    """`start(**options) -> SimHandle` for tests needing a private process (stopped after)."""
    started: list[SimHandle] = []

    def start(**options: Any) -> SimHandle:
        handle = start_simulator(**{**TEST_DEFAULTS, **options})
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()
