"""Real OpenAI clients against hal0's gateway: the `openai` SDK (sync and async), LangChain,
a chunked multipart upload like Open WebUI's, and a browser `fetch` from another origin.

Everything runs on loopback: `manage.py serve` as a subprocess (tests.harness) in front of
the lemond simulator. The clients are the real packages, configured only with a base URL
and a hal0 token, as a user would configure them.
"""

from __future__ import annotations

import asyncio
import io
import json
import wave

import httpx
import pytest

from tests.harness import HAVE_CHROMIUM, Stack, chromium, free_port, wait_for
from tests.sim_fixtures import start_simulator

pytestmark = pytest.mark.e2e

CHAT_MODEL = "Qwen3-4B-Instruct-2507-GGUF"
CORS_ORIGIN = "http://127.0.0.1:{port}"


def wav_bytes(seconds: float = 0.5) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\0\0" * int(16000 * seconds))
    return buffer.getvalue()


class Gateway:
    """A running `serve`: its URL, tokens by name, and the stack that runs it."""

    def __init__(self, stack: Stack, url: str, tokens: dict[str, str]):
        self.stack, self.url, self.tokens = stack, url, tokens

    @property
    def base(self) -> str:
        return f"{self.url}/v1"

    def headers(self, token: str = "all") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[token]}"}

    def openai(self, token: str = "all", async_: bool = False):
        import openai

        cls = openai.AsyncOpenAI if async_ else openai.OpenAI
        return cls(base_url=self.base, api_key=self.tokens[token], max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def clients_sim():
    handle = start_simulator(load_delay=0.05, token_delay=0.002)
    yield handle
    handle.stop()


def _start(tmp_path, sim, **env: str) -> Gateway:
    stack = Stack(tmp_path, HAL0_LEMONADE_URL=sim.url, HAL0_GATEWAY_ROUTE_CACHE_S="0.1",
                  HAL0_TOKEN_CACHE_S="0.5", **env)
    stack.setup()
    stack.manage("shell", "-c", "from slots.actions import config\n"
                 "config.do_create_slot({'name': 'writer', 'capability': 'chat', "
                 "'device': 'cpu', 'model_name': 'Qwen3-0.6B-GGUF', 'ctx_size': 8192}, "
                 "actor='cli')\n"
                 "config.do_create_slot({'name': 'ears2', 'capability': 'stt', "
                 "'device': 'cpu', 'model_name': 'Whisper-Tiny'}, actor='cli')")
    tokens = {"all": stack.manage("tokens", "create", "all").stdout.strip(),
              "picker": stack.manage("tokens", "create", "open-webui", "--list", "chat")
              .stdout.strip()}
    # llama.cpp-router clients that may load and unload: every slot, or `writer` only
    tokens.update(json.loads(stack.manage("shell", "-c", (
        "import json\nfrom slots import tokens as t\n"
        "print(json.dumps({'manager': t.create_token('manager', may_manage=True)[1], "
        "'writer-manager': t.create_token('writer-manager', slots='writer', "
        "may_manage=True)[1]}))")).stdout.splitlines()[-1]))
    return Gateway(stack, stack.serve("--access-log"), tokens)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, clients_sim):
    gw = _start(tmp_path_factory.mktemp("clients"), clients_sim)
    yield gw
    gw.stack.stop()


@pytest.fixture
def gw(gateway, clients_sim):
    clients_sim.reset()
    clients_sim.configure(max_loaded_models=-1)
    return gateway


# --- the openai SDK ------------------------------------------------------------------------

def test_openai_lists_models_with_fields_clients_use(gw):
    client = gw.openai()
    models = {m.id: m for m in client.models.list()}
    assert {"chat", "embed", "rerank", "stt", "tts", "img", "writer"} <= set(models)
    chat = models["chat"].model_dump()
    assert chat["capability"] == "chat" and chat["owned_by"] == "hal0"
    assert chat["name"] == f"chat — {CHAT_MODEL} (gpu-rocm)"
    assert chat["context_length"] == chat["max_model_len"] == 16384
    assert models["writer"].model_dump()["context_length"] == 8192
    # not loaded: LM Studio's word and llama.cpp's status say the same
    assert chat["state"] == "not-loaded" and chat["status"] == {"value": "unloaded"}
    # `created` is when the slot was made, not the time of the listing
    again = {m.id: m for m in client.models.list()}
    assert again["chat"].created == models["chat"].created
    assert client.models.retrieve("writer").created == models["writer"].created


