"""The lemond boundary: what each version can do (`versions`), which model names may go into
a URL (`names`), the one client seam (`client_for`), and lemond's answers read as untrusted
input (`untrusted`, `logs`). Real HTTP to the simulator or to small loopback servers;
MockTransport only for data the simulator cannot produce (NaN, lone surrogates)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from asgiref.sync import sync_to_async

from providers.lemonade import catalog, logs, names, untrusted, versions
from providers.lemonade.client import LemonadeClient, client_for, parse_health
from providers.lemonade.errors import LemonadeNotFound, error_from_response

# --- versions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version,expected", [
    # version: (api prefix, pins, log transport, logs on main port, stt type, rerank route,
    #           stats totals, npu args key, options endpoint)
    ("9.1.0", ("/api", False, "sse", False, "audio", "reranking", False, None, False)),
    ("10.0.0-sim", ("/api", False, "sse", False, "audio", "reranking", False, "flm_args",
                    False)),
    ("10.1.0", ("", False, "websocket", False, "audio", "reranking", False, "flm_args", False)),
    ("10.5.0", ("", False, "websocket", False, "transcription", "reranking", False, "flm_args",
                False)),
    ("10.6.0", ("", False, "websocket", False, "transcription", "reranking", False, "flm_args",
                False)),
    ("10.7.0", ("", False, "websocket", False, "transcription", "reranking", True, "flm_args",
                False)),
    ("10.8.1", ("", True, "websocket", True, "transcription", "reranking", True, None, False)),
    ("10.10.0", ("", True, "websocket", True, "transcription", "reranking", True, None, False)),
    ("11.0.0", ("", True, "websocket", True, "transcription", "reranking", True, "flm_args",
                False)),
    ("11.6.0", ("", True, "websocket", True, "transcription", "rerank", True, "flm_args",
                False)),
    ("11.7.0-sim", ("", True, "websocket", True, "transcription", "rerank", True, "flm_args",
                    True)),
])
def test_capabilities_by_version(version, expected):
    caps = versions.for_version(version)
    assert (caps.api_prefix, caps.pins, caps.log_transport, caps.logs_on_main_port,
            caps.transcription_type, caps.rerank_route, caps.stats_totals, caps.npu_args_key,
            caps.model_options) == expected


def test_an_unknown_version_gets_the_pinned_versions_rules():
    unknown, pinned = versions.for_version(""), versions.for_version(versions.PINNED)
    assert not unknown.known and pinned.known
    assert unknown.rerank_route == pinned.rerank_route == "reranking"
    assert unknown.pins is pinned.pins is False
    assert versions.for_version("garbage").rerank_route == "reranking"
    assert versions.parse_version("v11.7.0-rc1") == (11, 7, 0)


def test_where_the_log_streams():
    url = "https://lemond.lan:13305/"
    assert versions.for_version("10.0.0").logs_url(url, 9000) == \
        "https://lemond.lan:13305/api/v1/logs/stream"
    assert versions.for_version("10.6.0").logs_url(url, 9000) == "wss://lemond.lan:9000/logs/stream"
    assert versions.for_version("10.6.0").logs_url("http://[::1]:1", 2) == "ws://[::1]:2/logs/stream"
    assert versions.for_version("10.8.0").logs_url(url, 9000) == \
        "wss://lemond.lan:13305/logs/stream"


def test_only_versions_compares_lemond_version_numbers():
    """The rule of issue #10 part 4, kept by a test: outside `providers/lemonade/versions.py`
    (and the simulator, which plays every version) nothing parses or compares lemond
    versions; everything asks `versions.for_version()` (or `Node.lemond`)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    comparison = re.compile(r"parse_version\(|version_tuple|[<>]=? ?\(1[01], ?\d+")
    offenders = [
        str(path.relative_to(root))
        for package in ("providers", "slots", "hal0site", "installer")
        for path in (root / package).rglob("*.py")
        if "simulator" not in path.parts and path.name != "versions.py"
        and comparison.search(path.read_text())
    ]
    assert offenders == []


# --- model names -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "Qwen3-0.6B-GGUF", "user.My-Model", "builtin.Qwen3-0.6B-GGUF", "extra.model.Q4_K_M",
    "Lite Collection", "a..b", "x:y", "名前",
])
def test_names_lemond_uses_are_accepted(name):
    assert names.model_name_problem(name) == ""


