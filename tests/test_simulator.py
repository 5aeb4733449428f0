"""The lemond simulator, over real HTTP against the subprocess (lemond-api.md §7)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.harness import ROOT, free_port
from tests.sim_fixtures import lemond_sim, lemond_sim_factory, lemond_sim_session

__all__ = ["lemond_sim", "lemond_sim_factory", "lemond_sim_session"]

QWEN = "Qwen3-0.6B-GGUF"
QWEN4B = "Qwen3-4B-Instruct-2507-GGUF"
EMBED = "nomic-embed-text-v1-GGUF"
RERANK = "bge-reranker-v2-m3-GGUF"
WHISPER = "Whisper-Large-v3-Turbo"
NOT_DOWNLOADED = "Qwen3-1.7B-GGUF"


@pytest.fixture
def c(lemond_sim):
    with lemond_sim.client() as client:
        yield client


def load(c, name, **body):
    return c.post("/v1/load", json={"model_name": name, **body})


def loaded_names(c):
    return [m["model_name"] for m in c.get("/v1/health").json()["all_models_loaded"]]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# ---- routes ---------------------------------------------------------------------------


def test_every_prefix_serves_the_api(c):
    for prefix in ("/api/v0", "/api/v1", "/v0", "/v1"):
        response = c.get(f"{prefix}/health")
        assert response.status_code == 200, prefix
        assert response.json()["simulated"] is True
    assert c.get("/live").json() == {"status": "ok"}
    assert c.head("/live").status_code == 200
    head = c.head("/v1/health")
    assert head.status_code == 200
    assert head.content == b""


def test_v10_0_shape_has_only_api_prefixes(lemond_sim, c):
    lemond_sim.configure(version_shape="10.0")
    assert c.get("/api/v1/health").status_code == 200
    assert c.get("/api/v0/models").status_code == 200
    assert c.get("/v1/health").status_code == 404
    assert c.post("/internal/set", json={"log_level": "debug"}).status_code == 404


def test_unknown_path_and_wrong_method(c):
    response = c.get("/v1/nope")
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "The requested endpoint does not exist",
                                         "type": "not_found", "path": "/v1/nope"}}
    response = c.get("/v1/load")
    assert response.status_code == 405
    assert response.json() == {"error": "Method Not Allowed. Use POST for this endpoint"}
    assert c.get("/internal/pin").status_code == 404  # only since v10.8
    assert c.options("/v1/load").status_code == 204


def test_auth_matrix(lemond_sim, c):
    lemond_sim.configure(api_key="user-key", admin_api_key="admin-key")
    user = {"Authorization": "Bearer user-key"}
    admin = {"Authorization": "Bearer admin-key"}
    response = c.get("/v1/health")
    assert (response.status_code, response.json()) == (401, {"error":
                                                             "Invalid or missing API key"})
    assert c.get("/v1/health", headers=user).status_code == 200
    assert c.get("/api/v1/models", headers=admin).status_code == 200  # admin works everywhere
    response = c.get("/internal/config", headers=user)
    assert (response.status_code, response.json()) == (
        401, {"error": "Invalid or missing admin API key"})
    assert c.get("/internal/config", headers=admin).status_code == 200
    assert c.get("/live").status_code == 200
    assert c.options("/v1/health").status_code == 204
    assert c.get("/__sim__/state").status_code == 200

    lemond_sim.configure(api_key="user-key", admin_api_key="")  # admin defaults to the key
    assert c.get("/internal/config", headers=user).status_code == 200
    lemond_sim.configure(api_key="", admin_api_key="admin-key")  # only /internal gated
    assert c.get("/v1/health").status_code == 200
    assert c.get("/internal/config").status_code == 401


# ---- health shapes --------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["10.0", "10.6", "11"])
def test_health_shape(lemond_sim, c, shape):
    lemond_sim.configure(version_shape=shape)
    prefix = "/api/v1" if shape == "10.0" else "/v1"
    assert c.post(f"{prefix}/load", json={"model_name": WHISPER}).status_code == 200
    health = c.get(f"{prefix}/health").json()
    entry = health["all_models_loaded"][0]
    assert health["model_loaded"] == WHISPER
    # steady-clock milliseconds (time since boot, the same clock as time.monotonic here),
    # not epoch time
    assert isinstance(entry["last_use"], int)
    assert abs(entry["last_use"] - time.monotonic() * 1000) < 60_000
    assert entry["backend_url"].startswith("http://127.0.0.1:")
    if shape == "10.0":
        assert health["version"] == "10.0.0-sim"
        assert entry["type"] == "audio" and "audio" in health["max_models"]
        assert "pid" not in entry
        assert health["log_streaming"] == {"sse": True, "websocket": False}
        assert "websocket_port" not in health
    else:
        assert entry["type"] == "transcription" and "audio" not in health["max_models"]
        assert isinstance(entry["pid"], int)
        # lemond's separate websocket server ("auto": a random free port)
        assert health["websocket_port"] == lemond_sim.websocket_port != lemond_sim.port
    if shape == "10.6":
        assert health["version"] == "10.6.0-sim"
        assert "pinned" not in entry and "status" not in entry
        assert "pinned_models" not in health
    if shape == "11":
        assert health["version"] == "11.7.0-sim"
        assert entry["pinned"] is False and entry["status"] == "ready"
        assert entry["slot_pool"] == "standard/transcription"
        assert entry["is_busy"] is False and entry["backend_health"] == "ready"
        assert health["pinned_models"]["llm"] == 0
        assert health["max_models"]["classification"] == 1
        assert health["telemetry"] == {"enabled": False} and health["update_check_done"]


def test_loading_shows_in_health_only_from_v10_8(lemond_sim, c):
    for shape, visible in (("11", True), ("10.6", False)):
        lemond_sim.reset()
        # 2 s: the checks below must fall inside the load even on a busy, slow machine
        lemond_sim.configure(version_shape=shape, load_delay=2.0)
        thread = threading.Thread(target=lambda: httpx.post(
            f"{lemond_sim.url}/v1/load", json={"model_name": QWEN}, timeout=10))
        thread.start()
        assert wait_for(lambda: lemond_sim.state()["in_flight_loads"] == [QWEN])
        entries = c.get("/v1/health").json()["all_models_loaded"]
        if visible:
            assert [(e["model_name"], e["status"]) for e in entries] == [(QWEN, "loading")]
        else:
            assert entries == []
        thread.join()
        assert loaded_names(c) == [QWEN]


# ---- models ---------------------------------------------------------------------------


def test_models_list_and_detail(c):
    downloaded = c.get("/v1/models").json()["data"]
    every = c.get("/v1/models?show_all=true").json()["data"]
    assert {m["id"] for m in downloaded} >= {QWEN, EMBED, WHISPER}
    assert NOT_DOWNLOADED not in {m["id"] for m in downloaded}
    # the catalogue minus what Linux filters out (ryzenai-llm), plus the simulated flm's models
    assert len(every) == 178 - 79 + 3
    assert "ryzenai-llm" not in {m["recipe"] for m in every}
    hidden = c.get("/v1/models/Qwen2.5-0.5B-Instruct-CPU")
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_supported"
    assert len(c.get("/v1/models?show_all=1").json()["data"]) == len(downloaded)
    model = c.get(f"/v1/models/{QWEN}").json()
    assert model["created"] == 1234567890 and model["checkpoint"] == "unsloth/Qwen3-0.6B-GGUF:Q4_0"
    assert model["recipe"] == "llamacpp" and model["downloaded"] is True
    missing = c.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


# ---- load / unload / residency --------------------------------------------------------


def test_load_success_and_errors(c):
    response = load(c, QWEN)
    assert response.status_code == 200
    assert response.json() == {"status": "success", "model_name": QWEN,
                               "checkpoint": "unsloth/Qwen3-0.6B-GGUF:Q4_0", "recipe": "llamacpp"}
    missing = load(c, "No-Such-Model")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["type"] == error["code"] == "model_not_found"
    assert error["param"] == "model" and error["requested_model"] == "No-Such-Model"
    assert error["message"].startswith("Model 'No-Such-Model' was not found. Available models "
                                       "include: '")
    assert "and 99 more. Use 'lemonade list' or GET /api/v1/models?show_all=true" in \
        error["message"]
    empty = c.post("/v1/load", content=b"")
    assert (empty.status_code, empty.json()) == (
        400, {"error": "Request body is required but was empty"})
    bad = c.post("/v1/load", content=b"{nope")
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("Invalid JSON in request body: ")
    nameless = c.post("/v1/load", json={"model": QWEN})
    assert nameless.status_code == 400
    assert nameless.json()["error"]["type"] == "invalid_request_error"


def test_same_options_is_a_noop_and_new_options_reload(lemond_sim, c):
    load(c, QWEN)
    load(c, QWEN)
    state = lemond_sim.state()
    assert state["load_calls"] == {QWEN: 1} and state["load_requests"] == {QWEN: 2}
    assert load(c, QWEN, ctx_size=8192, llamacpp_backend="rocm").status_code == 200
    state = lemond_sim.state()
    assert state["load_calls"] == {QWEN: 2}
    assert [e["reason"] for e in state["evictions"]] == ["reload"]
    entry = c.get("/v1/health").json()["all_models_loaded"][0]
    assert entry["recipe_options"] == {"ctx_size": 8192, "llamacpp_backend": "rocm",
                                       "llamacpp_args": ""}
    assert entry["device"] == "gpu"
    # auto-load from inference never reloads for option changes
    c.post("/v1/chat/completions", json={"model": QWEN, "messages": []})
    assert lemond_sim.state()["load_calls_total"] == 2


def test_lru_eviction_is_per_type(lemond_sim, c):
    load(c, QWEN)
    load(c, EMBED)
    assert set(loaded_names(c)) == {QWEN, EMBED}  # different types, different pools
    load(c, QWEN4B)
    assert set(loaded_names(c)) == {EMBED, QWEN4B}
    assert lemond_sim.state()["evictions"][0] == {**lemond_sim.state()["evictions"][0],
                                                  "model": QWEN, "reason": "lru"}

    lemond_sim.reset()
    lemond_sim.configure(max_loaded_models=2)
    load(c, QWEN)
    load(c, QWEN4B)
    c.post("/v1/chat/completions", json={"model": QWEN, "messages": []})  # QWEN is fresher
    load(c, NOT_DOWNLOADED)  # downloads first, then evicts the LRU llm
    assert set(loaded_names(c)) == {QWEN, NOT_DOWNLOADED}
    assert NOT_DOWNLOADED in lemond_sim.state()["downloaded"]
    assert c.get("/v1/health").json()["max_models"]["llm"] == 2


def test_pins_block_eviction_from_v10_8(lemond_sim, c):
    lemond_sim.configure(version_shape="11")
    load(c, QWEN, pinned=True)
    blocked = load(c, QWEN4B)
    assert blocked.status_code == 409
    assert blocked.json()["error"]["code"] == "slots_pinned_error"
    assert blocked.json()["error"]["message"] == (
        "All loaded models of type standard/llm are pinned. Unload a model first.")
    assert c.get("/v1/health").json()["pinned_models"]["llm"] == 1
    assert c.post("/internal/pin", json={"model_name": QWEN, "pinned": False}).json() == {
        "status": "success", "model_name": QWEN, "pinned": False}
    assert load(c, QWEN4B).status_code == 200
    assert c.post("/internal/pin", json={"model_name": QWEN, "pinned": True}).status_code == 400

    lemond_sim.reset()  # v10.6 ignores `pinned`
    load(c, QWEN, pinned=True)
    assert load(c, QWEN4B).status_code == 200
    assert loaded_names(c) == [QWEN4B]


def test_failed_load_evicts_everything(lemond_sim, c):
    load(c, QWEN)
    load(c, EMBED)
    lemond_sim.fault("fail_next_load")
    response = load(c, RERANK)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "model_load_error"
    assert loaded_names(c) == []
    assert load(c, RERANK).status_code == 200  # the fault was one-shot
    lemond_sim.configure(fail_models=[QWEN])
    assert load(c, QWEN).status_code == 500
    assert lemond_sim.state()["load_failures"] == {RERANK: 1, QWEN: 1}


def test_file_not_found_load_failure_evicts_nothing_and_does_not_retry(lemond_sim, c):
    """§3.6: an error that looks like file-not-found is the answer at once: no eviction,
    no retry, 500 model_load_error carrying lemond's message."""
    load(c, QWEN)
    load(c, EMBED)
    lemond_sim.configure(load_delay=0.6)
    for message in ("model file not found: /models/x.gguf", "path does not exist",
                    "open: No such file or directory"):
        lemond_sim.fault("fail_next_load", model=RERANK, message=message)
        response = load(c, RERANK)
        assert (response.status_code, response.json()["error"]["code"]) == (
            500, "model_load_error")
        assert message in response.json()["error"]["message"]
        assert set(loaded_names(c)) == {QWEN, EMBED}
    assert lemond_sim.state()["evictions"] == []
    assert load(c, RERANK).status_code == 200


