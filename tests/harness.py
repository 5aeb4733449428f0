"""The one test harness: free loopback ports, waiting for a condition, and real hal0
processes (`serve`, `reconcile`, Daphne on an ASGI app) on free ports against a database of
the test's choosing (a fresh PostgreSQL database for the scale-out suites), logged in over
HTTP like a browser would be; plus Debian's Chromium for the browser tests.

Every test that starts `serve` does it through `Stack.serve()`; every wait for a condition
goes through `wait_for()`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("HAL0_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_URL = os.environ.get("HAL0_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432/{name}")
REDIS_URL = os.environ.get("HAL0_TEST_REDIS_URL", "redis://127.0.0.1:6379/{db}")
PASSWORD = "stack-test-password"
CHROMIUM = os.environ.get("HAL0_CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = Path(CHROMIUM).exists()


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float = 5.0, interval: float = 0.05):
    """Call `check()` until it returns something truthy; returns (value, seconds taken).
    Fails with the last value after `timeout` seconds."""
    started = time.monotonic()
    while True:
        value = check()
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout} s: {check} (last: {value!r})")
        time.sleep(interval)


async def async_wait_for(check, timeout: float = 5.0, interval: float = 0.05):
    """`wait_for` inside an event loop: awaits `check()` (a coroutine function) until it
    returns something truthy, sleeping without blocking the loop; returns (value, seconds)."""
    import asyncio

    started = time.monotonic()
    while True:
        value = await check()
        if value:
            return value, time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout} s: {check} (last: {value!r})")
        await asyncio.sleep(interval)


def answers(url: str, timeout: float = 1.0) -> bool:
    """True when something answers HTTP at `url` (any status)."""
    try:
        httpx.get(url, timeout=timeout)
        return True
    except httpx.HTTPError:
        return False


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3):
            return True
    except Exception:
        return False


@contextlib.contextmanager
def fresh_postgres_database():
    """A new, empty PostgreSQL database; dropped afterwards. Yields its DATABASE_URL."""
    import psycopg

    name = f"hal0_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.format(name=name)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Stack.setup()'s migrated databases, by admin username, for this test process.
_TEMPLATES: dict[str, Path] = {}


class Stack:
    """hal0 processes sharing one environment (database, channel layer, lemond URL).

    The environment is the test's alone: none of the caller's HAL0_*, DATABASE_URL or
    REDIS_URL leaks in; `HAL0_VAR_DIR` is `tmp_path` (so SQLite lives there unless
    `DATABASE_URL` is given)."""

    def __init__(self, tmp_path: Path, **env: str):
        self.tmp_path = Path(tmp_path)
        clean = {k: v for k, v in os.environ.items()
                 if not k.startswith(("HAL0_", "DATABASE_URL", "REDIS_URL"))}
        self.env = {**clean, "HAL0_VAR_DIR": str(tmp_path), "HAL0_POLL_IDLE_S": "0.5",
                    "HAL0_POLL_ACTIVE_S": "0.25", "PYTHONUNBUFFERED": "1",
                    "DJANGO_SETTINGS_MODULE": "tests.stack_settings", **env}
        self.procs: list[subprocess.Popen] = []

    def manage(self, *args: str, check: bool = True, timeout: float = 120,
               **extra_env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, text=True,
                              capture_output=True, timeout=timeout,
                              env={**self.env, **extra_env})
        if check and proc.returncode != 0:
            raise AssertionError(f"manage.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def setup(self, username: str = "admin") -> None:
        """Migrate and create the `admin` login (password `PASSWORD`).

        On SQLite (no DATABASE_URL) the first setup of each test process does that with
        `manage.py` into a template, and every later one copies the template: two Django
        processes (~3 s of CPU on a slow CI machine) per stack, dozens of stacks per run.
        The one thing the migrations take from the environment, the `local` node's lemond
        URL and keys, is then set as the seed migration would have set it."""
        if "DATABASE_URL" in self.env:
            self._migrate(self.tmp_path, username, self.env)
            return
        template = _TEMPLATES.get(username)
        if template is None:
            where = Path(tempfile.mkdtemp(prefix="hal0-template-"))
            self._migrate(where, username, {**self.env, "HAL0_VAR_DIR": str(where)})
            template = _TEMPLATES[username] = where / "hal0.sqlite3"
        target = self.tmp_path / "hal0.sqlite3"
        with contextlib.closing(sqlite3.connect(template)) as src, \
                contextlib.closing(sqlite3.connect(target)) as dst:
            src.backup(dst)
            dst.execute("UPDATE slots_node SET base_url = ?, api_key = ?, admin_api_key = ? "
                        "WHERE name = 'local'",
                        (self.env.get("HAL0_LEMONADE_URL", "http://127.0.0.1:13305").rstrip("/"),
                         self.env.get("HAL0_LEMONADE_API_KEY", ""),
                         self.env.get("HAL0_LEMONADE_ADMIN_API_KEY", "")))
            dst.commit()

    def _migrate(self, var_dir: Path, username: str, env: dict[str, str]) -> None:
        pw = var_dir / "pw"
        pw.write_text(PASSWORD)
        for args in (("migrate", "--noinput", "-v0"),
                     ("ensure_admin", "--username", username, "--password-file", str(pw))):
            proc = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, text=True,
                                  capture_output=True, timeout=120, env=env)
            if proc.returncode != 0:
                raise AssertionError(f"manage.py {' '.join(args)} failed:\n{proc.stdout}\n"
                                     f"{proc.stderr}")

    def start(self, *args: str, name: str = "serve", python: tuple[str, ...] = ("manage.py",),
              **extra_env: str) -> subprocess.Popen:
        """Start `python manage.py *args` (or `python *python *args`) in its own process
        group, output to a log file in tmp_path."""
        log = open(self.tmp_path / f"{name}-{len(self.procs)}.log", "w")
        proc = subprocess.Popen([sys.executable, *python, *args], cwd=ROOT,
                                env={**self.env, **extra_env}, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()  # the child has its own copy
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def serve(self, *extra: str, app: str | None = None, timeout: float = 60,
              **extra_env: str) -> str:
        """Start `manage.py serve` (or, with `app`, Daphne on that ASGI application) on a
        free port; returns its base URL once it answers. The process is `self.procs[-1]`."""
        port = free_port()
        if app is None:
            proc = self.start("serve", "--port", str(port), *extra, **extra_env)
        else:
            proc = self.start("-b", "127.0.0.1", "-p", str(port), *extra, app, name="daphne",
                              python=("-m", "daphne"), **extra_env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited:\n{Path(proc.log_path).read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                    return url
            time.sleep(0.05)
        raise AssertionError(f"serve did not answer:\n{Path(proc.log_path).read_text()}")

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(10)

    def terminate(self, proc: subprocess.Popen, timeout: float = 10) -> int:
        """SIGTERM one process (its group) and wait; SIGKILL if it does not exit in time."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            return proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill(proc)

    def logs(self) -> str:
        return "\n".join(Path(p.log_path).read_text() for p in self.procs)


