"""The lemond simulator in the 11 shape: behaviours lemond v11.7.0's own suites check
(issue #10), over real HTTP against the subprocess. Each was read in lemond's sources at
v11.7.0 (server.cpp, router.cpp, recipe_options.cpp, eviction_engine.cpp, ...)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.sim_fixtures import ROOT, lemond_sim, lemond_sim_factory, lemond_sim_session

__all__ = ["lemond_sim", "lemond_sim_factory", "lemond_sim_session"]

QWEN = "Qwen3-0.6B-GGUF"
QWEN4B = "Qwen3-4B-Instruct-2507-GGUF"
EMBED = "nomic-embed-text-v1-GGUF"


@pytest.fixture
def c(lemond_sim):
    lemond_sim.configure(version_shape="11")
    with lemond_sim.client() as client:
        yield client


def load(c, name, **body):
    return c.post("/v1/load", json={"model_name": name, **body})


def loaded(c, name):
    for model in c.get("/v1/health").json()["all_models_loaded"]:
        if model["model_name"] == name:
            return model
    return None


# ---- /v1/models/{id}/options ----------------------------------------------------------


def test_options_report_saved_effective_and_defaults_and_post_merges(c):
    before = c.get(f"/v1/models/{QWEN}/options").json()
    assert before["saved"] == {}
    assert before["recipe"] == "llamacpp"
    assert before["effective"]["model_name"] == QWEN
    assert before["effective"] == before["defaults"]
    assert "pinned" not in before["effective"]  # live-process state, not an option
    assert before["resolved_ctx_size"] > 0  # -1 (auto) resolves to a concrete size

    c.post(f"/v1/models/{QWEN}/options", json={"ctx_size": 4096})
    merged = c.post(f"/v1/models/{QWEN}/options", json={"llamacpp_args": "--no-mmap",
                                                        "model_name": QWEN}).json()
    assert merged["saved"] == {"ctx_size": 4096, "llamacpp_args": "--no-mmap"}
    assert merged["effective"]["ctx_size"] == 4096
    assert c.get(f"/v1/models/{QWEN}").json()["recipe_options"]["ctx_size"] == 4096
    assert loaded(c, QWEN) is None  # saving options loads nothing

    assert c.post(f"/v1/models/{QWEN}/options",
                  json={"llamacpp_args": ""}).json()["saved"] == {"ctx_size": 4096}
    cleared = c.post(f"/v1/models/{QWEN}/options", json={"ctx_size": None}).json()
    assert cleared["saved"] == {}
    assert cleared["effective"]["ctx_size"] == cleared["defaults"]["ctx_size"] == -1

    c.post(f"/v1/models/{QWEN}/options", json={"ctx_size": 4096})
    erased = c.delete(f"/v1/models/{QWEN}/options").json()
    assert erased["saved"] == {} and erased["effective"] == erased["defaults"]


@pytest.mark.parametrize("body", [
    {"nonsense": 1}, {"steps": 30}, {"ctx_size": "8192"}, {"ctx_size": ""}, {"ctx_size": 0},
    {"ctx_size": -5}, {"ctx_size": 4096.5}, {"ctx_size": 2**64 - 1},
    {"auto_evict": "sometimes"}, {"evict_idle_timeout": 600.5}, {"pinned": True},
    {"dry_run": "yes"},
])
def test_options_refuse_bad_input_and_persist_nothing(c, body):
    response = c.post(f"/v1/models/{QWEN}/options", json=body)
    assert response.status_code == 400
    assert "error" in response.json()
    assert c.get(f"/v1/models/{QWEN}/options").json()["saved"] == {}


def test_options_dry_run_resolves_without_saving_and_unknown_model_is_404(c):
    preview = c.post(f"/v1/models/{QWEN}/options", json={"ctx_size": 4096, "dry_run": True})
    assert preview.json()["effective"]["ctx_size"] == 4096
    assert preview.json()["resolved_ctx_size"] == 4096
    assert preview.json()["saved"] == {}
    assert c.get(f"/v1/models/{QWEN}/options").json()["saved"] == {}
    assert c.get("/v1/models/NoSuchModel/options").status_code == 404


def test_saved_minus_one_beats_a_global_ctx_size(c):
    assert c.post("/internal/set", json={"ctx_size": 8192}).status_code == 200
    assert c.get(f"/v1/models/{QWEN}/options").json()["effective"]["ctx_size"] == 8192
    data = c.post(f"/v1/models/{QWEN}/options", json={"ctx_size": -1}).json()
    assert data["saved"] == {"ctx_size": -1}
    assert data["effective"]["ctx_size"] == -1
    assert data["defaults"]["ctx_size"] == 8192


def test_replaying_effective_is_the_same_load(c):
    c.post(f"/v1/models/{QWEN}/options", json={"ctx_size": 3072, "llamacpp_args": "--no-mmap"})
    effective = c.get(f"/v1/models/{QWEN}/options").json()["effective"]
    assert load(c, QWEN).status_code == 200
    pid = loaded(c, QWEN)["pid"]
    c.delete(f"/v1/models/{QWEN}/options")
    assert c.post("/v1/load", json=effective).status_code == 200
    assert loaded(c, QWEN)["pid"] == pid  # no reload: the options resolve the same


def test_load_null_masks_saved_args_for_one_load_and_request_args_merge_global_args(c):
    c.post(f"/v1/models/{QWEN}/options", json={"llamacpp_args": "--threads 1", "ctx_size": 3072})
    assert load(c, QWEN, llamacpp_args=None, save_options=True).status_code == 200
    options = loaded(c, QWEN)["recipe_options"]
    assert "--threads 1" not in options.get("llamacpp_args", "")
    assert options["ctx_size"] == 3072  # only the nulled key is masked
    saved = c.get(f"/v1/models/{QWEN}/options").json()["saved"]
    assert saved == {"llamacpp_args": "--threads 1", "ctx_size": 3072}

    # the flat CLI spelling is stored nested, as lemond 11 does
    assert c.post("/internal/set", json={"llamacpp_args": "--no-mmap --threads 1"}
                  ).status_code == 200
    assert c.get("/internal/config").json()["llamacpp"]["args"] == "--no-mmap --threads 1"
    assert load(c, QWEN, llamacpp_args="--threads 2").status_code == 200
    args = loaded(c, QWEN)["recipe_options"]["llamacpp_args"]
    assert args == "--no-mmap --threads 2"  # request flag wins, global flags merge in


def test_auto_load_takes_only_ctx_size_from_an_inference_request(c):
    response = c.post("/v1/chat/completions", json={
        "model": QWEN, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "ctx_size": 8192, "llamacpp_args": "--foo", "auto_evict": True, "pinned": True,
        "temperature": 0.5})
    assert response.status_code == 200
    options = loaded(c, QWEN)["recipe_options"]
    assert options["ctx_size"] == 8192
    for key in ("llamacpp_args", "auto_evict", "pinned", "temperature"):
        assert key not in options
    assert loaded(c, QWEN)["pinned"] is False


def test_options_route_is_gated_by_version(lemond_sim, c):
    lemond_sim.configure(version_shape="10.6")
    assert c.get(f"/v1/models/{QWEN}/options").status_code == 404


# ---- eviction engine --------------------------------------------------------------------


def test_vram_pressure_evicts_the_most_disposable_unpinned_model(c):
    assert c.post("/internal/set", json={"auto_evict": True, "auto_evict_threshold_pct": 0.9,
                                         "max_loaded_models": 3}).status_code == 200
    load(c, QWEN, pinned=True)
    load(c, QWEN4B, evict_weight_factor=1e12)  # protected by its weight
    load(c, "Qwen3-1.7B-GGUF")
    below = c.post("/internal/simulate-vram-pressure", json={"pct": 0.5})
    assert below.json() == {"status": "ok"}
    assert loaded(c, "Qwen3-1.7B-GGUF") is not None  # below the threshold: nothing
    c.post("/internal/simulate-vram-pressure", json={"pct": 0.95})
    assert loaded(c, "Qwen3-1.7B-GGUF") is None
    assert loaded(c, QWEN) is not None and loaded(c, QWEN4B) is not None


def test_idle_downsize_and_a_request_restores(c):
    load(c, QWEN, auto_evict=True, downsize_idle_timeout=0, evict_idle_timeout=300)
    assert loaded(c, QWEN)["status"] == "ready"
    c.post("/internal/simulate-vram-pressure", json={"pct": -1})
    assert loaded(c, QWEN)["status"] == "downsized"
    reply = c.post("/v1/chat/completions", json={
        "model": QWEN, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert reply.status_code == 200
    assert loaded(c, QWEN)["status"] in ("ready", "in_use")


def test_pinned_and_opted_out_models_are_never_downsized(c):
    load(c, QWEN, pinned=True, auto_evict=True, downsize_idle_timeout=0)
    load(c, EMBED, downsize_idle_timeout=0)  # auto_evict follows the global (off)
    c.post("/internal/simulate-vram-pressure", json={"pct": -1})
    assert loaded(c, QWEN)["status"] == "ready"
    assert loaded(c, EMBED)["status"] == "ready"


@pytest.mark.parametrize("body, message", [
    ({"auto_evict": "yes"}, "'auto_evict' must be a boolean"),
    ({"auto_evict_threshold_pct": 1.5}, "between 0.0 and 1.0"),
    ({"default_model_source": "nexus"}, "huggingface"),
])
def test_eviction_and_source_config_is_validated(c, body, message):
    response = c.post("/internal/set", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_eviction_routes_are_gated_by_version(lemond_sim, c):
    lemond_sim.configure(version_shape="10.6")
    assert c.post("/internal/simulate-vram-pressure", json={"pct": 1}).status_code == 404
    assert c.post("/internal/set", json={"auto_evict": True}).status_code == 400


# ---- pins and backend processes ---------------------------------------------------------


@pytest.mark.parametrize("raw, message", [
    ("{invalid", "Invalid JSON body"),
    ('{"pinned": true}', "Parameter 'model' or 'model_name' is required"),
    ('{"model": "Qwen3-0.6B-GGUF"}', "Parameter 'pinned' is required and must be a boolean"),
    ('{"model": "Qwen3-0.6B-GGUF", "pinned": "true"}',
     "Parameter 'pinned' is required and must be a boolean"),
])
def test_pin_refusals_are_invalid_request_errors(c, raw, message):
    response = c.post("/internal/pin", content=raw)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"


def kill_and_wait(pid):
    """SIGKILL a backend and wait until it has died (a zombie until the simulator reaps it:
    the kill itself is asynchronous)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"backend {pid} still alive")