def test_failed_load_evicts_everything_and_retries_once(lemond_sim, c):
    """§3.6: any other error evicts every model, then retries once; a retry that works is
    a plain success, one that fails again is the 500."""
    lemond_sim.configure(max_loaded_models=-1, load_delay=0.2)
    load(c, QWEN)
    load(c, EMBED)
    lemond_sim.fault("fail_next_load", model=RERANK, message="llama-server crashed: OOM",
                     transient=True)
    response = load(c, RERANK)
    assert response.status_code == 200 and response.json()["model_name"] == RERANK
    assert loaded_names(c) == [RERANK]
    state = lemond_sim.state()
    assert {e["model"] for e in state["evictions"] if e["reason"] == "load_failure"} == {
        QWEN, EMBED}
    assert state["load_failures"] == {RERANK: 1} and state["load_calls"][RERANK] == 1

    load(c, QWEN)
    lemond_sim.fault("fail_next_load", model=EMBED, message="llama-server crashed: OOM")
    started = time.monotonic()
    response = load(c, EMBED)
    assert time.monotonic() - started >= 0.2  # the failed attempt and the failed retry
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": f"Failed to load model '{EMBED}': llama-server crashed: OOM",
        "type": "model_load_error", "param": "model", "code": "model_load_error",
        "requested_model": EMBED}
    assert loaded_names(c) == []


def test_failed_load_waits_for_in_flight_requests_before_evicting(lemond_sim, c):
    """§3.4: eviction after a failed load waits for a streaming chat to finish."""
    lemond_sim.configure(token_delay=0.1)
    load(c, QWEN)
    chunks: list[str] = []

    def stream():
        with httpx.stream("POST", f"{lemond_sim.url}/v1/chat/completions", timeout=10,
                          json={"model": QWEN, "stream": True, "messages": []}) as r:
            chunks.extend(line for line in r.iter_lines() if line)

    reader = threading.Thread(target=stream)
    reader.start()
    assert wait_for(lambda: lemond_sim.state()["in_flight_requests"] == 1)
    lemond_sim.fault("fail_next_load", model=EMBED)
    response = load(c, EMBED)
    assert response.status_code == 500
    assert lemond_sim.state()["in_flight_requests"] == 0  # the load waited for the stream
    reader.join()
    assert chunks[-1] == "data: [DONE]"  # the stream was never cut
    assert loaded_names(c) == []


def test_flm_models_run_on_the_npu(c):
    assert load(c, "qwen3-0.6b-FLM").status_code == 200  # not downloaded: pulled first
    entry = c.get("/v1/health").json()["all_models_loaded"][0]
    assert (entry["device"], entry["recipe"], entry["type"]) == ("npu", "flm", "llm")


def test_unload(c):
    load(c, QWEN)
    load(c, EMBED)
    response = c.post("/v1/unload", json={"model_name": QWEN})
    assert response.json() == {"status": "success", "message": "Model unloaded successfully",
                               "model_name": QWEN}
    missing = c.post("/v1/unload", json={"model": QWEN})
    assert (missing.status_code, missing.json()) == (404, {"error": f"Model not loaded: {QWEN}"})
    everything = c.post("/v1/unload")
    assert everything.json() == {"status": "success",
                                 "message": "All models unloaded successfully"}
    assert loaded_names(c) == []