def login(url: str, client_class=httpx.Client, username: str = "admin", **kwargs):
    """An httpx client logged in as the stack's admin, sending the CSRF header."""
    client = client_class(base_url=url, timeout=kwargs.pop("timeout", 60), **kwargs)
    if client_class is httpx.Client:
        client.get("/accounts/login/")
        response = client.post("/accounts/login/", data={
            "username": username, "password": PASSWORD,
            "csrfmiddlewaretoken": client.cookies["csrftoken"]})
    else:
        raise TypeError("log in with httpx.Client, then copy its cookies")
    assert response.status_code == 302, response.text[:500]
    client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
    return client


def cookie_for(user) -> tuple[bytes, bytes]:
    """A session cookie for `user` (logged in now, in the test database), as a websocket
    handshake header. Sync: from async code, call it through sync_to_async."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


def redis_available(url: str = "redis://127.0.0.1:6379/0") -> bool:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def websocket(url: str, client: httpx.Client, path: str = "/ws/slots/"):
    """A dashboard websocket on the `serve` at `url`, with `client`'s logged-in session and
    the Origin a browser on that page would send. Returns a `Socket`."""
    from websockets.sync.client import connect

    cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
    ws_url = url.replace("http://", "ws://", 1) + path
    return Socket(connect(ws_url, additional_headers={"Cookie": cookie, "Origin": url},
                          open_timeout=10, max_size=2**24))


class Socket:
    """A websocket that remembers what it received, to wait for a fragment matching a
    condition (`wait(pred, timeout)` -> the message, its arrival time)."""

    def __init__(self, connection):
        self.connection = connection
        self.received: list[tuple[float, str]] = []

    def wait(self, predicate, timeout: float = 10.0, since: float = 0.0) -> tuple[str, float]:
        for at, message in self.received:
            if at >= since and predicate(message):
                return message, at
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching websocket message within {timeout} s; got "
                                     f"{[m[:120] for _, m in self.received[-5:]]}")
            try:
                message = self.connection.recv(timeout=left)
            except TimeoutError:
                continue
            at = time.monotonic()
            self.received.append((at, message))
            if at >= since and predicate(message):
                return message, at

    def drain(self, seconds: float = 0.2) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.received.append((time.monotonic(),
                                      self.connection.recv(timeout=deadline - time.monotonic())))
            except TimeoutError:
                break

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()


def card_state(message: str, slot: str) -> str | None:
    """The `data-state` of slot `slot`'s card in a pushed fragment, if it carries it."""
    import re

    match = re.search(rf'<article id="slot-{re.escape(slot)}"[^>]*data-state="([a-z]+)"', message)
    return match.group(1) if match else None


