"""Several processes: two `serve --no-reconciler` and `manage.py reconcile` on PostgreSQL and
Redis cooperate. A change made through one serve reaches a dashboard on the other; the
reconciler's observations reach dashboards on both; one reconciler polls a node at a time,
and another takes its lease over once it expires after a SIGKILL (TTL 10 s).

The first tests exercise the lease itself (any database, in-process)."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from slots import leases
from slots.models import Lease, Node
from slots.reconciler import Reconciler
from tests.harness import (
    REDIS_URL,
    Stack,
    card_state,
    fresh_postgres_database,
    login,
    postgres_available,
    redis_available,
    wait_for,
    websocket,
)
from tests.sim_fixtures import TEST_DEFAULTS, start_simulator

CHAT_MODEL = "Qwen3-4B-Instruct-2507-GGUF"


# --- the lease ---------------------------------------------------------------------------------

@pytest.mark.django_db
def test_a_lease_has_one_holder_until_it_expires():
    assert leases.acquire("reconciler:n", "box:1:a", ttl=0.6)
    assert not leases.acquire("reconciler:n", "box:2:b", ttl=0.6)  # held
    assert leases.acquire("reconciler:n", "box:1:a", ttl=0.6)  # renewed
    assert leases.holders() == {"n": "box:1:a"}
    time.sleep(0.8)
    assert leases.holders() == {}
    assert leases.acquire("reconciler:n", "box:2:b", ttl=5)  # expired: taken over
    assert not leases.acquire("reconciler:n", "box:1:a", ttl=5)
    assert Lease.objects.get(name="reconciler:n").holder == "box:2:b"
    assert leases.release(["reconciler:n"], "box:1:a") == 0  # not the holder's to give
    assert leases.release(["reconciler:n"], "box:2:b") == 1
    assert leases.acquire("reconciler:n", "box:1:a", ttl=5)


@pytest.mark.django_db
def test_a_lease_left_by_a_dead_process_on_this_host_is_taken_at_once():
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    assert leases.acquire("reconciler:n", f"{host}:{dead}:old", ttl=60)
    assert leases.acquire("reconciler:n", leases.new_holder_id(), ttl=60)
    # a live holder (this process) keeps it; so does one on another host
    assert not leases.acquire("reconciler:n", f"{host}:1:x", ttl=60) or \
        Lease.objects.get(name="reconciler:n").holder == f"{host}:1:x"
    Lease.objects.all().delete()
    assert leases.acquire("reconciler:m", f"elsewhere:{dead}:old", ttl=60)
    assert not leases.acquire("reconciler:m", leases.new_holder_id(), ttl=60)


@pytest.mark.django_db
def test_a_reconciler_polls_only_the_nodes_whose_lease_it_holds(settings):
    settings.HAL0_LEASE_TTL_S = 10
    Node.local()
    other = Node.objects.create(name="other", base_url="http://127.0.0.1:9")
    first, second = Reconciler(), Reconciler()
    nodes = list(Node.objects.filter(enabled=True))
    first.keep_leases(nodes)
    second.keep_leases(nodes)
    assert first.holds("local") and first.holds("other")
    assert not second.holds("local") and not second.holds("other")
    # a disabled node's lease is given back; the other reconciler may take it
    other.enabled = False
    other.save()
    first.keep_leases([n for n in nodes if n.name != "other"])
    assert not first.holds("other") and "other" not in leases.holders()
    first.release_leases()
    second.keep_leases(nodes)
    assert second.holds("local")


# --- real processes on PostgreSQL + Redis -------------------------------------------------------

def scaleout(test):
    """Needs the real PostgreSQL and Redis on 127.0.0.1 (skipped cleanly without them)."""
    for mark in (pytest.mark.e2e, pytest.mark.scaleout,
                 pytest.mark.skipif(not postgres_available(),
                                    reason="needs PostgreSQL on 127.0.0.1:5432"),
                 pytest.mark.skipif(not redis_available(),
                                    reason="needs Redis on 127.0.0.1:6379")):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A simulator, a fresh PostgreSQL database, a Redis database of its own, two
    `serve --no-reconciler` and one `reconcile`."""
    if not (postgres_available() and redis_available()):
        pytest.skip("needs PostgreSQL and Redis on 127.0.0.1")
    sim = start_simulator(**{**TEST_DEFAULTS, "load_delay": 0.3})
    try:
        with fresh_postgres_database() as database_url:
            # channel names of its own: other runs' dashboards must not see our pushes
            stack = Stack(tmp_path_factory.mktemp("cluster"), DATABASE_URL=database_url,
                          REDIS_URL=REDIS_URL.format(db=0),
                          HAL0_REDIS_PREFIX=f"hal0-test-{uuid.uuid4().hex}",
                          HAL0_LEMONADE_URL=sim.url,
                          HAL0_POLL_ACTIVE_S="0.25", HAL0_POLL_IDLE_S="0.25")
            stack.setup()
            try:
                a = stack.serve("--no-reconciler")
                b = stack.serve("--no-reconciler")
                reconciler = stack.start("reconcile", name="reconcile", HAL0_HOSTNAME="box-1")
                # Its first poll done: until then it has no picture of lemond to compare, and
                # an unload it finds reads "not loaded when the reconciler started" (a loaded
                # CI machine takes seconds to start Django).
                wait_for(lambda: node_last_seen(database_url) is not None, timeout=60)
                yield {"stack": stack, "sim": sim, "a": a, "b": b, "reconciler": reconciler,
                       "database_url": database_url.replace("postgres://", "postgresql://")}
            finally:
                stack.stop()
                assert "Traceback" not in stack.logs(), stack.logs()[-5000:]
    finally:
        sim.stop()