def test_openai_chat_stream_sync(gw):
    client = gw.openai()
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Hello there"}], stream=True,
        stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) > 3 and "".join(pieces).strip()
    assert usage is not None and usage.completion_tokens > 0
    # the model is loaded now, in every client's words
    chat = client.models.retrieve("chat").model_dump()
    assert chat["state"] == "loaded" and chat["status"] == {"value": "loaded"}


async def test_openai_async_streams_concurrently(gw):
    client = gw.openai(async_=True)

    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": f"Count to {i}"}],
            stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one(i) for i in range(5)))
    assert all(t.strip() for t in texts)
    page = await client.models.list()
    assert "chat" in [m.id for m in page.data]
    await client.close()


def test_openai_responses_without_and_with_stream(gw):
    client = gw.openai()
    response = client.responses.create(model="chat", input="Tell me about slots")
    assert response.output_text.strip()
    assert response.model == CHAT_MODEL
    events = list(client.responses.create(model="chat", input="Stream it", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.strip() and text == events[-1].response.output_text


def test_openai_embeddings_speech_transcription_images(gw):
    client = gw.openai()
    embedding = client.embeddings.create(model="embed", input=["one", "two"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) > 10
    speech = client.audio.speech.create(model="tts", voice="shimmer", input="Hello")
    assert len(speech.content) > 100
    text = client.audio.transcriptions.create(model="stt",
                                              file=("hello.wav", wav_bytes(), "audio/wav"))
    assert text.text.startswith("Simulated transcription")
    image = client.images.generate(model="img", prompt="a cat", size="256x256")
    assert image.data[0].b64_json


def test_openai_names_reach_the_capabilitys_default_slot(gw, clients_sim):
    client = gw.openai()
    chat = client.chat.completions.create(model="gpt-4o-mini",
                                          messages=[{"role": "user", "content": "Hi"}])
    assert chat.model == CHAT_MODEL
    embedding = client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert embedding.model == "nomic-embed-text-v1-GGUF"
    assert len(client.audio.speech.create(model="tts-1", voice="alloy", input="Hi").content)
    assert client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", wav_bytes(), "audio/wav")).text
    assert client.images.generate(model="dall-e-3", prompt="a dog", size="256x256").data
    loaded = set(clients_sim.state()["loaded_names"])
    assert {CHAT_MODEL, "nomic-embed-text-v1-GGUF", "kokoro-v1", "Whisper-Large-v3-Turbo",
            "SD-Turbo"} <= loaded
    # the listing says which names lead where
    listed = {m.id: m.model_dump() for m in client.models.list()}
    assert "gpt-4o-mini" in listed["chat"]["aliases"]
    assert "whisper-1" in listed["stt"]["aliases"]
    assert "gpt-4o-mini" not in listed  # aliases are not models of their own in the picker
    assert client.models.retrieve("tts-1").id == "tts"


def test_openai_errors_are_its_own_error_classes(gw):
    import openai

    client = gw.openai()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user",
                                                                   "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as unknown_path:
        client.get("/no/such/endpoint", cast_to=object)
    assert unknown_path.value.body["code"] == "not_found"
    with pytest.raises(openai.APIStatusError) as unsupported:
        client.moderations.create(input="hello")
    assert unsupported.value.status_code == 501
    assert unsupported.value.body["code"] == "not_supported"


def test_access_log_records_a_stream_the_client_cancelled(gw, clients_sim):
    """`serve --access-log` logs requests when their response completes; a stream the
    client walked away from is logged too, with nginx's 499."""
    # A reply long enough to outlast the hang-up: the default one is over in ~30 ms, which a
    # slow machine's client can take to close, and then the stream completed with 200.
    clients_sim.configure(reply_length=2000)
    body = {"model": "chat", "stream": True, "max_tokens": 2000,
            "messages": [{"role": "user", "content": "A long story please"}]}
    with httpx.stream("POST", f"{gw.base}/chat/completions?cancel=me", json=body,
                      headers=gw.headers(), timeout=30) as response:
        assert response.status_code == 200
        next(response.iter_bytes())  # the stream has started: now hang up
    line, _ = wait_for(lambda: next((ln for ln in gw.stack.logs().splitlines()
                                     if "/v1/chat/completions?cancel=me" in ln), None), 10)
    assert '"POST /v1/chat/completions?cancel=me" 499 ' in line


# --- LangChain ------------------------------------------------------------------------------

def _chat(gw, **kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="chat", base_url=gw.base, api_key=gw.tokens["all"],
                      max_retries=0, timeout=30, **kwargs)


def test_langchain_chat_invoke_and_stream(gw):
    llm = _chat(gw)
    answer = llm.invoke("Hello from LangChain")
    assert isinstance(answer.content, str) and answer.content.strip()
    pieces = [chunk.content for chunk in llm.stream("Stream from LangChain")]
    assert len(pieces) > 3 and "".join(pieces).strip()


def test_langchain_chat_over_the_responses_api(gw):
    llm = _chat(gw, use_responses_api=True)
    answer = llm.invoke("Hello over Responses")
    assert answer.text.strip()
    chunks = list(llm.stream("Stream over Responses"))
    assert "".join(c.text for c in chunks).strip()


def test_langchain_embeddings_without_a_tokenizer_download(gw):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model="embed", base_url=gw.base, api_key=gw.tokens["all"],
                                  check_embedding_ctx_length=False, max_retries=0)
    vectors = embeddings.embed_documents(["first document", "second document"])
    assert len(vectors) == 2 and vectors[0] != vectors[1]
    assert embeddings.embed_query("first document") == vectors[0]


# --- what Open WebUI sends -------------------------------------------------------------------

def _multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", data=fields, files=files)
    return request.read(), request.headers["Content-Type"]


def _chunked(body: bytes):
    for i in range(0, len(body), 4096):
        yield body[i:i + 4096]


def test_chunked_multipart_upload_without_content_length(gw, clients_sim):
    body, content_type = _multipart({"model": "stt", "language": "en"},
                                    {"file": ("hello.wav", wav_bytes(), "audio/wav")})
    sent = []
    with httpx.Client(event_hooks={"request": [sent.append]}, timeout=30) as client:
        response = client.post(f"{gw.base}/audio/transcriptions", content=_chunked(body),
                               headers={**gw.headers(), "Content-Type": content_type})
    assert "content-length" not in sent[0].headers
    assert sent[0].headers["transfer-encoding"] == "chunked"
    assert response.status_code == 200, response.text
    assert response.json()["text"].startswith("Simulated transcription of 0.5 seconds")


def test_chunked_multipart_keeps_the_clients_model(gw, clients_sim):
    body, content_type = _multipart({"model": "ears2"},
                                    {"file": ("hello.wav", wav_bytes(), "audio/wav")})
    response = httpx.post(f"{gw.base}/audio/transcriptions", content=_chunked(body),
                          headers={**gw.headers(), "Content-Type": content_type}, timeout=30)
    assert response.status_code == 200, response.text
    assert clients_sim.state()["loaded_names"] == ["Whisper-Tiny"]


def test_multipart_without_a_file_is_hal0s_own_400(gw, clients_sim):
    body, content_type = _multipart({"model": "stt"}, {})
    if not content_type.startswith("multipart/"):  # httpx sends no files as urlencoded
        body, content_type = _multipart({"model": "stt"},
                                        {"other": ("x.txt", b"x", "text/plain")})
    for content in (body, _chunked(body)):
        response = httpx.post(f"{gw.base}/audio/transcriptions", content=content,
                              headers={**gw.headers(), "Content-Type": content_type},
                              timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "file" and "file" in error["message"]
    assert clients_sim.state()["loaded_names"] == []  # refused before loading anything


def test_audio_voices_and_models_for_the_tts_slot(gw):
    voices = httpx.get(f"{gw.base}/audio/voices", headers=gw.headers())
    assert voices.status_code == 200, voices.text
    names = [v["id"] for v in voices.json()["voices"]]
    assert "alloy" in names or names  # a list of voice ids Open WebUI can offer
    models = httpx.get(f"{gw.base}/audio/models", headers=gw.headers())
    assert models.status_code == 200, models.text
    assert {"tts", "tts-1"} <= {m["id"] for m in models.json()["models"]}
    assert httpx.get(f"{gw.base}/audio/voices").status_code == 401


def test_a_token_lists_less_than_it_may_use(gw):
    """`tokens create open-webui --list chat`: Open WebUI's picker shows chat slots only,
    while the same token still serves embeddings, speech and transcription."""
    listed = {m.id for m in gw.openai("picker").models.list()}
    assert listed == {"chat", "writer"}
    client = gw.openai("picker")
    assert client.embeddings.create(model="embed", input="rag").data
    assert client.audio.speech.create(model="tts", voice="alloy", input="Hi").content


# --- answers under /v1/ are always OpenAI-shaped ---------------------------------------------

@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/v1/nope", 404, "not_found"),
    ("POST", "/v1/chat/nope", 404, "not_found"),
    ("GET", "/v1/", 404, "not_found"),
    ("GET", "/models/nope", 404, "model_not_found"),
    ("GET", "/models/load", 405, "method_not_allowed"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ("PUT", "/v1/responses", 405, "method_not_allowed"),
    ("POST", "/v1/images/edits", 501, "not_supported"),
    ("POST", "/v1/images/variations", 501, "not_supported"),
    ("POST", "/v1/audio/translations", 501, "not_supported"),
    ("POST", "/v1/moderations", 501, "not_supported"),
])
def test_every_v1_answer_is_openai_json(gw, method, path, status, code):
    response = httpx.request(method, f"{gw.url}{path}", headers=gw.headers(), timeout=10)
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and "type" in error


def test_unknown_paths_still_need_a_token(gw):
    response = httpx.get(f"{gw.base}/nope")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


# --- llama.cpp router clients (pi, Open WebUI's load buttons, Letta Code) -----------------

class RouterClient:
    """What a llama.cpp-router client does, configured as one would configure it for
    llama-server: the server's root URL (no /v1) and a key."""

    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=30)

    def models(self) -> dict[str, dict]:
        response = self.http.get("/models")
        response.raise_for_status()
        return {m["id"]: m for m in response.json()["data"]}

    def load(self, model: str) -> httpx.Response:
        return self.http.post("/models/load", json={"model": model})

    def unload(self, model: str) -> httpx.Response:
        return self.http.post("/models/unload", json={"model": model})

    def events(self):
        """The /models/sse stream's data events, as they arrive."""
        with self.http.stream("GET", "/models/sse") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    yield json.loads(line[6:])

    def chat(self, model: str) -> str:
        response = self.http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}]})
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]