def in_a_worker_after_the_loop_stopped(fn, *args, timeout: float = 15.0):
    """Call fn(*args) the way a server's worker thread does at shutdown: on a thread that
    sync_to_async started from the server's event loop, after that loop has stopped.
    Returns (result, seconds fn took); fails if fn hangs (waits on the stopped loop)."""
    import asyncio
    import threading

    from asgiref.sync import sync_to_async

    loop = asyncio.new_event_loop()
    loop_stopped = threading.Event()
    outcome: list = []

    def worker():
        loop_stopped.wait(timeout)
        started = time.monotonic()
        result = fn(*args)
        outcome.append((result, time.monotonic() - started))

    async def start_worker():
        return asyncio.ensure_future(sync_to_async(worker, thread_sensitive=False)())

    pending = loop.run_until_complete(start_worker())  # the loop stops; the thread goes on
    loop_stopped.set()
    deadline = time.monotonic() + timeout
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        loop.run_until_complete(pending)  # let a hung call finish so the thread ends
    finally:
        loop.close()
    assert outcome, f"{getattr(fn, '__name__', fn)} hung on the stopped server loop"
    return outcome[0]


@contextlib.contextmanager
def chromium():
    """Debian's headless Chromium through Playwright (`playwright install` cannot download a
    browser here: apt-get install -y chromium), with no traffic of its own (this machine has
    no internet: background networking would only fail)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield browser
        finally:
            browser.close()


def browser_login(browser, url: str, username: str = "operator", *, width: int = 1280,
                  color_scheme: str = "light"):
    """A new browser context logged in to hal0 at `url` through the login form; returns its
    page, on the dashboard. Close it with `page.context.close()`."""
    context = browser.new_context(viewport={"width": width, "height": 900},
                                  color_scheme=color_scheme)
    page = context.new_page()
    page.goto(f"{url}/accounts/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")
    return page


def screenshot_of(page, selector: str, path: str) -> None:
    """A picture of the element `selector` as the page shows it now: the page clipped to the
    element's box. An element screenshot fails when a live push replaces the element while
    Playwright waits for it to be stable ("not attached to the DOM"); the replacement sits
    in the same place, so the clip is the same picture. The box is asked for again while a
    push is swapping the element in (for that instant there is none)."""
    box, _ = wait_for(lambda: page.locator(selector).first.bounding_box(), timeout=10)
    page.screenshot(path=path, clip=box)