def node_last_seen(database_url: str, node: str = "local"):
    with psycopg.connect(database_url.replace("postgres://", "postgresql://")) as conn:
        return conn.execute("SELECT last_seen FROM slots_node WHERE name = %s",
                            (node,)).fetchone()[0]


def lease_holder(cluster, node: str = "local") -> str | None:
    with psycopg.connect(cluster["database_url"]) as conn:
        row = conn.execute("SELECT holder FROM slots_lease WHERE name = %s AND expires_at > now()",
                           (f"reconciler:{node}",)).fetchone()
    return row[0] if row else None


def holder_pid(holder: str | None) -> int | None:
    return int(holder.split(":")[1]) if holder else None


@scaleout
def test_an_action_through_one_serve_is_pushed_to_a_dashboard_on_the_other(cluster):
    a, b = cluster["a"], cluster["b"]
    client_a, client_b = login(a), login(b)
    socket_a = websocket(a, client_a)
    try:
        socket_a.wait(lambda m: 'id="slot-chat"' in m)  # the resync on connect
        started = time.monotonic()
        response = client_b.post("/api/slots/chat/load")
        assert response.status_code == 200, response.text
        _, at = socket_a.wait(lambda m: card_state(m, "chat") == "ready", since=started)
        print(f"\naction on serve B -> card on serve A's dashboard: {(at - started) * 1000:.0f} ms "
              "(includes the 0.3 s load)")
        assert client_a.get("/api/slots/chat/").json()["state"] == "ready"
    finally:
        socket_a.close()
        client_a.close()
        client_b.close()


@scaleout
def test_the_reconcilers_observations_reach_dashboards_on_both_serves(cluster):
    a, b, sim = cluster["a"], cluster["b"], cluster["sim"]
    client_a = login(a)
    if client_a.get("/api/slots/chat/").json()["state"] != "ready":
        assert client_a.post("/api/slots/chat/load").status_code == 200
    sockets = [websocket(a, client_a), websocket(b, login(b))]
    try:
        for sock in sockets:
            sock.wait(lambda m: 'id="slot-chat"' in m)
        started = time.monotonic()
        httpx.post(f"{sim.url}/v1/unload", json={"model_name": CHAT_MODEL}, timeout=10)
        for name, sock in zip("AB", sockets, strict=True):
            message, at = sock.wait(lambda m: card_state(m, "chat") == "offline", since=started)
            assert "unloaded outside hal0" in message, message.split("<footer")[0][-1500:]
            print(f"\nlemond change -> reconcile process -> dashboard on serve {name}: "
                  f"{(at - started) * 1000:.0f} ms")
    finally:
        for sock in sockets:
            sock.close()


def slot_state(cluster, name: str) -> str:
    with psycopg.connect(cluster["database_url"]) as conn:
        return conn.execute("SELECT state FROM slots_slot WHERE name = %s",
                            (name,)).fetchone()[0]


@scaleout
def test_serving_holds_while_another_serve_streams(cluster):
    """On PostgreSQL: a short gateway request ending on serve B does not turn the slot
    ready while serve A still streams from it; both claims are gone afterwards."""
    a, b, sim = cluster["a"], cluster["b"], cluster["sim"]
    token = cluster["stack"].manage("tokens", "create", "serving-test").stdout.split()[-1]
    headers = {"Authorization": f"Bearer {token}"}
    body = {"model": "chat", "messages": [{"role": "user", "content": "Say hello."}]}
    assert httpx.post(f"{a}/v1/chat/completions", json=body, headers=headers,
                      timeout=30).status_code == 200
    wait_for(lambda: slot_state(cluster, "chat") == "ready", timeout=5)
    # a ~6 s stream: long enough to outlast the steps below on a busy, slow machine
    sim.configure(token_delay=0.15, reply_length=40)
    try:
        with httpx.stream("POST", f"{a}/v1/chat/completions", headers=headers, timeout=30,
                          json={**body, "stream": True}) as response:
            chunks = response.iter_raw()
            next(chunks)
            wait_for(lambda: slot_state(cluster, "chat") == "serving", timeout=5)
            short = httpx.post(f"{b}/v1/chat/completions", headers=headers, timeout=30,
                               json={**body, "max_tokens": 1})
            assert short.status_code == 200, short.text
            time.sleep(1.0)  # well past B's serving linger (0.5 s)
            assert slot_state(cluster, "chat") == "serving"
            for _ in chunks:
                pass
    finally:
        sim.configure(token_delay=TEST_DEFAULTS.get("token_delay", 0.01), reply_length=0)
    wait_for(lambda: slot_state(cluster, "chat") == "ready", timeout=5)
    with psycopg.connect(cluster["database_url"]) as conn:
        claims = conn.execute("SELECT count(*) FROM slots_lease WHERE name LIKE 'serving:%'")
        assert claims.fetchone()[0] == 0