@pytest.mark.parametrize("name", [
    "", "..", ".", "../../internal/config", "../../v1/system-info", "a/b", "a\\b",
    "a%2Fb", "%2e%2e", "a?b", "a#b", "a\nb", "a\x00b", " lead", "trail ", "x" * 201,
    "\ud800", None, 5,
])
def test_names_that_could_leave_their_path_segment_are_refused(name):
    assert names.model_name_problem(name)
    with pytest.raises(names.InvalidModelName):
        names.validate_model_name(name)


def test_every_builtin_model_name_is_a_valid_name():
    assert [n for n in catalog.load_catalog() if names.model_name_problem(n)] == []


def test_registration_rules_follow_lemonds_reserved_prefixes():
    assert names.registration_problem("user.Mine") == ""
    for name in ("builtin.X", "extra.X", "user.builtin.X", "user.extra.X"):
        assert "reserved" in names.registration_problem(name)
    assert names.bare_name("user.X") == names.bare_name("builtin.X") == "X"


def test_a_traversal_name_cannot_reach_another_route(lemond_sim_factory):
    """#14 Medium 1: `/v1/models/{id}` with id `../../internal/config` used to reach
    `/internal/config` with the node's admin key (httpx resolves `..`)."""
    sim = lemond_sim_factory(api_key="k", admin_api_key="admin-k")
    client = client_for(sim.url, api_key="k", admin_api_key="admin-k").sync
    for name in ("../../internal/config", "../../v1/system-info", "..%2F..%2Finternal%2Fconfig"):
        with pytest.raises(names.InvalidModelName):
            client.model(name)
    # a name with characters a URL must quote still asks /v1/models/{one segment}
    with pytest.raises(LemonadeNotFound) as exc:
        client.model("No Such:Model")
    assert exc.value.code == "model_not_found"
    assert client.model("Qwen3-0.6B-GGUF")["recipe"] == "llamacpp"


@pytest.mark.django_db
def test_the_lemond_page_cannot_be_steered_to_another_route(client, django_user_model, node):
    """A slot saved with a traversal model (before validation existed) shows an error on
    its lemond page instead of lemond's admin config."""
    from slots.models import Slot

    Slot.objects.filter(name="chat").update(model_name="../../internal/config")
    user = django_user_model.objects.create_user("operator", password="pw-operator-1")
    client.force_login(user)
    html = client.get("/slots/chat/lemond/").content.decode()
    assert "one path segment" in html
    assert "config_version" not in html  # what the old code showed: lemond's admin config


@pytest.mark.django_db
def test_a_slot_model_must_be_one_path_segment(make_slot):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as exc:
        make_slot("bad", model_name="../../internal/config")
    assert "one path segment" in str(exc.value)
    assert make_slot("good", model_name="user.My-Model").model_name == "user.My-Model"


# --- one seam ----------------------------------------------------------------------------------


