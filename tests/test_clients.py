"""Real OpenAI clients against hal0's gateway: the `openai` SDK (sync and async), LangChain,
a chunked multipart upload like Open WebUI's, and a browser `fetch` from another origin.

Everything runs on loopback: `manage.py serve` as a subprocess (tests.stack) in front of
the lemond simulator. The clients are the real packages, configured only with a base URL
and a hal0 token, as a user would configure them.
"""

from __future__ import annotations

import io
import wave

import httpx
import pytest

from tests.sim_fixtures import start_simulator
from tests.stack import Stack

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


def test_access_log_records_a_stream_the_client_cancelled(gw):
    """`serve --access-log` logs requests when their response completes; a stream the
    client walked away from is logged too, with nginx's 499."""
    from tests.stack import wait_for

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


def test_langchain_embeddings_without_a_tokenizer_download(gw):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model="embed", base_url=gw.base, api_key=gw.tokens["all"],
                                  check_embedding_ctx_length=False, max_retries=0)
    vectors = embeddings.embed_documents(["first document", "second document"])
    assert len(vectors) == 2 and vectors[0] != vectors[1]
    assert embeddings.embed_query("first document") == vectors[0]
