"""Shared fixtures: a real lemond simulator on a free loopback port, nodes and slots
pointing at it, logged-in users. Module-specific fixtures live in their test modules."""

from __future__ import annotations

import functools

import httpx._transports.default
import pytest

from tests.harness import cookie_for

pytest_plugins = ("tests.sim_fixtures",)

# Every httpx.Client (and so every httpx.get/post) builds an SSL context and loads certifi's
# CA bundle into it: ~25 ms of CPU for a client that then talks plain HTTP to loopback. The
# suite's polling loops made thousands of them (half a minute of CPU in test_serve alone).
# The tests make no TLS connection, so one context per argument set serves them all; hal0's
# own processes (serve, the simulators) are untouched.
httpx._transports.default.create_ssl_context = functools.lru_cache(maxsize=8)(
    httpx._transports.default.create_ssl_context)


# The modules that take longest, longest first (wall time summed over a run on the 2-core
# machine). `make test` runs files on parallel workers in collection order
# (--no-loadscope-reorder; xdist's own order is by test count, which started these few-test,
# long modules last and left one worker running them alone at the end). Longest first keeps
# the workers' ends close; a module missing here only runs later, never wrongly.
LONGEST_FIRST = ("test_serve", "test_gateway", "test_a11y", "test_security", "test_simulator",
                 "test_faults", "test_multiprocess", "test_gateway_limits", "test_installer",
                 "test_browser_capacity", "test_browser_cockpit", "test_browser",
                 "test_actions", "test_clients", "test_client", "test_nodes",
                 "test_reconciler", "test_lemond_truth", "test_simulator_v11", "test_views",
                 "test_concurrency", "test_properties")


def _module_rank(item) -> int:
    module = getattr(item, "module", None)
    name = module.__name__.rpartition(".")[2] if module else ""
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_module_rank)  # stable: a module's own order is kept
    _require_services(items)


def _require_services(items):
    """With HAL0_REQUIRE_SERVICES=1 (set by .ci/run) a missing PostgreSQL, Redis or
    Chromium fails the run at once instead of skipping the suites that need them: CI must
    never go green without the scale-out and browser tests."""
    import os

    if os.environ.get("HAL0_REQUIRE_SERVICES") != "1":
        return
    from tests.harness import CHROMIUM, HAVE_CHROMIUM, postgres_available, redis_available

    markers = {m.name for item in items for m in item.iter_markers()}
    missing = []
    if "scaleout" in markers and not postgres_available():
        missing.append("PostgreSQL on 127.0.0.1:5432 (user postgres, trust)")
    if "scaleout" in markers and not redis_available():
        missing.append("Redis on 127.0.0.1:6379")
    if "browser" in markers and not HAVE_CHROMIUM:
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if missing:
        raise pytest.UsageError("HAL0_REQUIRE_SERVICES=1 but these are missing: "
                                + "; ".join(missing))


@pytest.fixture(scope="session", autouse=True)
def _fast_password_hashing():
    """Django's advice for test suites: PBKDF2 spends ~0.25 s of CPU per hash by design, and
    every admin user and login here would pay it (tests.stack_settings does the same for
    the processes the tests start)."""
    from django.conf import settings
    from django.test import override_settings

    # new hashes are MD5; the others still check what hal0's own processes stored
    hashers = ["django.contrib.auth.hashers.MD5PasswordHasher", *settings.PASSWORD_HASHERS]
    with override_settings(PASSWORD_HASHERS=hashers):
        yield


@pytest.fixture
def fresh_boot(monkeypatch):
    """In this process, time.monotonic() reads as on a machine booted a second ago (and
    runs on from there): an appliance starts hal0 seconds after power-on. `make
    test-fresh-boot` does the same for the whole suite and its subprocesses."""
    import time

    real = time.monotonic
    offset = real() - 1.0
    monkeypatch.setattr(time, "monotonic", lambda: real() - offset)
    return offset


@pytest.fixture
def sim(lemond_sim):
    """The shared simulator (v10.6 shape, one model per type, fast loads), reset to its
    startup state: nothing loaded, no faults. `lemond_sim_factory` starts private ones."""
    return lemond_sim