class _CountingLemond(BaseHTTPRequestHandler):
    """A minimal lemond on loopback that records which client connections it served."""

    protocol_version = "HTTP/1.1"
    peers: set

    def do_GET(self):
        self.peers.add(self.client_address)
        body = json.dumps({"status": "ok", "version": "10.6.0", "all_models_loaded": []})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def counting_lemond():
    handler = type("Handler", (_CountingLemond,), {"peers": set()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.peers
    server.shutdown()
    server.server_close()


def test_the_sync_client_reuses_its_connection(counting_lemond):
    """#11: the sync facade made a thread, a loop, a client and a TCP connection per call."""
    url, peers = counting_lemond
    assert client_for(url).sync.health().version == "10.6.0"
    threads = threading.active_count()  # the server's thread for our connection included
    for _ in range(20):
        assert client_for(url).sync.health().version == "10.6.0"
    assert len(peers) == 1
    # No thread per call; `<=` because a thread left by an earlier test may end meanwhile.
    assert threading.active_count() <= threads


async def test_async_clients_of_a_node_share_one_pool(counting_lemond):
    url, peers = counting_lemond
    for _ in range(10):
        await client_for(url, timeout=2).health()
        await LemonadeClient(url).health()  # old call sites share it too
    assert len(peers) == 1
    assert client_for(url)._pool is client_for(url, timeout=9)._pool
    assert client_for(url, api_key="other")._pool is not client_for(url)._pool
    assert "other" not in repr(client_for(url, api_key="other"))


def test_the_sync_client_works_from_many_threads(counting_lemond):
    url, _ = counting_lemond
    client = client_for(url).sync
    results: list[str] = []

    def work():
        results.extend(client.health().version for _ in range(5))

    workers = [threading.Thread(target=work) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == ["10.6.0"] * 40


# --- hostile lemond data -----------------------------------------------------------------------

HOSTILE_HEALTH = (
    '{"status": "ok", "version": "10.6.0", "websocket_port": "9000", "max_models": '
    '{"llm": NaN, "embedding": 1}, "all_models_loaded": ['
    '{"model_name": "Bad\\ud800Name", "type": 7, "pid": "12", "last_use": Infinity,'
    ' "recipe": ["x"], "device": [1, "gpu"], "recipe_options": {"ctx_size": 1e999}},'
    ' {"model_name": {"evil": true}}, {"model_name": "Fine-GGUF", "last_use": 123456}]}'
)


def _mock(routes: dict[str, tuple[int, str]]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        status, body = routes[request.url.path]
        return httpx.Response(status, content=body.encode(),
                              headers={"content-type": "application/json"})
    return httpx.MockTransport(handler)


def _storable(value) -> None:
    """What the database and the pages need: strict JSON that encodes as UTF-8."""
    json.dumps(value, allow_nan=False).encode("utf-8")


async def test_hostile_health_is_cleaned_at_the_boundary(caplog, monkeypatch):
    monkeypatch.setattr(untrusted, "_WARNED", set())  # complaints are logged once a process
    # "hal0" loggers do not propagate to the root logger caplog listens on
    monkeypatch.setattr(untrusted.log, "handlers", [*untrusted.log.handlers, caplog.handler])
    transport = _mock({"/v1/health": (200, HOSTILE_HEALTH)})
    async with LemonadeClient("http://lemond.test", transport=transport) as client:
        health = await client.health()
    assert [e.model_name for e in health.loaded] == ["Bad\ufffdName", "Fine-GGUF"]
    bad = health.loaded[0]
    assert bad.type == "" and bad.pid is None and bad.recipe == "" and bad.last_use_ms is None
    assert bad.device == ("gpu",) and bad.recipe_options == {"ctx_size": None}
    assert health.loaded[1].last_use_ms == 123456
    assert health.max_models == {"embedding": 1} and health.websocket_port is None
    _storable(health.raw)
    _storable([e.raw for e in health.loaded])
    assert "ignored" in caplog.text  # wrong types are logged (once each)


async def test_nan_and_infinity_in_stats_become_null():
    """#14: NaN in lemond's stats failed the node row's JSON check on every poll."""
    transport = _mock({
        "/v1/stats": (200, '{"tokens_per_second": NaN, "time_to_first_token": -Infinity,'
                           ' "input_tokens": 12, "decode_token_times": [1.5, NaN]}'),
        "/v1/system-stats": (200, '{"cpu_percent": Infinity, "memory_gb": 8.5}'),
    })
    async with LemonadeClient("http://lemond.test", transport=transport) as client:
        stats, system = await client.stats(), await client.system_stats()
    assert stats == {"tokens_per_second": None, "time_to_first_token": None,
                     "input_tokens": 12, "decode_token_times": [1.5, None]}
    assert system == {"cpu_percent": None, "memory_gb": 8.5}
    _storable([stats, system])


async def test_hostile_model_lists_and_errors():
    transport = _mock({
        "/v1/models": (200, '{"data": [{"id": "A\\udc00", "size": NaN}, 3, "x"]}'),
        "/v1/load": (500, '{"error": {"message": "boom \\ud83d", "code": 12, "type": []}}'),
    })
    async with LemonadeClient("http://lemond.test", transport=transport) as client:
        rows = await client.models()
        assert rows == [{"id": "A\ufffd", "size": None}]
        with pytest.raises(Exception) as exc:
            await client.load({"model_name": "X"})
    assert str(exc.value).encode("utf-8") and exc.value.code == "12"
    assert "\ufffd" in exc.value.message
    error = error_from_response(400, '{"error": "x\\ud800"}')
    assert error.message == "x\ufffd" and error.body.encode("utf-8")


def test_untrusted_cleaning_rules():
    assert untrusted.clean({"a\ud800": [float("nan"), math.inf, "\x00", True, 2]}) == \
        {"a\ufffd": [None, None, "\ufffd", True, 2]}
    deep: list = []
    cursor = deep
    for _ in range(100):
        cursor.append([])
        cursor = cursor[0]
    _storable(untrusted.clean(deep))
    with pytest.raises(ValueError):
        untrusted.loads("[" * 100_000 + "]" * 100_000)
    assert parse_health({"all_models_loaded": [{"model_name": "A", "last_use": "5"}]}) \
        .loaded[0].last_use_ms is None


def test_log_entries_are_repaired_or_dropped():
    message = json.dumps({"type": "logs.snapshot", "entries": [
        {"seq": 1, "severity": 3, "line": "numeric severity", "timestamp": None},
        {"seq": "2", "severity": "Warning", "line": "lone \ud800 surrogate", "tag": ["x"]},
        "not an entry",
        {"seq": True, "severity": None, "line": {"a": 1}},
    ]})
    entries = logs.parse_message(message)
    assert entries == [
        {"seq": 1, "timestamp": "", "severity": "3", "tag": "", "line": "numeric severity"},
        {"seq": None, "timestamp": "", "severity": "Warning", "tag": "",
         "line": "lone \ufffd surrogate"},
        {"seq": None, "timestamp": "", "severity": "info", "tag": "", "line": ""},
    ]
    assert logs.parse_message("not json") == logs.parse_message('{"type": "other"}') == []
    with pytest.raises(logs.LogStreamError, match="gone"):
        logs.parse_message('{"type": "error", "error": {"message": "gone"}}')


# A lemond on one loopback port: /v1/health over HTTP, the log websocket at /logs/stream
# (10.8+ serves both on its main port), sending a hostile entry before a normal one.
HOSTILE_LOG = [
    {"seq": 1, "timestamp": "t1", "severity": 42, "tag": "Server", "line": "sev is a number"},
    {"seq": 2, "timestamp": "t2", "severity": "Info", "tag": "Server", "line": "bad \ud800 text"},
    {"seq": 3, "timestamp": "t3", "severity": "Error", "tag": "Server", "line": "still relayed"},
]


@pytest.fixture
async def hostile_lemond():
    from websockets.asyncio.server import serve
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    async def process_request(connection, request):
        if request.path == "/v1/health":
            body = json.dumps({"status": "ok", "version": "10.8.0",
                               "all_models_loaded": []}).encode()
            return Response(200, "OK", Headers({"Content-Type": "application/json",
                                                "Content-Length": str(len(body))}), body)
        return None

    async def handler(socket):
        await socket.recv()  # logs.subscribe
        await socket.send(json.dumps({"type": "logs.snapshot", "entries": HOSTILE_LOG[:2]}))
        await socket.send(json.dumps({"type": "logs.entry", "entry": HOSTILE_LOG[2]}))
        await socket.wait_closed()

    async with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"


@pytest.mark.django_db(transaction=True)
async def test_the_log_relay_survives_hostile_entries(hostile_lemond, client, admin_user):
    """#14 Low: one log entry with a non-string severity killed the log relay for good."""
    from channels.testing import WebsocketCommunicator

    from hal0site.asgi import application
    from slots.models import Node

    node = await sync_to_async(Node.local)()
    node.base_url = hostile_lemond
    await node.asave()
    await sync_to_async(client.force_login)(admin_user)
    cookie = (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())
    comm = WebsocketCommunicator(application, "/ws/logs/", headers=[
        (b"host", b"127.0.0.1:8000"), (b"origin", b"http://127.0.0.1:8000"), cookie])
    assert (await comm.connect())[0]
    seen = ""
    async with asyncio.timeout(10):
        while "still relayed" not in seen:
            seen += await comm.receive_from(timeout=10)
    assert "unavailable" not in seen
    assert "sev is a number" in seen and "bad \ufffd text" in seen
    await comm.disconnect()


# --- backend args lemond reserves, per version -------------------------------------------------


@pytest.mark.parametrize("version,args,refused", [
    ("10.6.0", "-ngl 99", "-ngl"),
    ("10.6.0", "--gpu-layers=20", "--gpu-layers"),
    ("10.6.0", "--threads 4 --alias 'x -m y'", None),  # a quoted value is not a flag
    ("10.6.0", "--metrics", None),
    ("10.6.0", "-dev Vulkan0", "-dev"),
    ("10.4.0", "-dev Vulkan0", None),
    ("10.7.0", "--metrics", "--metrics"),
    ("11.7.0", "-ngl 99", None),  # 10.8 stopped setting it
    ("11.7.0", "-md draft.gguf", "-md"),
    ("11.7.0", "--mmproj-offload", None),
    ("11.7.0", '--hf-repo "a/b"', "--hf-repo"),
])
def test_llamacpp_args_lemond_reserves(version, args, refused):
    problem = versions.for_version(version).backend_args_problem("llamacpp", args)
    if refused is None:
        assert problem == ""
    else:
        assert problem == f"extra_args may not contain {refused}: lemond sets it itself."


def test_other_backends_and_flm_args():
    caps = versions.for_version("10.6.0")
    assert caps.backend_args_problem("whispercpp", "--port 1")
    assert caps.backend_args_problem("sd-cpp", "--vae x.safetensors")
    assert caps.backend_args_problem("sd-cpp", "--steps 4") == ""
    assert caps.backend_args_problem("flm", "--anything goes") == ""  # 10.x passes them on
    new = versions.for_version("11.7.0")
    assert new.backend_args_problem("flm", "--pmode turbo --q-len 4") == ""
    for bad in ("--asr 1", "--pmode=turbo", "--pmode", "--pmode a --pmode b", "--pmode 'x'"):
        assert new.backend_args_problem("flm", bad), bad


@pytest.mark.django_db
def test_a_reserved_flag_is_refused_before_lemond_sees_the_load(node, sim, make_slot):
    """#10: lemond 10.6 does not refuse a reserved llamacpp flag up front: the backend fails
    and lemond evicts every model. hal0 refuses it before /v1/load."""
    from providers import get
    from providers.lemonade.provider import UnsupportedOption
    from slots.models import Slot

    provider = get("lemonade")
    provider.load(Slot.objects.select_related("node").get(name="embed"))
    before = sim.state()
    slot = make_slot("typo", model_name="Qwen3-0.6B-GGUF")
    Slot.objects.filter(pk=slot.pk).update(extra_args="--threads 4 -ngl 99")  # an old row
    slot.refresh_from_db()
    with pytest.raises(UnsupportedOption, match="-ngl"):
        provider.load(slot)
    after = sim.state()
    assert after["load_requests_total"] == before["load_requests_total"]
    assert after["loaded_names"] == ["nomic-embed-text-v1-GGUF"]


def test_npu_args_go_under_the_key_the_version_reads():
    from types import SimpleNamespace

    from providers.lemonade.provider import LemonadeProvider, UnsupportedOption

    def npu_slot(version, extra="--pmode turbo"):
        node = SimpleNamespace(name="n", base_url="http://x", api_key="", admin_api_key="",
                               version=version)
        return SimpleNamespace(name="s", capability="chat", device="npu", model_name="M",
                               ctx_size=None, extra_args=extra, pinned=False,
                               loaded_model="", node=node)

    provider = LemonadeProvider()
    assert provider.load_body(npu_slot("10.6.0"))["flm_args"] == "--pmode turbo"
    assert provider.load_body(npu_slot("11.7.0"))["flm_args"] == "--pmode turbo"
    assert "flm_args" not in provider.load_body(npu_slot("10.9.0", extra=""))
    with pytest.raises(UnsupportedOption, match="no extra args"):
        provider.load_body(npu_slot("10.9.0"))
    with pytest.raises(UnsupportedOption, match="--asr"):
        provider.load_body(npu_slot("11.7.0", extra="--asr 1"))


# --- published names ---------------------------------------------------------------------------


def test_health_entries_are_found_by_their_published_name():
    health = parse_health({"all_models_loaded": [
        {"model_name": "My-Model"},          # user.My-Model, published bare
        {"model_name": "builtin.Qwen3-0.6B-GGUF"},  # a built-in shadowed by user.Qwen3-…
        {"model_name": "Whisper-Tiny"},      # a built-in nothing shadows
    ]})
    assert health.find("user.My-Model").model_name == "My-Model"
    assert health.find("My-Model").model_name == "My-Model"
    assert health.find("builtin.Qwen3-0.6B-GGUF").model_name == "builtin.Qwen3-0.6B-GGUF"
    assert health.find("Qwen3-0.6B-GGUF") is None  # the bare name means the user model
    assert health.find("user.Qwen3-0.6B-GGUF") is None
    assert health.find("builtin.Whisper-Tiny").model_name == "Whisper-Tiny"
    # a user.Whisper-Tiny would be published bare, shadowing the built-in: the same entry
    assert health.find("user.Whisper-Tiny").model_name == "Whisper-Tiny"
    assert names.published_forms("Lite Collection") == ("Lite Collection",
                                                        "user.Lite Collection")