def test_a_killed_backend_is_reloaded_with_its_pin_by_the_next_request(c):
    load(c, QWEN, pinned=True)
    old_pid = loaded(c, QWEN)["pid"]
    os.kill(old_pid, 0)  # a real process
    kill_and_wait(old_pid)
    reply = c.post("/v1/chat/completions", json={
        "model": QWEN, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert reply.status_code == 200
    entry = loaded(c, QWEN)
    assert entry["pid"] != old_pid and entry["pinned"] is True
    assert c.post("/v1/unload", json={"model_name": QWEN}).status_code == 200
    with pytest.raises(ProcessLookupError):  # an unloaded backend's process is gone
        os.kill(entry["pid"], 0)


def test_a_killed_backend_before_v10_8_fails_its_requests(lemond_sim, c):
    lemond_sim.configure(version_shape="10.6")
    load(c, QWEN)
    kill_and_wait(loaded(c, QWEN)["pid"])
    reply = c.post("/v1/chat/completions", json={
        "model": QWEN, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 500
    assert reply.json()["error"]["type"] == "network_error"


# ---- 11.x routes ------------------------------------------------------------------------


def test_aliases_resolve_hop_by_hop_and_answer_under_their_own_name(c):
    assert c.get("/internal/aliases").json() == {"aliases": []}
    assert c.post("/internal/aliases", json={"alias": "fast", "target": QWEN}).json() == {
        "status": "ok", "alias": "fast", "target": QWEN}
    assert c.post("/internal/aliases", json={"alias": "quick", "target": "fast"}
                  ).status_code == 200
    assert c.get("/v1/models/quick").json()["id"] == "quick"
    assert c.post("/internal/aliases", json={"alias": "user.x", "target": QWEN}
                  ).status_code == 400
    assert c.post("/internal/aliases", json={"alias": "fast", "target": "quick"}
                  ).status_code == 409  # a cycle
    assert c.delete("/internal/aliases/quick").json() == {"status": "deleted",
                                                          "alias": "quick"}
    assert c.delete("/internal/aliases/quick").status_code == 404
    assert c.get("/v1/models/quick").status_code == 404


@pytest.mark.parametrize("params, status, text", [
    ({}, 400, "Missing required query parameter 'checkpoint'"),
    ({"checkpoint": "noslash"}, 400, "Malformed 'checkpoint'"),
    ({"checkpoint": "https://huggingface.co/o/r", "source": "modelscope"}, 400,
     "checkpoint URL uses huggingface but source was set to 'modelscope'"),
    ({"checkpoint": "o/r", "source": "nexus"}, 400, "Unsupported model source"),
    ({"checkpoint": "o/r"}, 404, "not found on Hugging Face"),
])
def test_pull_variants_validate_locally(c, params, status, text):
    response = c.get("/v1/pull/variants", params=params)
    assert response.status_code == status
    assert text in response.text


@pytest.mark.parametrize("params, text", [
    ({}, "at least 3 characters"), ({"query": "qwen", "source": "x"}, "Unsupported model source"),
    ({"query": "qwen", "limit": "0"}, "limit"), ({"query": "qwen", "limit": "12x"}, "limit"),
    ({"query": "qwen", "format": "safetensors"}, "format"),
])
def test_registry_search_validates_locally(c, params, text):
    response = c.get("/v1/registry/search", params=params)
    assert response.status_code == 400
    assert text in response.text


def test_pull_refuses_a_source_that_contradicts_the_checkpoint_url(c):
    conflict = c.post("/v1/pull", json={"model_name": "user.X", "recipe": "llamacpp",
                                        "checkpoint": "https://huggingface.co/o/r",
                                        "source": "modelscope"})
    assert conflict.status_code == 400
    invalid = c.post("/v1/pull", json={"model_name": "user.X", "recipe": "llamacpp",
                                       "checkpoint": "o/r:Q4", "source": "nexus"})
    assert "Unsupported model source" in invalid.json()["error"]


def test_models_register_defines_a_model_without_downloading_it(c):
    response = c.post("/v1/models/register", json={
        "model_name": "user.Reg", "recipe": "llamacpp", "checkpoint": "o/r:Q4_K_M"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success" and body["canonical_model_name"] == "user.Reg"
    listed = {m["id"]: m for m in c.get("/v1/models?show_all=true").json()["data"]}
    entry = listed[body["model_name"]]
    assert entry["checkpoint"] == "o/r:Q4_K_M" and entry["downloaded"] is False


def test_inference_without_a_model_is_refused_not_routed_to_the_last_one(c):
    assert c.post("/v1/embeddings", json={"input": "hi"}).json() == {
        "error": "No model loaded and no model specified in request"}
    load(c, EMBED)
    response = c.post("/v1/embeddings", json={"input": "hi"})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "Invalid request: No model specified in "
                                                   "request", "type": "invalid_request"}


def test_a_prompt_past_the_context_is_an_sse_error_event(c):
    load(c, QWEN, ctx_size=64)
    with c.stream("POST", "/v1/chat/completions", json={
            "model": QWEN, "stream": True,
            "messages": [{"role": "user", "content": "word " * 200}]}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert "exceeds the available context size" in lines[0]
    refused = c.post("/v1/chat/completions", json={
        "model": QWEN, "messages": [{"role": "user", "content": "word " * 200}]})
    assert refused.status_code == 400
    assert refused.json()["error"]["type"] == "exceed_context_size_error"


def test_a_second_simulator_on_a_busy_port_exits_non_zero(lemond_sim):
    port = int(lemond_sim.url.rsplit(":", 1)[1])
    second = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "lemond_sim", "--port", str(port)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert second.returncode != 0
    assert "already in use" in (second.stdout + second.stderr).lower()
    assert httpx.get(f"{lemond_sim.url}/live", timeout=5).status_code == 200


def test_metrics_describe_every_series_and_label_loaded_models(c):
    load(c, QWEN)
    text = c.get("/metrics").text
    assert "# HELP lemonade_server_up Whether the Lemonade server is running." in text
    assert "# TYPE lemonade_model_cache_tokens_total counter" in text
    for series in ("lemonade_cache_tokens_total 0", "lemonade_routing_decisions_total 0",
                   "lemonade_routing_switches_total 0", 'lemonade_max_loaded_models{type="llm"} 1'):
        assert series in text
    info = [line for line in text.splitlines() if line.startswith("lemonade_model_info{")]
    assert len(info) == 1 and f'model_name="{QWEN}"' in info[0] and 'recipe="llamacpp"' in info[0]


def test_speech_streams_raw_pcm_and_refuses_a_format_it_cannot_stream(c):
    streamed = c.post("/v1/audio/speech", json={"model": "kokoro-v1", "input": "Lemonade can speak",
                                                "stream_format": "audio"})
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("audio/l16")
    assert not streamed.content.startswith((b"RIFF", b"ID3", b"OggS"))
    refused = c.post("/v1/audio/speech", json={"model": "kokoro-v1", "input": "hi",
                                               "stream_format": "audio", "response_format": "mp3"})
    assert refused.status_code == 400
    assert c.post("/v1/audio/speech", json={"model": "kokoro-v1", "input": "hi",
                                            "stream_format": "sse"}).status_code == 400
    buffered = c.post("/v1/audio/speech", json={"model": "kokoro-v1", "input": "hi",
                                                "response_format": "mp3"})
    assert buffered.headers["content-type"] == "audio/mpeg"


def test_transcription_refuses_an_unknown_response_format(c):
    wav = b"RIFF" + b"\x00" * 4 + b"WAVEfmt " + b"\x00" * 100
    response = c.post("/v1/audio/transcriptions", files={"file": ("a.wav", wav, "audio/wav")},
                      data={"model": "Whisper-Large-v3-Turbo", "response_format": "xml"})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "Unsupported response_format: xml",
                                        "type": "invalid_request_error"}


def stub_gguf(path, tensors=0, size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + tensors.to_bytes(8, "little")
                     + (0).to_bytes(8, "little"))
    if size:
        os.truncate(path, size)


def test_a_folder_of_quant_variants_lists_each_variant_and_keeps_the_folder_name(c, tmp_path):
    folder = tmp_path / "Qwen3.6-35B-A3B-GGUF"
    stub_gguf(folder / "Qwen3.6-35B-A3B-Q4_K_M.gguf")
    stub_gguf(folder / "Qwen3.6-35B-A3B-Q8_0.gguf")
    stub_gguf(folder / "mmproj-b.gguf")
    stub_gguf(folder / "mmproj-a.gguf")
    shards = tmp_path / "Big-GGUF"
    stub_gguf(shards / "Big-00001-of-00002.gguf")
    stub_gguf(shards / "Big-00002-of-00002.gguf", size=3 * 1024 * 1024)
    assert c.post("/internal/set", json={"extra_models_dir": str(tmp_path)}).status_code == 200
    listed = {m["id"]: m for m in c.get("/v1/models?show_all=true").json()["data"]}
    q4 = listed["Qwen3.6-35B-A3B-Q4_K_M"]
    assert q4["checkpoint"] == str(folder / "Qwen3.6-35B-A3B-Q4_K_M.gguf")
    assert q4["checkpoints"]["mmproj"] == "mmproj-a.gguf"  # the first one alphabetically
    assert "Qwen3.6-35B-A3B-Q8_0" in listed and folder.name not in listed
    assert c.get(f"/v1/models/{folder.name}").json()["id"] == "Qwen3.6-35B-A3B-Q4_K_M"
    assert listed["Big-GGUF"]["checkpoint"] == str(shards)  # one sharded model stays whole
    assert listed["Big-GGUF"]["size"] > 3 / 1024  # every shard counts
    files = c.get("/v1/models/Big-GGUF/files").json()["files"]
    assert [(f["name"], f["role"]) for f in files] == [("Big-00001-of-00002.gguf", "main")]
    assert files[0]["size_bytes"] == 24  # the file's own size, not the family's


def test_a_stub_gguf_without_tensors_fails_to_load(c, tmp_path):
    stub_gguf(tmp_path / "Stub-Q4_K_M.gguf")
    c.post("/internal/set", json={"extra_models_dir": str(tmp_path)})
    response = c.post("/v1/chat/completions", json={
        "model": "Stub-Q4_K_M", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 500
    assert "Failed to load model" in response.json()["error"]["message"]