@pytest.fixture
def node(db, sim):
    """The `local` node, pointed at the simulator."""
    from slots.models import Node

    local = Node.local()
    local.base_url = sim.url
    local.save()
    return local


@pytest.fixture
def dead_node(db):
    """The `local` node pointed at a loopback port where nothing listens."""
    from slots.models import Node
    from tests.harness import free_port

    local = Node.local()
    local.base_url = f"http://127.0.0.1:{free_port()}"
    local.save()
    return local


@pytest.fixture
def session_cookie(admin_user):
    """A logged-in admin's session cookie, as a websocket handshake header."""
    return cookie_for(admin_user)


@pytest.fixture
def make_slot(db):
    """A factory for extra slots: make_slot("chat2", capability="chat", …)."""
    from slots.models import Node, Slot

    def make(name: str, **fields):
        fields.setdefault("capability", "chat")
        fields.setdefault("device", "gpu-vulkan")
        fields.setdefault("model_name", "Qwen3-0.6B-GGUF")
        fields.setdefault("node", Node.local())
        slot = Slot(name=name, **fields)
        slot.full_clean()
        slot.save()
        return slot

    return make


@pytest.fixture
def admin_user(db, django_user_model):
    return django_user_model.objects.create_superuser("boss", "", "correct-horse-battery")


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.fixture(autouse=True)
def hal0_runtime():
    """A fresh `Runtime` for every test (executors, in-flight counts, downloads): what
    `serve` builds, with database passes on the test's own connection."""
    from slots.runtime import Runtime

    runtime = Runtime(own_db_thread=False).start()
    yield runtime
    runtime.stop(grace=0)


@pytest.fixture(autouse=True)
def _seeded_slots(request, hal0_runtime):
    """Transactional tests flush the database, seeded rows included; put them back so every
    database test starts from what `migrate` gives a fresh install."""
    marker = request.node.get_closest_marker("django_db")
    wants_db = marker is not None or {"db", "transactional_db"} & set(request.fixturenames)
    if not wants_db:
        yield
        return
    transactional = "transactional_db" in request.fixturenames or (
        marker is not None and marker.kwargs.get("transaction"))
    request.getfixturevalue("transactional_db" if transactional else "db")
    from django.apps import apps

    from slots.models import Slot

    if not Slot.objects.filter(seeded=True).exists():
        import importlib

        seed = importlib.import_module("slots.migrations.0002_seed_default_slots").seed
        seed(apps, None)
    yield
    # Actions a test started in the background must not write into the next test's rows
    # (a flushed SQLite database reuses primary keys).
    if transactional:
        assert hal0_runtime.wait_idle(30), "a background action outlived its test"
    else:
        # The test's transaction holds SQLite's write lock until its rollback, after this:
        # an action on a worker (its own connection) can neither see the test's rows nor
        # write, and would only give up after the 20 s busy timeout. Say so at once.
        assert hal0_runtime.wait_idle(BLOCKED_ACTION_S), (
            "a background action is stuck behind this test's uncommitted transaction: "
            "mark the test @pytest.mark.django_db(transaction=True)")


# Far below SQLite's 20 s busy timeout, far above an action that is not blocked.
BLOCKED_ACTION_S = 5.0


@pytest.fixture
def busy_owner(db):
    """Put a slot in a busy state owned (slots.busy) by the process `pid` on `host` (this
    host by default), as an action of that process would: busy_owner("chat", pid).
    `dead_pid()` gives the pid of a process that has exited."""
    from datetime import timedelta

    from django.utils import timezone

    from slots import busy, leases
    from slots.models import Lease, Slot

    def own(name: str, pid: int, *, state: str = "loading", host: str | None = None,
            expires_in: float = 60.0) -> str:
        host = host or leases.new_holder_id().split(":")[0]
        holder = f"{host}:{pid}:test"
        slot = Slot.objects.get(name=name)
        Slot.objects.filter(pk=slot.pk).update(state=state, state_message=f"{state} it",
                                               state_changed_at=timezone.now())
        Lease.objects.update_or_create(name=busy.lease_name(slot.pk), defaults={
            "holder": holder, "expires_at": timezone.now() + timedelta(seconds=expires_in)})
        return holder

    return own


@pytest.fixture
def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