def _until(events, model: str, status: str) -> dict:
    return next(e for e in events
                if e["model"] == model and e["event"] == "model_status"
                and e["data"]["status"] == status)


def test_router_client_lists_loads_waits_on_sse_chats_and_unloads(gw, clients_sim):
    client = RouterClient(gw.url, gw.tokens["writer-manager"])
    if client.models()["writer"]["status"]["value"] != "unloaded":
        assert client.unload("writer").json() == {"success": True}
    listed = client.models()
    assert set(listed) == {"writer"}  # the slots this key may use, nothing else
    assert listed["writer"]["status"] == {"value": "unloaded"}
    events = client.events()
    snapshot = next(events)
    assert snapshot == {"model": "writer", "event": "model_status",
                        "data": {"status": "unloaded"}}
    assert client.load("writer").json() == {"success": True}
    _until(events, "writer", "loaded")
    assert client.models()["writer"]["status"] == {"value": "loaded"}
    assert "Qwen3-0.6B-GGUF" in clients_sim.state()["loaded_names"]
    assert client.chat("writer").strip()
    assert client.unload("writer").json() == {"success": True}
    _until(events, "writer", "unloaded")
    events.close()  # the client hangs up: hal0 finishes the stream
    assert "Qwen3-0.6B-GGUF" not in clients_sim.state()["loaded_names"]
    line, _ = wait_for(lambda: next((ln for ln in gw.stack.logs().splitlines()
                                     if '"GET /models/sse' in ln), None), 10)
    assert '"GET /models/sse" 499 ' in line  # ended by the client leaving (nginx's code)