@scaleout
def test_a_tokens_rate_limits_hold_across_both_serves_on_redis(cluster):
    """The windows live in Redis: requests on A and B count against one limit, and tokens
    charged by a response on A refuse the next request on B."""
    a, b, stack = cluster["a"], cluster["b"], cluster["stack"]
    body = {"model": "chat", "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 4}

    def post(url: str, token: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {token}"})

    rpm = stack.manage("tokens", "create", "three-a-minute", "--rpm", "3").stdout.strip()
    answers = [post(a, rpm), post(b, rpm), post(a, rpm)]
    assert [r.status_code for r in answers] == [200, 200, 200], answers[-1].text
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0"]
    refused = post(b, rpm)
    assert refused.status_code == 429
    assert refused.reason_phrase == "Too Many Requests"  # not Twisted's "Unknown Status"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "3"

    tpm = stack.manage("tokens", "create", "one-token-a-minute", "--tpm", "1").stdout.strip()
    first = post(a, tpm)
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "1"
    # A charges Redis right after its response: B soon refuses for tokens
    wait_for(lambda: post(b, tpm).status_code == 429, timeout=10)
    error = post(b, tpm).json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"


@scaleout
def test_one_reconciler_polls_a_node_and_another_takes_over_after_its_lease_ttl(cluster):
    stack, sim, a = cluster["stack"], cluster["sim"], cluster["a"]
    first = cluster["reconciler"]  # on "box-1"
    wait_for(lambda: holder_pid(lease_holder(cluster)) == first.pid, timeout=30)
    second = stack.start("reconcile", name="reconcile", HAL0_HOSTNAME="box-2")
    time.sleep(3)  # several lease attempts and poll periods
    assert holder_pid(lease_holder(cluster)) == first.pid
    assert "polling node local" in Path(first.log_path).read_text()
    assert "polling node" not in Path(second.log_path).read_text()

    client = login(a)
    dashboard = websocket(a, client)
    try:
        dashboard.wait(lambda m: 'id="slot-chat"' in m)
        if client.get("/api/slots/chat/").json()["state"] == "ready":
            assert client.post("/api/slots/chat/unload").status_code == 200
        stack.kill(first)  # SIGKILL on "box-1": no chance to give the lease back
        killed = time.monotonic()
        # lemond changes while nobody polls: the new holder must find out
        httpx.post(f"{sim.url}/v1/load", json={"model_name": CHAT_MODEL}, timeout=10)
        # The lease TTL is 10 s, so the takeover takes 10-11 s (printed; docs/scaleout.md).
        # The checks allow 30 s: a CI machine running four workers on two cores may stretch
        # it, and what is tested is that it happens, without the first process's help.
        _, took_over = wait_for(lambda: holder_pid(lease_holder(cluster)) == second.pid,
                                timeout=30, interval=0.1)
        _, seen_at = dashboard.wait(lambda m: card_state(m, "chat") == "ready", since=killed,
                                    timeout=max(0.1, 30 - (time.monotonic() - killed)))
        print(f"\nanother box: lease taken over {took_over:.1f} s after SIGKILL; the change "
              f"was on the dashboard {seen_at - killed:.1f} s after it")
        assert took_over >= 5  # not before the dead holder's lease expired
        assert client.get("/api/slots/chat/").json()["state"] == "ready"  # adopted
        assert "polling node local" in Path(second.log_path).read_text()

        # a reconciler restarted on the same box takes a dead one's lease at once
        third = stack.start("reconcile", name="reconcile", HAL0_HOSTNAME="box-2")
        # running (a slow machine takes seconds to start Django), and polling nothing
        wait_for(lambda: "reconciler" in Path(third.log_path).read_text()
                 and " started" in Path(third.log_path).read_text(), timeout=30)
        time.sleep(1)
        assert holder_pid(lease_holder(cluster)) == second.pid
        stack.kill(second)
        killed = time.monotonic()
        _, took_over = wait_for(lambda: holder_pid(lease_holder(cluster)) == third.pid,
                                timeout=15, interval=0.1)
        print(f"same box: lease taken over {took_over:.1f} s after SIGKILL")
        assert took_over < 3
        httpx.post(f"{sim.url}/v1/unload", json={"model_name": CHAT_MODEL}, timeout=10)
        dashboard.wait(lambda m: card_state(m, "chat") == "offline", since=killed, timeout=5)
    finally:
        dashboard.close()
        client.close()
    # a clean stop gives the lease back at once
    third.send_signal(signal.SIGTERM)
    third.wait(10)
    assert lease_holder(cluster) is None
    assert "reconciler stopped" in Path(third.log_path).read_text()