def test_delete(c):
    response = c.post("/v1/delete", json={"model_name": "No-Such-Model"})
    assert response.status_code == 422 and isinstance(response.json()["error"], str)
    load(c, EMBED)
    assert c.post("/v1/delete", json={"model_name": EMBED}).json() == {
        "status": "success", "message": f"Deleted model: {EMBED}"}
    assert loaded_names(c) == []
    assert EMBED not in {m["id"] for m in c.get("/v1/models").json()["data"]}


def test_deleting_a_model_that_is_not_downloaded_is_a_500(c):
    """§2.7: 422 only for "Model not found" / "not supported"; anything else is a 500."""
    response = c.post("/v1/delete", json={"model_name": NOT_DOWNLOADED})
    assert response.status_code == 500
    assert response.json() == {"error": "Model has no resolved_path, cannot determine files "
                                        "to delete"}
    hidden = c.post("/v1/delete", json={"model": "Qwen2.5-0.5B-Instruct-CPU"})
    assert hidden.status_code == 422 and "not supported" in hidden.json()["error"]
    missing = c.post("/v1/delete", json={"model": "No-Such-Model"})
    assert (missing.status_code, missing.json()) == (
        422, {"error": "Model not found: No-Such-Model"})


def test_loads_are_serialized(lemond_sim):
    lemond_sim.configure(load_delay=0.3)
    started = time.monotonic()
    threads = [threading.Thread(target=lambda n=name: httpx.post(
        f"{lemond_sim.url}/v1/load", json={"model_name": n}, timeout=10))
        for name in (QWEN, EMBED, RERANK)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started >= 0.85
    assert lemond_sim.state()["load_calls_total"] == 3


# ---- pull -----------------------------------------------------------------------------


def sse_events(response):
    event = None
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, line[5:].strip()
            event = None


def test_pull_streams_progress_then_complete(lemond_sim, c):
    with c.stream("POST", "/v1/pull", json={"model_name": NOT_DOWNLOADED, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [(e, json.loads(d)) for e, d in sse_events(r)]
    kinds = [e for e, _ in events]
    assert kinds[-1] == "complete" and kinds.count("progress") == 10
    first = events[0][1]
    assert set(first) == {"file", "file_index", "total_files", "bytes_downloaded",
                          "bytes_total", "total_download_size",
                          "bytes_previously_downloaded", "percent"}
    assert first["total_files"] == 2 and events[-1][1]["percent"] == 100
    assert NOT_DOWNLOADED in lemond_sim.state()["downloaded"]
    with c.stream("POST", "/v1/pull", json={"model_name": QWEN, "stream": True}) as r:
        assert list(sse_events(r)) == [("complete", '{"status":"ok"}')]
    assert c.post("/v1/pull", json={"model_name": QWEN}).json() == {"status": "success",
                                                                    "model_name": QWEN}
    unknown = c.post("/v1/pull", json={"model_name": "No-Such-Model"})
    assert unknown.status_code == 400 and set(unknown.json()) == {"error", "code"}
    with c.stream("POST", "/v1/pull", json={"model_name": "No-Such-Model", "stream": True}) as r:
        assert r.status_code == 200
        assert [e for e, _ in sse_events(r)] == ["error"]


def test_pull_registers_user_models(c):
    body = {"model_name": "user.Tiny-GGUF", "checkpoint": "someone/Tiny-GGUF:Q4_K_M",
            "recipe": "llamacpp", "labels": ["embeddings"]}
    assert c.post("/v1/pull", json=body).json() == {"status": "success",
                                                    "model_name": "user.Tiny-GGUF"}
    assert c.get("/v1/models/user.Tiny-GGUF").json()["downloaded"] is True
    assert c.post("/v1/embeddings", json={"model": "user.Tiny-GGUF", "input": "x"}) \
        .status_code == 200


def test_closing_the_pull_stream_cancels_the_download(lemond_sim, c):
    lemond_sim.configure(pull_delay=3.0)
    with c.stream("POST", "/v1/pull", json={"model_name": NOT_DOWNLOADED, "stream": True}) as r:
        for event, _ in sse_events(r):
            assert event == "progress"
            break
    assert wait_for(lambda: NOT_DOWNLOADED in lemond_sim.state()["cancelled_pulls"], 3)
    assert NOT_DOWNLOADED not in lemond_sim.state()["downloaded"]


JOB_KEYS = {"id", "type", "model_name", "status", "running", "file", "file_index",
            "total_files", "bytes_downloaded", "bytes_total", "total_download_size",
            "bytes_previously_downloaded", "completed_files_bytes",
            "cumulative_bytes_downloaded", "overall_bytes_downloaded", "percent", "complete"}


def test_pull_without_subscribing_returns_a_download_job(lemond_sim, c):
    """§2.8/§2.9 (v10.7+): `stream:true, subscribe:false` answers a job snapshot at once;
    `/v1/downloads` lists the jobs; a second pull returns the same job."""
    lemond_sim.configure(version_shape="11", pull_delay=0.6)
    body = {"model_name": NOT_DOWNLOADED, "stream": True, "subscribe": False}
    response = c.post("/v1/pull", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    job = response.json()
    assert set(job) == JOB_KEYS
    assert (job["id"], job["type"], job["model_name"]) == (
        f"model:{NOT_DOWNLOADED}", "model", NOT_DOWNLOADED)
    assert (job["status"], job["running"], job["complete"]) == ("downloading", True, False)
    assert job["total_files"] == 2 and job["total_download_size"] > 0
    again = c.post("/v1/pull", json=body).json()
    assert again["id"] == job["id"]
    assert [j["id"] for j in c.get("/v1/downloads").json()] == [job["id"]]
    assert wait_for(lambda: c.get("/v1/downloads").json()[0]["percent"] > 0)

    assert wait_for(lambda: c.get("/v1/downloads").json()[0]["status"] == "completed", 5)
    done = c.get("/v1/downloads").json()[0]
    assert (done["running"], done["complete"], done["percent"]) == (False, True, 100)
    assert done["overall_bytes_downloaded"] == done["total_download_size"]
    assert c.get(f"/v1/models/{NOT_DOWNLOADED}").json()["downloaded"] is True
    # an SSE pull (subscribe defaults to true) still streams, and shows as a job too
    sse_pull = {"model_name": "Qwen3-8B-GGUF", "stream": True}
    with c.stream("POST", "/v1/pull", json=sse_pull) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for event, _ in sse_events(r):
            assert event == "progress"
            assert [j["status"] for j in c.get("/v1/downloads").json()
                    if j["model_name"] == "Qwen3-8B-GGUF"] == ["downloading"]
            break


def test_download_jobs_can_be_paused_cancelled_and_removed(lemond_sim, c):
    lemond_sim.configure(version_shape="11", pull_delay=3.0)
    body = {"model_name": NOT_DOWNLOADED, "stream": True, "subscribe": False}
    job_id = c.post("/v1/pull", json=body).json()["id"]
    control = "/v1/downloads/control"
    assert c.post(control, json={"id": job_id, "action": "pause"}).json() == {"status": "ok"}
    paused = c.get("/v1/downloads").json()[0]
    assert (paused["status"], paused["running"]) == ("paused", False)
    time.sleep(0.4)
    assert c.get("/v1/downloads").json()[0]["percent"] == paused["percent"]
    resumed = c.post("/v1/pull", json=body).json()  # pulling again resumes it
    assert (resumed["id"], resumed["status"]) == (job_id, "downloading")
    assert c.post(control, json={"id": job_id, "action": "cancel"}).json() == {"status": "ok"}
    assert c.get("/v1/downloads").json()[0]["status"] == "cancelled"
    assert NOT_DOWNLOADED not in lemond_sim.state()["downloaded"]
    assert c.post(control, json={"id": job_id, "action": "remove"}).json() == {"status": "ok"}
    assert c.get("/v1/downloads").json() == []
    assert c.post(control, json={"id": job_id, "action": "remove"}).json() == {
        "status": "ok", "missing": True}
    bad = c.post(control, json={"id": job_id, "action": "explode"})
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)


def assert_completed_job(job):
    """A finished job reads like its last progress step (§2.9)."""
    total = job["total_download_size"]
    assert (job["status"], job["running"], job["complete"], job["percent"]) == (
        "completed", False, True, 100)
    assert job["file_index"] == job["total_files"] == 2
    assert 0 < job["bytes_downloaded"] == job["bytes_total"] < total  # the last, small file
    assert job["completed_files_bytes"] == job["cumulative_bytes_downloaded"] == total
    assert job["overall_bytes_downloaded"] == job["bytes_previously_downloaded"] + total


def test_a_completed_download_job_snapshot_is_self_consistent(lemond_sim, c):
    """§2.9: a completed job shows its last file (index, bytes = its size), totals at the
    full size and 100 % — whether it ran or had nothing to download."""
    lemond_sim.configure(version_shape="11", pull_delay=0.3)
    already = c.post("/v1/pull", json={"model_name": QWEN, "stream": True,
                                       "subscribe": False}).json()
    assert_completed_job(already)

    body = {"model_name": NOT_DOWNLOADED, "stream": True, "subscribe": False}
    first = c.post("/v1/pull", json=body).json()
    assert (first["file_index"], first["bytes_downloaded"]) == (1, 0)
    assert wait_for(lambda: c.get("/v1/downloads").json()[-1]["status"] == "completed", 5)
    ran = next(j for j in c.get("/v1/downloads").json() if j["model_name"] == NOT_DOWNLOADED)
    assert_completed_job(ran)
    assert ran["file"] != first["file"]
    # pulling it again (now downloaded) answers the same completed snapshot
    assert c.post("/v1/pull", json=body).json() == ran


def test_download_jobs_exist_from_v10_6_and_sse_pulls_make_none_there(lemond_sim, c):
    """v10.6.0 has `/v1/downloads` and `subscribe:false` jobs; a plain SSE pull stays tied
    to its response and registers no job there (it does from v10.7)."""
    assert c.get("/v1/downloads").json() == []  # the default shape is v10.6
    with c.stream("POST", "/v1/pull", json={"model_name": NOT_DOWNLOADED,
                                            "stream": True}) as r:
        assert [e for e, _ in sse_events(r)][-1] == "complete"
    assert c.get("/v1/downloads").json() == []
    lemond_sim.configure(version_shape="10.0")
    assert c.get("/api/v1/downloads").status_code == 404


def test_a_refused_pull_job_ends_in_error_and_can_be_removed(c):
    """Server::start_download_job runs the model's checks in the job: an unknown name is
    a job in `error` (with lemond's `unknown_model` code), visible until removed."""
    job = c.post("/v1/pull", json={"model_name": "No-Such-Model", "stream": True,
                                   "subscribe": False}).json()
    assert (job["id"], job["model_name"], job["status"]) == (
        "model:No-Such-Model", "No-Such-Model", "downloading")
    assert wait_for(lambda: c.get("/v1/downloads").json()[0]["status"] == "error")
    failed = c.get("/v1/downloads").json()[0]
    assert failed["running"] is False and failed["code"] == "unknown_model"
    assert "`user` namespace" in failed["error"]
    control = "/v1/downloads/control"
    assert c.post(control, json={"action": "remove"}).status_code == 400
    assert c.post(control, json={"id": job["id"], "action": "remove"}).json() == {
        "status": "ok"}
    assert c.get("/v1/downloads").json() == []


# ---- inference ------------------------------------------------------------------------


def test_chat_completion(lemond_sim, c):
    nothing = c.post("/v1/chat/completions", json={"messages": []})
    assert (nothing.status_code, nothing.json()) == (
        400, {"error": "No model loaded and no model specified in request"})
    response = c.post("/v1/chat/completions",
                      json={"model": QWEN, "messages": [{"role": "user", "content": "hi there"}]})
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == QWEN
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["total_tokens"] > 0 and "predicted_per_second" in body["timings"]
    assert response.json()["choices"] == c.post(  # deterministic
        "/v1/chat/completions",
        json={"model": QWEN, "messages": [{"role": "user", "content": "hi there"}]},
    ).json()["choices"]
    wrong = c.post("/v1/chat/completions", json={"model": EMBED, "messages": []})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["message"] == ("This model does not support chat completion. "
                                                "Only LLM models support this endpoint.")
    stats = c.get("/v1/stats").json()
    assert stats["output_tokens"] > 0 and stats["prompt_tokens"] > 0


def test_chat_streaming_ends_with_done(lemond_sim, c):
    lemond_sim.configure(ttft=0.2)
    started = time.monotonic()
    with c.stream("POST", "/v1/chat/completions",
                  json={"model": QWEN, "stream": True, "messages": []}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert time.monotonic() - started >= 0.2
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
    assert text.startswith("Simulated reply from")


def test_other_modalities(lemond_sim, c):
    lemond_sim.configure(max_loaded_models=-1)
    first = c.post("/v1/embeddings", json={"model": EMBED, "input": ["a", "b"]}).json()
    again = c.post("/v1/embeddings", json={"model": EMBED, "input": "a"}).json()
    assert len(first["data"]) == 2 and len(first["data"][0]["embedding"]) == 768
    assert first["data"][0]["embedding"] == again["data"][0]["embedding"]
    ranked = c.post("/v1/reranking", json={"model": RERANK, "query": "red apple",
                                        "documents": ["a red apple", "blue sky"]}).json()
    assert [r["index"] for r in ranked["results"]] == [0, 1]
    assert ranked["results"][0]["relevance_score"] > ranked["results"][1]["relevance_score"]
    speech = c.post("/v1/audio/speech", json={"model": "kokoro-v1", "input": "hello",
                                              "response_format": "wav"})
    assert speech.headers["content-type"] == "audio/wav" and speech.content[:4] == b"RIFF"
    text = c.post("/v1/audio/transcriptions", data={"model": WHISPER},
                  files={"file": ("a.wav", speech.content, "audio/wav")})
    assert text.status_code == 200 and text.json()["text"]
    image = c.post("/v1/images/generations", json={"model": "SD-Turbo", "prompt": "a cat",
                                                   "size": "64x64"}).json()
    assert base64.b64decode(image["data"][0]["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(loaded_names(c)) == 5


# ---- faults ---------------------------------------------------------------------------


def test_faults(lemond_sim, c):
    lemond_sim.fault("hang", seconds=5)
    with pytest.raises(httpx.ReadTimeout):
        c.get("/v1/health", timeout=0.3)
    assert lemond_sim.state()["faults"]["hang"] == 5  # /__sim__ never hangs
    lemond_sim.fault("clear")
    assert c.get("/v1/health").status_code == 200

    lemond_sim.fault("malformed_json")
    broken = c.get("/v1/health")
    assert broken.status_code == 200
    with pytest.raises(ValueError):
        json.loads(broken.text)
    lemond_sim.fault("clear")

    lemond_sim.fault("html_error")
    gateway = c.get("/v1/health")
    assert gateway.status_code == 502 and "Bad Gateway" in gateway.text
    lemond_sim.fault("clear")
    lemond_sim.fault("error_500")
    assert c.get("/v1/health").json() == {"error": "Internal server error"}
    lemond_sim.fault("clear")

    load(c, QWEN)
    lemond_sim.fault("evict_all")
    assert loaded_names(c) == []
    load(c, QWEN)
    lemond_sim.fault("restart")
    assert loaded_names(c) == []
    assert c.get("/v1/stats").json() == {"error": {"message": "No model loaded",
                                                   "type": "model_not_loaded"}}
    assert c.post("/__sim__/fault", json={"kind": "nope"}).status_code == 400


# ---- config, logs, process lifecycle --------------------------------------------------


def test_internal_config(lemond_sim, c):
    unknown = c.post("/internal/set", json={"no_such_key": 1})
    assert unknown.status_code == 400 and isinstance(unknown.json()["error"], str)
    assert c.post("/internal/set", json={"max_loaded_models": 3}).json() == {
        "status": "success", "updated": {"max_loaded_models": 3}}
    config = c.get("/internal/config").json()
    assert config["max_loaded_models"] == 3 and config["ctx_size"] == 4096
    assert c.get("/v1/health").json()["max_models"]["llm"] == 3
    assert c.get("/v1/params").status_code == 405  # GET /params arrived in v10.10
    lemond_sim.configure(version_shape="11")
    assert c.get("/v1/params").json()["ctx_size"] == -1


def test_v11_config_is_heads_config_version_2(lemond_sim, c):
    """§4.2: the "11" shape's config is HEAD's (`broadcast`, not `no_broadcast`, …);
    v10.6's stays its own defaults.json."""
    # lemond v10.6.0's own defaults (a copy of the shared lemond-defaults-v10.6.0.json)
    v106 = json.loads((ROOT / "providers/lemonade/data/defaults.json").read_text())
    config = c.get("/internal/config").json()
    assert config["config_version"] == 1 and config["no_broadcast"] is False
    assert "broadcast" not in config and "auto_check_model_updates" not in config
    assert {**config, "port": v106["port"], "host": v106["host"]} == v106

    lemond_sim.configure(version_shape="11")
    config = c.get("/v1/params").json()
    assert config["config_version"] == 2
    assert config["broadcast"] is True and "no_broadcast" not in config
    assert config["auto_check_model_updates"] is True
    assert (config["global_timeout"], config["ctx_size"], config["max_loaded_models"]) == (
        600, -1, 1)
    expected = {"port", "host", "log_level", "global_timeout", "max_loaded_models", "ctx_size",
                "broadcast", "websocket_port", "extra_models_dir", "models_dir",
                "default_model_source", "offline", "auto_check_model_updates",
                "no_fetch_executables", "disable_model_filtering", "enable_dgpu_gtt",
                "inhibit_suspend", "rocm_channel", "rocm_install_method", "config_version",
                "cloud_providers", "telemetry", "llamacpp", "whispercpp", "sdcpp", "flm",
                "ryzenai", "kokoro", "moonshine", "onnxruntime", "openmoss", "vllm", "acestep",
                "thinksound", "trellis", "thenoise"}
    assert set(config) == expected
    assert c.get("/internal/config/defaults").json()["broadcast"] is True

    assert c.post("/internal/set", json={"broadcast": False}).json() == {
        "status": "success", "updated": {"broadcast": False}}
    assert c.get("/internal/config").json()["broadcast"] is False
    assert c.post("/internal/set", json={
        "telemetry": {"enabled": True, "otlp": {"headers": {"x-team": "ai"}}}}
    ).status_code == 200
    telemetry = c.get("/internal/config").json()["telemetry"]
    assert telemetry["enabled"] is True and telemetry["otlp"]["headers"] == {"x-team": "ai"}
    assert telemetry["otlp"]["protocol"] == "http/protobuf"  # nested keys merge
    for bad in ({"no_broadcast": True}, {"broadcast": "no"}, {"auto_check_model_updates": 1},
                {"telemetry": {"otlp": {"semantics": [1]}}}, {"cloud_providers": "x"},
                {"telemetry": {"nope": 1}}, {"config_version": "2"}):
        response = c.post("/internal/set", json=bad)
        assert response.status_code == 400, bad
        assert isinstance(response.json()["error"], str)
    assert c.post("/v1/params", json={"auto_check_model_updates": False}).status_code == 200
    assert c.get("/v1/params").json()["auto_check_model_updates"] is False


def test_params_and_internal_config_show_the_same_effective_config(lemond_sim, c):
    """§2.10: both are the full effective config, `port` the one lemond listens on."""
    lemond_sim.configure(version_shape="11")
    c.post("/internal/set", json={"log_level": "debug"})
    c.post("/v1/params", json={"global_timeout": 900})
    params = c.get("/v1/params").json()
    assert params["port"] == lemond_sim.port
    assert (params["log_level"], params["global_timeout"]) == ("debug", 900)


@pytest.mark.parametrize("shape", ["10.6", "11"])
def test_internal_set_refuses_values_a_load_would_refuse(lemond_sim, c, shape):
    """§2.10 "Invalid → 400 {"error": "..."}": values /v1/load refuses (ctx_size not
    positive, or -1 = auto from v10.8; a backend not in the recipe's list; managed
    llama-server flags from v11 — v10.x stores them and the backend fails at load) are
    refused by /internal/set and POST /v1/params with /v1/load's reasons."""
    lemond_sim.configure(version_shape=shape)
    before = c.get("/internal/config").json()
    if shape == "10.6":  # RuntimeConfig::validate at v10.6.0
        cases = [({"ctx_size": -5}, "'ctx_size' must be positive"),
                 ({"ctx_size": 0}, "'ctx_size' must be positive"),
                 ({"ctx_size": -1}, "'ctx_size' must be positive")]
    else:
        cases = [({"ctx_size": -5}, "ctx_size must be a positive integer or -1, got -5"),
                 ({"ctx_size": 0}, "ctx_size must be a positive integer or -1, got 0"),
                 ({"llamacpp": {"args": "--port 9000"}},
                  "llamacpp.args may not contain '--port' (Lemonade manages it)")]
    cases += [({"llamacpp": {"backend": "bogus"}},
               "llamacpp.backend must be one of auto, vulkan, rocm, cpu, metal, cuda, system, "
               "got 'bogus'"),
              ({"whispercpp": {"backend": "bogus"}}, "whispercpp.backend must be one of"),
              ({"sdcpp": {"backend": "gpu"}}, "sdcpp.backend must be one of"),
              ({"vllm": {"backend": "cuda"}}, "vllm.backend must be one of auto, rocm")]
    for bad, reason in cases:
        for path in ("/internal/set", "/v1/params"):
            response = c.post(path, json=bad)
            assert response.status_code == 400, (path, bad)
            assert set(response.json()) == {"error"}, (path, bad)
            assert reason in response.json()["error"], (path, bad)
    assert c.get("/internal/config").json() == before  # nothing stored
    assert load(c, QWEN).status_code == 200  # and loads still work
    refused = load(c, WHISPER, whispercpp_backend="bogus")  # the same rule on /v1/load
    assert refused.status_code == 400 and "whispercpp_backend must be one of" in \
        refused.json()["error"]["message"]

    good = {"ctx_size": 8192, "llamacpp": {"backend": "rocm"}, "whispercpp": {"backend": "auto"}}
    assert c.post("/internal/set", json=good).json() == {"status": "success", "updated": good}
    assert c.post("/internal/set", json={"ctx_size": -1}).status_code == (
        400 if shape == "10.6" else 200)
    assert c.post("/v1/params", json={"ctx_size": 8192}).status_code == 200
    assert load(c, QWEN4B).status_code == 200
    options = c.get("/v1/health").json()["all_models_loaded"][0]["recipe_options"]
    assert (options["ctx_size"], options["llamacpp_backend"]) == (8192, "rocm")


@pytest.mark.parametrize("shape", ["10.6", "11"])
def test_effective_config_shows_where_the_simulator_listens(lemond_sim, c, shape):
    """§4.2 layering (`lemond --port/--host` above config.json) for both host and port:
    the simulator was started on 127.0.0.1 and keeps listening there. /internal/set of
    port/host answers like lemond (`updated`) and is stored, but not rebound."""
    lemond_sim.configure(version_shape=shape)
    config = c.get("/internal/config").json()
    assert (config["host"], config["port"]) == ("127.0.0.1", lemond_sim.port)
    other = 18080  # stored, never bound
    response = c.post("/internal/set", json={"port": other, "host": "0.0.0.0"})
    assert response.json() == {"status": "success", "updated": {"port": other,
                                                                "host": "0.0.0.0"}}
    stored = lemond_sim.state()["persisted_config"]
    assert (stored["host"], stored["port"]) == ("0.0.0.0", other)
    config = c.get("/internal/config").json()
    assert (config["host"], config["port"]) == ("127.0.0.1", lemond_sim.port)


def upgrade_request(port, path, headers=None):
    """The bytes of a websocket upgrade request."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def raw_upgrade(port, path, headers=None):
    """A websocket upgrade over a plain socket (no client library in the way): the
    HTTP answer as (status, lower-cased headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(upgrade_request(port, path, headers))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return parse_head(data)


def parse_head(data):
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        assert key.strip().lower() not in headers, f"duplicate header {key}"
        headers[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def assert_default_headers(headers, allow_origin="*"):
    """§1's default headers (and `Access-Control-Allow-Origin: *` before v11.5)."""
    assert headers["access-control-allow-methods"] == "GET, POST, PUT, DELETE, OPTIONS"
    assert headers["access-control-allow-headers"].startswith("Content-Type, Authorization")
    assert headers["vary"] == "Origin"
    assert headers.get("access-control-allow-origin") == allow_origin


def test_websocket_upgrade_on_the_main_port_is_answered_like_the_plain_get(lemond_sim, c):
    """Before v10.8 the main (HTTP) port has no websocket: an upgrade is the plain GET it
    also is — a served route answers as usual, auth answers 401, only a path lemond does
    not serve gets the not-found 404 — each with §1's default headers."""
    port = lemond_sim.port
    status, headers, body = raw_upgrade(port, "/v1/health")
    assert (status, json.loads(body)) == (200, c.get("/v1/health").json())
    assert headers["content-type"] == "application/json"
    assert_default_headers(headers)
    status, headers, body = raw_upgrade(port, "/live")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert_default_headers(headers)
    for path in ("/v1/logs/stream", "/logs/stream", "/v1/nope"):
        status, headers, body = raw_upgrade(port, path)
        assert (status, json.loads(body)) == (404, {"error": {
            "message": "The requested endpoint does not exist", "type": "not_found",
            "path": path}})
        assert_default_headers(headers)

    lemond_sim.configure(api_key="k")
    plain = c.get("/v1/logs/stream")
    status, headers, body = raw_upgrade(port, "/v1/logs/stream")
    assert (status, json.loads(body)) == (plain.status_code, plain.json()) == (
        401, {"error": "Invalid or missing API key"})
    assert_default_headers(headers)
    status, _, body = raw_upgrade(port, "/v1/health", {"Authorization": "Bearer k"})
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert raw_upgrade(port, "/v1/logs/stream", {"Authorization": "Bearer k"})[0] == 404
    assert raw_upgrade(port, "/live")[0] == 200


def test_websocket_upgrade_to_the_v10_0_sse_log_route_gets_the_sse_stream(lemond_sim, c):
    """≤v10.0 the log stream is SSE at GET /api/v1/logs/stream; an upgrade to it is
    answered with that stream (which keeps streaming new lines)."""
    lemond_sim.configure(version_shape="10.0")
    with socket.create_connection(("127.0.0.1", lemond_sim.port), timeout=5) as sock:
        sock.sendall(upgrade_request(lemond_sim.port, "/api/v1/logs/stream"))
        data = b""
        while b"data: [" not in data:
            data += sock.recv(65536)
        status, headers, _ = parse_head(data)
        assert status == 200
        assert headers["content-type"].startswith("text/event-stream")
        assert_default_headers(headers)
        assert c.post("/api/v1/load", json={"model_name": QWEN}).status_code == 200
        while not any(QWEN in line and "ready" in line for line in data.decode().split("\n")
                      if line.startswith("data: ")):
            chunk = sock.recv(65536)
            assert chunk, "the stream ended"
            data += chunk


def listening_ports(pid):
    """TCP ports a process listens on (its socket inodes in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                parts = row.split()
                if parts[3] == "0A" and parts[9] in inodes:  # 0A = LISTEN
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def test_v10_0_shape_opens_no_websocket_listener(lemond_sim, lemond_sim_factory):
    """Websockets arrived in v10.1 (§0 table); ≤v10.0 health reports
    `log_streaming.websocket` false and no `websocket_port`."""
    sim = lemond_sim_factory(version_shape="10.0")
    assert sim.websocket_port is None
    assert listening_ports(sim.process.pid) == {sim.port}
    health = httpx.get(f"{sim.url}/api/v1/health").json()
    assert "websocket_port" not in health
    assert health["log_streaming"] == {"sse": True, "websocket": False}
    assert "(websocket port" not in sim.output()
    assert listening_ports(lemond_sim.process.pid) == {lemond_sim.port,
                                                       lemond_sim.websocket_port}


def test_log_websocket_placement_by_version(lemond_sim):
    """§2.15 and the targets section: v10.1-v10.7 serve the log stream only on the
    separate `websocket_port`; the main port answers the upgrade like any unknown GET
    (404); v10.8+ serve it on the main port (and keep the legacy port)."""
    ws_port = lemond_sim.websocket_port
    assert ws_port and ws_port != lemond_sim.port
    assert httpx.get(f"{lemond_sim.url}/v1/health").json()["websocket_port"] == ws_port
    for path in ("/logs/stream", "/v1/logs/stream"):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{lemond_sim.port}{path}", open_timeout=5)
        assert refused.value.response.status_code == 404
        assert json.loads(refused.value.response.body) == {"error": {
            "message": "The requested endpoint does not exist", "type": "not_found",
            "path": path}}
        with connect(f"ws://127.0.0.1:{ws_port}{path}", open_timeout=5) as ws:
            ws.send(json.dumps({"type": "logs.subscribe", "after_seq": None}))
            assert json.loads(ws.recv(timeout=5))["type"] == "logs.snapshot"
    assert httpx.get(f"http://127.0.0.1:{ws_port}/v1/health").status_code == 404

    lemond_sim.configure(version_shape="11")
    for port in (lemond_sim.port, ws_port):
        with connect(f"ws://127.0.0.1:{port}/api/v1/logs/stream", open_timeout=5) as ws:
            ws.send(json.dumps({"type": "logs.subscribe", "after_seq": None}))
            assert json.loads(ws.recv(timeout=5))["type"] == "logs.snapshot"

    lemond_sim.configure(version_shape="10.0")  # SSE logs; no websocket anywhere
    with pytest.raises(InvalidStatus):
        connect(f"ws://127.0.0.1:{ws_port}/logs/stream", open_timeout=5)


def test_websocket_port_can_be_chosen(lemond_sim_factory):
    port = free_port()
    sim = lemond_sim_factory(websocket_port=port)
    assert sim.websocket_port == port
    assert httpx.get(f"{sim.url}/v1/health").json()["websocket_port"] == port
    assert f"(websocket port {port})" in sim.output()


def test_websocket_subprotocol_credential(lemond_sim):
    """§1: a websocket may carry its key as a subprotocol `bearer.<base64url(key)>`
    offered next to lemond's application protocol, which is the one selected."""
    lemond_sim.configure(api_key="sekret/+key=")
    url = f"ws://127.0.0.1:{lemond_sim.websocket_port}/logs/stream"
    subscribe = json.dumps({"type": "logs.subscribe", "after_seq": None})

    def credential(key):
        return "bearer." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")

    with connect(url, subprotocols=["lemonade-realtime", credential("sekret/+key=")],
                 open_timeout=5) as ws:
        assert ws.subprotocol == "lemonade-realtime"
        ws.send(subscribe)
        assert json.loads(ws.recv(timeout=5))["type"] == "logs.snapshot"
    for protocols in (["lemonade-realtime", credential("wrong")], ["lemonade-realtime"]):
        with connect(url, subprotocols=protocols, open_timeout=5) as ws:
            ws.send(subscribe)
            error = json.loads(ws.recv(timeout=5))
            assert error == {"type": "error", "error": {
                "message": "Invalid or missing API key", "type": "authentication_error"}}
    with connect(f"{url}?api_key=sekret%2F%2Bkey%3D", open_timeout=5) as ws:  # still works
        ws.send(subscribe)
        assert json.loads(ws.recv(timeout=5))["type"] == "logs.snapshot"


def test_log_websocket(lemond_sim, c):
    with connect(f"ws://127.0.0.1:{lemond_sim.websocket_port}/logs/stream") as ws:
        ws.send(json.dumps({"type": "logs.subscribe", "after_seq": None}))
        snapshot = json.loads(ws.recv(timeout=5))
        assert snapshot["type"] == "logs.snapshot" and snapshot["entries"]
        assert set(snapshot["entries"][0]) == {"seq", "timestamp", "severity", "tag", "line"}
        load(c, QWEN)
        lines = []
        while not any(QWEN in line and "ready" in line for line in lines):
            message = json.loads(ws.recv(timeout=5))
            assert message["type"] == "logs.entry"
            lines.append(message["entry"]["line"])


def test_cli_process_lifecycle(lemond_sim_factory):
    sim = lemond_sim_factory(version_shape="10.0", api_key="k", downloaded=[QWEN], manage=True)
    assert "lemond simulator (version 10.0.0-sim) listening on http://127.0.0.1:" in sim.output()
    auth = {"Authorization": "Bearer k"}
    assert httpx.get(f"{sim.url}/api/v1/health").status_code == 401
    models = httpx.get(f"{sim.url}/api/v1/models", headers=auth).json()["data"]
    assert [m["id"] for m in models] == [QWEN]
    assert httpx.post(f"{sim.url}/internal/shutdown", headers=auth).status_code == 200
    assert sim.process.wait(timeout=5) == 0

    other = lemond_sim_factory()
    other.process.send_signal(signal.SIGTERM)
    assert other.process.wait(timeout=5) == 0


def test_counts_load_requests_open_at_once(lemond_sim):
    """The simulator measures how many /v1/load calls for one model overlap."""
    import concurrent.futures

    # 2 s: three threads' requests must all be open within it, even on a busy machine
    lemond_sim.configure(load_delay=2.0)
    body = {"model_name": "Qwen3-0.6B-GGUF"}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(lambda _: httpx.post(f"{lemond_sim.url}/v1/load", json=body,
                                                   timeout=10).status_code, range(3)))
    assert codes == [200, 200, 200]
    assert lemond_sim.state()["max_open_load_requests"]["Qwen3-0.6B-GGUF"] == 3


# ---- lemond conformance (issue #10), each checked in lemond's sources at the tag -------


TINY = "Tiny-Test-Model-GGUF"  # a built-in lemond's own endpoint tests use
GGUF = "unsloth/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct-Q2_K.gguf"


def model_ids(c, show_all=True):
    return {m["id"] for m in c.get(f"/v1/models{'?show_all=true' if show_all else ''}")
            .json()["data"]}


def pull_user(c, name, **body):
    return c.post("/v1/pull", json={"model_name": name, "checkpoint": GGUF,
                                    "recipe": "llamacpp", **body})


def test_a_user_model_is_published_under_its_bare_name(c):
    """Naming spec (v10.5+): a unique `user.X` is published as `X` in /v1/models,
    /v1/models/{id}, health and `model_loaded`; `X` and `user.X` both resolve to it,
    `builtin.X` does not."""
    assert pull_user(c, "user.Unique-Test").json() == {"status": "success",
                                                       "model_name": "user.Unique-Test"}
    ids = model_ids(c)
    assert "Unique-Test" in ids and "user.Unique-Test" not in ids
    for name in ("Unique-Test", "user.Unique-Test"):
        assert c.get(f"/v1/models/{name}").json()["id"] == "Unique-Test"
    assert c.get("/v1/models/builtin.Unique-Test").status_code == 404
    info = c.get("/v1/models/Unique-Test").json()
    assert info["labels"] == ["custom"] and info["suggested"] is True
    assert load(c, "user.Unique-Test").status_code == 200
    health = c.get("/v1/health").json()
    assert health["model_loaded"] == "Unique-Test"
    assert [m["model_name"] for m in health["all_models_loaded"]] == ["Unique-Test"]
    assert c.post("/v1/unload", json={"model_name": "Unique-Test"}).status_code == 200


def test_a_user_model_shadows_a_builtin_which_becomes_builtin_x(c):
    bare = c.get(f"/v1/models/{TINY}").json()
    assert c.get(f"/v1/models/builtin.{TINY}").json()["id"] == TINY  # not shadowed yet
    assert pull_user(c, f"user.{TINY}").status_code == 200
    ids = model_ids(c)
    assert {TINY, f"builtin.{TINY}"} <= ids and f"user.{TINY}" not in ids
    assert c.get(f"/v1/models/{TINY}").json()["checkpoint"] == GGUF  # the user model
    builtin = c.get(f"/v1/models/builtin.{TINY}").json()
    assert builtin["id"] == f"builtin.{TINY}"
    assert builtin["checkpoint"] == bare["checkpoint"] != GGUF
    assert c.post("/v1/delete", json={"model_name": f"user.{TINY}"}).status_code == 200
    assert c.get(f"/v1/models/{TINY}").json()["checkpoint"] == bare["checkpoint"]


def test_pull_refuses_reserved_names_and_unknown_models(c):
    for name in ("extra.X", "builtin.X", "user.builtin.X", "user.extra.X"):
        refused = pull_user(c, name)
        assert refused.status_code == 400 and "reserved" in refused.json()["error"]
    no_prefix = c.post("/v1/pull", json={"model_name": "Bare", "checkpoint": GGUF,
                                         "recipe": "llamacpp"})
    assert no_prefix.status_code == 400 and "`user.` prefix" in no_prefix.json()["error"]
    unknown = c.post("/v1/pull", json={"model_name": "No-Such-Model"})
    assert (unknown.status_code, unknown.json()["code"]) == (400, "unknown_model")
    no_variant = pull_user(c, "user.NoVariant", checkpoint="someone/Thing-GGUF")
    assert no_variant.status_code == 500 and "variant" in no_variant.json()["error"]
    no_recipe = c.post("/v1/pull", json={"model_name": "user.NoRecipe"})
    assert no_recipe.status_code == 500 and "not registered" in no_recipe.json()["error"]
    assert not {"X", "NoVariant", "NoRecipe"} & model_ids(c)


def test_pull_keeps_user_model_metadata(c):
    """register_user_model + download_model: the checkpoints, `custom` plus the implied
    labels, and the pull's recipe_options merged over the image defaults."""
    checkpoints = {"main": GGUF, "vae": "Comfy-Org/z_image:split_files/vae/ae.safetensors"}
    body = {"model_name": "user.Img", "checkpoints": checkpoints, "recipe": "sd-cpp",
            "image_defaults": {"steps": 33, "cfg_scale": 8.5, "width": 640, "height": 768},
            "recipe_options": {"sd-cpp_backend": "cpu"}}
    assert c.post("/v1/pull", json=body).status_code == 200
    info = c.get("/v1/models/user.Img").json()
    assert info["checkpoints"] == checkpoints and info["checkpoint"] == GGUF
    assert info["labels"] == ["custom", "image"] and info["recipe"] == "sd-cpp"
    assert info["recipe_options"] == {"steps": 33, "cfg_scale": 8.5, "width": 640,
                                      "height": 768, "sd-cpp_backend": "cpu"}


def test_extra_models_dir_is_scanned_and_shadows_builtins(c, tmp_path):
    (tmp_path / "Loose-Model.gguf").write_bytes(b"GGUF")
    (tmp_path / TINY).mkdir()
    (tmp_path / TINY / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / TINY / "mmproj-f16.gguf").write_bytes(b"GGUF")
    assert c.post("/internal/set", json={"extra_models_dir": str(tmp_path)}).status_code == 200
    ids = model_ids(c, show_all=False)  # discovered models count as downloaded
    assert {"Loose-Model", TINY} <= ids and "extra.Loose-Model" not in ids
    assert f"builtin.{TINY}" in model_ids(c)
    loose = c.get("/v1/models/extra.Loose-Model").json()
    assert loose["id"] == "Loose-Model"
    assert loose["checkpoint"] == str(tmp_path / "Loose-Model.gguf")
    extra = c.get(f"/v1/models/{TINY}").json()
    assert extra["checkpoint"] == str(tmp_path / TINY) and "vision" in extra["labels"]
    assert c.post("/v1/delete", json={"model_name": "Loose-Model"}).status_code == 500
    assert c.post("/internal/set", json={"extra_models_dir": ""}).status_code == 200
    assert "Loose-Model" not in model_ids(c)


@pytest.mark.parametrize("shape", ["10.6", "11"])
def test_rerank_routes_by_version(lemond_sim, c, shape):
    """v10.6.0 registers only `reranking`; `rerank` and `reranker` arrive in v11.7."""
    lemond_sim.configure(version_shape=shape)
    body = {"model": RERANK, "query": "q", "documents": ["q"]}
    assert c.post("/v1/reranking", json=body).status_code == 200
    for route in ("rerank", "reranker"):
        assert c.post(f"/v1/{route}", json=body).status_code == (200 if shape == "11" else 404)


def test_v10_6_stats_have_no_totals(lemond_sim, c):
    """Router::get_stats at v10.6.0: the most recent backend's telemetry, no *_total
    (from v10.7); with nothing loaded a 200 carrying an error object."""
    empty = c.get("/v1/stats")
    assert (empty.status_code, empty.json()) == (200, {"error": {
        "message": "No model loaded", "type": "model_not_loaded"}})
    load(c, QWEN)
    fresh = c.get("/v1/stats").json()
    assert set(fresh) == {"input_tokens", "output_tokens", "time_to_first_token",
                          "tokens_per_second", "decode_token_times", "prompt_tokens"}
    assert fresh["output_tokens"] == 0  # a new backend starts with empty telemetry
    c.post("/v1/chat/completions", json={"model": QWEN, "messages": []})
    assert c.get("/v1/stats").json()["output_tokens"] > 0
    lemond_sim.configure(version_shape="11")
    assert c.get("/v1/stats").json()["request_count_total"] == 1


@pytest.mark.parametrize("shape", ["10.6", "11"])
def test_a_reserved_llamacpp_arg(lemond_sim, c, shape):
    """v10.6.0 accepts the request; llama-server's start fails on the reserved flag, and
    Router::load_model's policy evicts every model, retries once, and answers 500
    model_load_error. The v11 shape refuses it up front, evicting nothing."""
    lemond_sim.configure(version_shape=shape, max_loaded_models=-1)
    load(c, EMBED)
    load(c, QWEN4B)
    response = load(c, QWEN, llamacpp_args="--no-mmap -ngl 99")
    if shape == "10.6":
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "model_load_error"
        assert "Argument '-ngl' is managed by Lemonade" in error["message"]
        assert loaded_names(c) == []
        assert lemond_sim.state()["load_failures"] == {QWEN: 1}
    else:
        assert response.status_code == 400
        assert set(loaded_names(c)) == {EMBED, QWEN4B}


def test_models_show_max_context_window_once_downloaded(c):
    assert c.get(f"/v1/models/{QWEN}").json()["max_context_window"] > 0
    assert "max_context_window" not in c.get(f"/v1/models/{NOT_DOWNLOADED}").json()
    assert "context_length" not in c.get(f"/v1/models/{QWEN}").json()


def test_install_and_uninstall_are_simulated(c):
    def state():
        return c.get("/v1/system-info").json()["recipes"]["whispercpp"]["backends"]["vulkan"]

    assert state()["state"] == "installable"
    assert state()["release_url"].startswith("https://github.com/")
    assert c.post("/v1/install", json={"recipe": "whispercpp"}).status_code == 400
    done = c.post("/v1/install", json={"recipe": "whispercpp", "backend": "vulkan"})
    assert done.json() == {"status": "success", "recipe": "whispercpp", "backend": "vulkan"}
    assert state()["state"] == "installed"
    refused = c.post("/v1/install", json={"recipe": "llamacpp", "backend": "metal"})
    assert refused.status_code == 400 and "Cannot install" in refused.json()["error"]
    load(c, WHISPER, whispercpp_backend="cpu")
    assert c.post("/v1/uninstall", json={"recipe": "whispercpp", "backend": "cpu"}).json()[
        "status"] == "success"
    assert loaded_names(c) == []  # its models were unloaded first
    with c.stream("POST", "/v1/install", json={"recipe": "whispercpp", "backend": "cpu",
                                               "stream": True}) as r:
        assert [e for e, _ in sse_events(r)][-1] == "complete"


def test_slots_and_tokenize_act_on_the_most_recent_llamacpp_model(c):
    assert c.get("/v1/slots").status_code == 400  # nothing loaded
    load(c, QWEN)
    slots = c.get("/v1/slots").json()
    assert isinstance(slots, list) and slots[0]["id"] == 0
    assert c.post("/v1/slots/0?action=erase").json()["id_slot"] == 0
    assert c.post("/v1/slots/0").status_code == 400  # no action
    assert "error" in c.post("/v1/slots/0?action=save").json()  # no --slot-save-path
    tokens = c.post("/v1/tokenize", json={"content": "Hello world!"}).json()["tokens"]
    assert len(tokens) == 2 and all(isinstance(t, int) for t in tokens)
    pieces = c.post("/v1/tokenize", json={"content": "Hello world!",
                                          "with_pieces": True}).json()["tokens"]
    assert [p["piece"] for p in pieces] == ["Hello", " world!"]
    assert c.post("/v1/tokenize", json={}).status_code == 400
    load(c, WHISPER)  # the most recent model has no slots: a 200 carrying an error
    refused = c.get("/v1/slots")
    assert refused.status_code == 200 and "error" in refused.json()


def process_running(pid):
    """Whether a process runs (a reaped or zombie child counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_loaded_models_have_real_backend_processes(lemond_sim, c):
    lemond_sim.configure(max_loaded_models=-1)
    load(c, QWEN)
    load(c, EMBED)
    pids = {m["model_name"]: m["pid"] for m in c.get("/v1/health").json()["all_models_loaded"]}
    assert all(process_running(pid) for pid in pids.values())
    with open(f"/proc/{pids[QWEN]}/stat") as fh:  # children of the simulator
        assert int(fh.read().rsplit(")", 1)[1].split()[1]) == lemond_sim.process.pid
    c.post("/v1/unload", json={"model_name": QWEN})
    assert not process_running(pids[QWEN]) and process_running(pids[EMBED])
    same = load(c, EMBED)  # a no-op load keeps the process
    assert same.status_code == 200
    assert c.get("/v1/health").json()["all_models_loaded"][0]["pid"] == pids[EMBED]
    lemond_sim.reset()
    assert not process_running(pids[EMBED])


def test_a_killed_backend_in_v10_6_stays_listed_and_fails_requests(lemond_sim, c):
    """v10.6.0 has no watchdog: WrappedServer only checks the pid it started, so health
    keeps listing a crashed backend, requests to it fail with a network error, and a
    /load with the same options is a no-op."""
    load(c, QWEN)
    pid = c.get("/v1/health").json()["all_models_loaded"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not process_running(pid))
    assert loaded_names(c) == [QWEN]
    failed = c.post("/v1/chat/completions", json={"model": QWEN, "messages": []})
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "network_error"
    assert load(c, QWEN).status_code == 200
    assert c.get("/v1/health").json()["all_models_loaded"][0]["pid"] == pid


def test_a_killed_backend_in_v11_is_dropped_and_reloaded_on_use(lemond_sim, c):
    """v11.7: a dead backend leaves health, and the next use reloads it (a new pid)."""
    lemond_sim.configure(version_shape="11")
    load(c, QWEN)
    pid = c.get("/v1/health").json()["all_models_loaded"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: loaded_names(c) == [])
    assert c.post("/v1/chat/completions", json={"model": QWEN, "messages": []}) \
        .status_code == 200
    entry = c.get("/v1/health").json()["all_models_loaded"][0]
    assert entry["model_name"] == QWEN and entry["pid"] != pid


def test_no_backend_process_outlives_the_simulator(lemond_sim_factory):
    sim = lemond_sim_factory()
    httpx.post(f"{sim.url}/v1/load", json={"model_name": QWEN}, timeout=10)
    pid = httpx.get(f"{sim.url}/v1/health").json()["all_models_loaded"][0]["pid"]
    sim.process.send_signal(signal.SIGTERM)
    assert sim.process.wait(timeout=10) == 0
    assert wait_for(lambda: not process_running(pid))