def test_router_client_is_refused_without_may_manage_or_outside_its_slots(gw, clients_sim):
    reader = RouterClient(gw.url, gw.tokens["all"])
    assert reader.models()["chat"]["status"]["value"] in ("loaded", "unloaded")
    refused = reader.load("chat")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "manage_not_allowed"
    outside = RouterClient(gw.url, gw.tokens["writer-manager"]).load("chat")
    assert outside.status_code == 403
    assert outside.json()["error"]["code"] == "slot_not_allowed"
    assert clients_sim.state()["loaded_names"] == []  # nothing was loaded


def test_openai_sdk_drives_the_router_endpoints_with_its_error_classes(gw, clients_sim):
    """The `openai` package against /v1/models/load and /unload (its generic post): success,
    and its own exception classes for the refusals."""
    import openai

    manager = gw.openai("manager")
    assert manager.post("/models/load", body={"model": "embed"}, cast_to=object) == {
        "success": True}
    assert manager.models.retrieve("embed").model_dump()["status"] == {"value": "loaded"}
    assert manager.post("/models/unload", body={"model": "embed"}, cast_to=object) == {
        "success": True}
    with pytest.raises(openai.PermissionDeniedError) as refused:
        gw.openai().post("/models/load", body={"model": "embed"}, cast_to=object)
    assert refused.value.code == "manage_not_allowed"
    with pytest.raises(openai.NotFoundError):
        manager.post("/models/load", body={"model": "gpt-17"}, cast_to=object)


# --- CORS, in a real browser -----------------------------------------------------------------

PAGE = """<!doctype html><title>other origin</title><p>client</p>"""


def _serve_page(port: int):
    """A page on another origin (another loopback port) for the browser to run fetch on."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            data = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


FETCH = """async ([url, token]) => {
  try {
    const r = await fetch(url + "/chat/completions", {method: "POST",
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
      body: JSON.stringify({model: "chat", messages: [{role: "user", content: "hi"}]})});
    const models = await fetch(url + "/models", {headers: {"Authorization": "Bearer " + token}});
    return {ok: true, status: r.status, body: await r.json(), models: models.status};
  } catch (e) { return {ok: false, error: String(e)}; }
}"""


@pytest.fixture(scope="module")
def cors_gateway(tmp_path_factory, clients_sim):
    page_port = free_port()
    origin = CORS_ORIGIN.format(port=page_port)
    gw = _start(tmp_path_factory.mktemp("cors"), clients_sim, HAL0_CORS_ORIGINS=origin)
    page = _serve_page(page_port)
    yield gw, origin, page_port
    page.shutdown()
    gw.stack.stop()


def test_cors_preflight_answered_for_allowed_origins_only(cors_gateway, gateway):
    gw, origin, _ = cors_gateway
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{gw.base}/chat/completions", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == origin
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers
    other = httpx.options(f"{gw.base}/chat/completions",
                          headers={**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # a hal0 without HAL0_CORS_ORIGINS allows no origin at all
    closed = httpx.options(f"{gateway.base}/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    # and CORS stays off the dashboard
    page = httpx.options(f"{gw.url}/api/health", headers=preflight)
    assert "access-control-allow-origin" not in page.headers


@pytest.mark.browser
@pytest.mark.skipif(not HAVE_CHROMIUM, reason="needs Debian's chromium")
def test_browser_fetch_from_another_origin(cors_gateway, gateway):
    gw, origin, _ = cors_gateway
    with chromium() as browser:
        page = browser.new_page()
        page.goto(f"{origin}/")
        result = page.evaluate(FETCH, [gw.base, gw.tokens["all"]])
        assert result["ok"], result
        assert result["status"] == 200 and result["models"] == 200
        assert result["body"]["choices"][0]["message"]["content"]
        # the same page against a hal0 that allows no origins: the browser blocks it
        blocked = page.evaluate(FETCH, [gateway.base, gateway.tokens["all"]])
        assert not blocked["ok"] and "Failed to fetch" in blocked["error"], blocked
    assert json.dumps(result)  # the answer crossed origins intact
