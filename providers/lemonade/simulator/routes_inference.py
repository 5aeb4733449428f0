"""Handlers: deterministic fake inference (chat, completions, embeddings, rerank, audio, images)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import struct
import time
from typing import Any

from providers.lemonade.simulator.constants import EMBEDDING_DIM, ENDPOINT_TYPES
from providers.lemonade.simulator.media import (
    mp3_bytes,
    parse_multipart,
    png_bytes,
    stable_hash,
    wav_bytes,
    words_of,
)
from providers.lemonade.simulator.residency import LoadedModel
from providers.lemonade.simulator.wire import (
    ApiError,
    Request,
    Response,
    invalid_request,
    json_response,
    parse_required_json,
    sse,
)


class InferenceRoutes:
    # ---- handlers: inference -----------------------------------------------------------

    async def model_for(self, body: dict, endpoint: str) -> LoadedModel:
        """Auto-load the requested model (or use the loaded one) after checking its type."""
        name = body.get("model")
        if isinstance(name, str) and name.endswith(":latest"):
            name = name[: -len(":latest")]
        if not isinstance(name, str) or not name:
            # Router::execute_inference: a request must name its model, no fallback to
            # the most recent one (it would silently misroute).
            if self.most_recent() is None:
                raise ApiError(400, {"error": "No model loaded and no model specified in "
                                              "request"})
            raise ApiError(400, {"error": {"message": "Invalid request: No model specified "
                                                      "in request",
                                           "type": "invalid_request"}})
        cid = self.resolve_name(name)
        if cid is None:
            raise self.not_found(name)
        self.require_supported(cid, name)
        need, what, who = ENDPOINT_TYPES[endpoint]
        if self.kind_of(cid) != need:
            raise ApiError(400, {"error": {
                "message": f"This model does not support {what}. Only {who} models support "
                           "this endpoint.", "type": "invalid_request_error"}})
        model = await self.load(cid, self.autoload_request(body), None, explicit=False)
        self.check_backend(model)
        return model

    def record(self, model: LoadedModel, prompt_tokens: int, output_tokens: int) -> None:
        tps = round(1.0 / self.opts.token_delay, 2) if self.opts.token_delay > 0 else 120.0
        ttft = round(self.opts.ttft + 0.01 * math.log1p(prompt_tokens), 4)
        # lemond keeps the last request's telemetry on the backend that served it
        model.telemetry = self.state.stats = {"time_to_first_token": ttft, "tokens_per_second": tps,
                            "input_tokens": prompt_tokens, "output_tokens": output_tokens,
                            "prompt_tokens": prompt_tokens, "cache_tokens": 0,
                            "decode_token_times": [round(1 / tps, 4)] * min(output_tokens, 32)}
        totals = self.state.totals
        totals["request_count_total"] += 1
        totals["input_tokens_total"] += prompt_tokens
        totals["output_tokens_total"] += output_tokens
        totals["prompt_tokens_total"] += prompt_tokens

    def next_id(self, prefix: str) -> str:
        self.request_counter += 1
        return f"{prefix}-sim{self.request_counter:06d}"

    def reply_words(self, model: str, prompt: list[str], max_tokens: Any
                    ) -> tuple[list[str], str]:
        digest = stable_hash(model, " ".join(prompt)).hex()[:8]
        words = (f"Simulated reply from {model} (lemond simulator, no inference). "
                 f"Your prompt had {len(prompt)} words; digest {digest}.").split()
        if self.opts.reply_length > 0:
            words = (words * (self.opts.reply_length // len(words) + 1))[:self.opts.reply_length]
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and \
                0 < max_tokens < len(words):
            return words[:max_tokens], "length"
        return words, "stop"

    def timings(self, prompt_n: int, predicted_n: int) -> dict:
        tps = round(1.0 / self.opts.token_delay, 2) if self.opts.token_delay > 0 else 120.0
        prompt_ms = round(self.opts.ttft * 1000 + prompt_n * 0.5, 3)
        predicted_ms = round(predicted_n * 1000 / tps, 3)
        return {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": round(prompt_ms / max(prompt_n, 1), 3),
                "prompt_per_second": round(prompt_n * 1000 / max(prompt_ms, 0.001), 2),
                "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": round(1000 / tps, 3), "predicted_per_second": tps}

    async def _text_completion(self, req: Request, endpoint: str) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise invalid_request("request body must be a JSON object")
        model = await self.model_for(body, endpoint)
        if endpoint == "chat":
            prompt = words_of(body.get("messages"))
        elif endpoint == "responses":
            prompt = words_of(body.get("input"))
        else:
            prompt = words_of(body.get("prompt"))
        prompt_n = len(prompt) + 4
        overflow = self.context_overflow(model, prompt_n)
        if overflow is not None:
            if body.get("stream") is True:
                async def refused():  # committed as a 200 stream: the error is an event
                    yield sse(None, overflow)

                return Response(200, content_type="text/event-stream", stream=refused())
            raise ApiError(400, overflow)
        limit = body.get("max_completion_tokens", body.get("max_tokens",
                                                           body.get("max_output_tokens")))
        words, finish = self.reply_words(model.name, prompt, limit)
        text = " ".join(words)
        created = int(time.time())
        usage = {"prompt_tokens": prompt_n, "completion_tokens": len(words),
                 "total_tokens": prompt_n + len(words)}
        stream = body.get("stream") is True
        if not stream:
            async with self.using(model):
                if self.opts.ttft:
                    await asyncio.sleep(self.opts.ttft)
            self.record(model, prompt_n, len(words))
            if endpoint == "responses":
                return json_response({
                    "id": self.next_id("resp"), "object": "response", "created_at": created,
                    "status": "completed", "model": model.name,
                    "output": [{"type": "message", "id": self.next_id("msg"),
                                "status": "completed", "role": "assistant",
                                "content": [{"type": "output_text", "text": text,
                                             "annotations": []}]}],
                    "usage": {"input_tokens": prompt_n, "output_tokens": len(words),
                              "total_tokens": prompt_n + len(words)}})
            if endpoint == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": finish}
                kind = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                kind = "text_completion"
            return json_response({
                "id": self.next_id("chatcmpl" if endpoint == "chat" else "cmpl"),
                "object": kind, "created": created, "model": model.name,
                "system_fingerprint": "b0000-lemond-sim", "choices": [choice],
                "usage": usage, "timings": self.timings(prompt_n, len(words))})
        if endpoint == "responses":
            return Response(200, content_type="text/event-stream", stream=self._stream_response(
                model, words, created, prompt_n))
        include_usage = isinstance(body.get("stream_options"), dict) and \
            body["stream_options"].get("include_usage") is True
        return Response(200, content_type="text/event-stream", stream=self._stream_text(
            model, endpoint, words, finish, created, prompt_n, usage, include_usage))

    async def _stream_text(self, model, endpoint, words, finish, created, prompt_n, usage,
                           include_usage):
        chat = endpoint == "chat"
        ident = self.next_id("chatcmpl" if chat else "cmpl")
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | str, reason: str | None = None, **extra: Any) -> bytes:
            choice = ({"index": 0, "delta": delta, "finish_reason": reason} if chat
                      else {"index": 0, "text": delta, "logprobs": None,
                            "finish_reason": reason})
            return sse(None, {"id": ident, "object": kind, "created": created,
                              "model": model.name, "system_fingerprint": "b0000-lemond-sim",
                              "choices": [choice], **extra})

        async with self.using(model, streaming=True):
            if self.opts.ttft:
                await asyncio.sleep(self.opts.ttft)
            if chat:
                yield chunk({"role": "assistant", "content": None})
            for i, word in enumerate(words):
                piece = word if i == 0 else " " + word
                yield chunk({"content": piece} if chat else piece)
                if self.opts.token_delay:
                    await asyncio.sleep(self.opts.token_delay)
            yield chunk({} if chat else "", finish,
                        timings=self.timings(prompt_n, len(words)))
            if include_usage:
                yield sse(None, {"id": ident, "object": kind, "created": created,
                                 "model": model.name, "choices": [], "usage": usage})
            self.record(model, prompt_n, len(words))
            yield b"data: [DONE]\n\n"

    async def _stream_response(self, model, words, created, prompt_n):
        """A streamed Responses API answer, as lemond relays llama-server's /v1/responses:
        named SSE events from response.created to response.completed (no [DONE])."""
        ident, item_id = self.next_id("resp"), self.next_id("msg")
        seq = iter(range(1 << 30))

        def event(kind: str, **fields: Any) -> bytes:
            return sse(kind, {"type": kind, "sequence_number": next(seq), **fields})

        def response(status: str, output: list, usage: dict | None = None) -> dict:
            return {"id": ident, "object": "response", "created_at": created,
                    "status": status, "model": model.name, "output": output,
                    "usage": usage}

        def message(status: str, text: str | None) -> dict:
            content = [] if text is None else [{"type": "output_text", "text": text,
                                                "annotations": []}]
            return {"type": "message", "id": item_id, "status": status,
                    "role": "assistant", "content": content}

        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        async with self.using(model, streaming=True):
            if self.opts.ttft:
                await asyncio.sleep(self.opts.ttft)
            yield event("response.created", response=response("in_progress", []))
            yield event("response.in_progress", response=response("in_progress", []))
            yield event("response.output_item.added", output_index=0,
                        item=message("in_progress", None))
            yield event("response.content_part.added", **where,
                        part={"type": "output_text", "text": "", "annotations": []})
            for i, word in enumerate(words):
                yield event("response.output_text.delta", **where,
                            delta=word if i == 0 else " " + word)
                if self.opts.token_delay:
                    await asyncio.sleep(self.opts.token_delay)
            text = " ".join(words)
            yield event("response.output_text.done", **where, text=text)
            yield event("response.content_part.done", **where,
                        part={"type": "output_text", "text": text, "annotations": []})
            yield event("response.output_item.done", output_index=0,
                        item=message("completed", text))
            yield event("response.completed", response=response(
                "completed", [message("completed", text)],
                {"input_tokens": prompt_n, "output_tokens": len(words),
                 "total_tokens": prompt_n + len(words)}))
            self.record(model, prompt_n, len(words))

    async def h_chat(self, req: Request) -> Response:
        return await self._text_completion(req, "chat")

    async def h_completions(self, req: Request) -> Response:
        return await self._text_completion(req, "completions")

    async def h_responses(self, req: Request) -> Response:
        return await self._text_completion(req, "responses")

    async def h_embeddings(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise invalid_request("request body must be a JSON object")
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                        and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise invalid_request("input must be a string or a non-empty array")
        model = await self.model_for(body, "embeddings")
        data, tokens = [], 0
        async with self.using(model):
            for index, item in enumerate(inputs):
                vector = self.embed(model.name, item)
                tokens += len(words_of(item)) if isinstance(item, str) else len(item)
                if body.get("encoding_format") == "base64":
                    vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                data.append({"object": "embedding", "index": index, "embedding": vector})
        self.record(model, tokens, 0)
        return json_response({"object": "list", "data": data, "model": model.name,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @staticmethod
    def embed(model: str, item: Any) -> list[float]:
        """A deterministic unit vector from a hash of the input (same input → same vector)."""
        seed = stable_hash(model, json.dumps(item))
        raw: list[float] = []
        counter = 0
        while len(raw) < EMBEDDING_DIM:
            block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
            raw.extend((b - 127.5) / 127.5 for b in block)
            counter += 1
        raw = raw[:EMBEDDING_DIM]
        norm = math.sqrt(sum(x * x for x in raw)) or 1.0
        return [round(x / norm, 6) for x in raw]

    async def h_rerank(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise invalid_request("request body must be a JSON object")
        query, documents = body.get("query"), body.get("documents")
        if not isinstance(query, str) or not isinstance(documents, list):
            raise invalid_request("query (string) and documents (array) are required")
        model = await self.model_for(body, "rerank")
        qwords = {w.lower().strip(".,;:!?") for w in query.split()}
        results, tokens = [], len(query.split())
        async with self.using(model):
            for index, doc in enumerate(documents):
                text = doc.get("text", "") if isinstance(doc, dict) else str(doc)
                dwords = {w.lower().strip(".,;:!?") for w in text.split()}
                tokens += len(text.split())
                overlap = len(qwords & dwords) / max(len(qwords), 1)
                jitter = stable_hash(query, text)[0] / 2550.0  # < 0.1, breaks ties stably
                score = round(-4.0 + 8.0 * overlap + jitter, 6)
                results.append({"index": index, "relevance_score": score})
        self.record(model, tokens, 0)
        return json_response({"model": model.name, "object": "list", "results": results,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def h_transcriptions(self, req: Request) -> Response:
        if not req.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise ApiError(400, {"error": {"message": "Request must be multipart/form-data",
                                           "type": "invalid_request_error"}})
        form = parse_multipart(req.body, req.headers.get("content-type", ""))
        if "file" not in form:
            raise ApiError(400, {"error": {"message": "Missing 'file' field in request",
                                           "type": "invalid_request_error"}})
        fields_ = {k: v[1].decode("utf-8", "replace") for k, v in form.items() if k != "file"}
        if not fields_.get("model"):  # no fallback to the loaded model here
            raise ApiError(400, {"error": {"message": "Missing 'model' field in request",
                                           "type": "invalid_request_error"}})
        audio = form["file"][1]
        if not (audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"):
            raise ApiError(400, {"error": {"message": "Unsupported audio format: only WAV "
                                                      "files are supported",
                                           "type": "invalid_request_error"}})
        model = await self.model_for(fields_, "transcription")
        async with self.using(model):
            if self.opts.ttft:
                await asyncio.sleep(self.opts.ttft)
        seconds = max(0.0, (len(audio) - 44) / 32000)
        text = (f"Simulated transcription of {seconds:.1f} seconds of audio "
                f"(digest {stable_hash(audio).hex()[:8]}).")
        self.record(model, 0, len(text.split()))
        fmt = fields_.get("response_format", "json")
        language = fields_.get("language") or "en"
        if fmt == "text":
            return Response(200, text.encode(), "text/plain")
        if fmt in ("srt", "vtt"):
            stamp = "00:00:00,000 --> 00:00:01,000" if fmt == "srt" \
                else "00:00:00.000 --> 00:00:01.000"
            head = "1\n" if fmt == "srt" else "WEBVTT\n\n"
            return Response(200, f"{head}{stamp}\n{text}\n".encode(), "text/plain")
        if fmt == "verbose_json":
            return json_response({"task": "transcribe", "language": language,
                                  "duration": round(seconds, 3), "text": text,
                                  "segments": [{"id": 0, "start": 0.0,
                                                "end": round(seconds, 3), "text": text}]})
        return json_response({"text": text})

    async def h_speech(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict) or not isinstance(body.get("input"), str):
            raise invalid_request("input (string) is required")
        fmt = body.get("response_format") or "mp3"
        if fmt not in ("mp3", "wav", "opus", "pcm"):
            raise invalid_request(f"unsupported response_format '{fmt}' (mp3, wav, opus, pcm)")
        model = await self.model_for(body, "speech")
        async with self.using(model):
            if self.opts.ttft:
                await asyncio.sleep(self.opts.ttft)
        self.record(model, len(body["input"].split()), 0)
        seconds = min(5.0, 0.1 + 0.05 * len(body["input"].split()))
        if fmt == "wav":
            audio, mime = wav_bytes(seconds), "audio/wav"
        elif fmt == "pcm":
            audio = b"\x00\x00" * int(24000 * seconds)
            mime = "audio/l16;rate=24000;endianness=little-endian"
        elif fmt == "opus":
            # Not a decodable Ogg/Opus stream: the simulator only needs the right type.
            audio, mime = b"OggS" + b"\x00" * 60, "audio/opus"
        else:
            audio, mime = mp3_bytes(max(1, int(seconds * 38))), "audio/mpeg"
        return Response(200, audio, mime)

    async def h_images(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise invalid_request("prompt (string) is required")
        model = await self.model_for(body, "image")
        try:
            width, height = (int(x) for x in str(body.get("size") or "512x512").split("x"))
        except ValueError:
            raise invalid_request("size must look like 512x512") from None
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        async with self.using(model):
            if self.opts.ttft:
                await asyncio.sleep(self.opts.ttft)
            images = [png_bytes(width, height, stable_hash(body["prompt"], body.get("seed"), i))
                      for i in range(max(1, min(n, 4)))]
        self.record(model, len(body["prompt"].split()), 0)
        return json_response({"created": int(time.time()),
                              "data": [{"b64_json": base64.b64encode(img).decode()}
                                       for img in images]})

    # ---- llama.cpp specific: slots and tokenize (v10.6+) ---------------------------------
    # Router::get_slots / slots_action / tokenize act on the most recently used model. A
    # model whose backend has no such capability is answered with an error object and
    # status 200 (the handlers set no status for it), a lemond quirk kept on purpose.

    def llamacpp_target(self, operation: str, missing: str) -> tuple[Any, Response | None]:
        model = self.most_recent()
        if model is None:
            raise ApiError(400, {"error": missing})
        if model.recipe != "llamacpp":
            return model, json_response({"error": {
                "message": f"{operation} is not supported on device: {model.device}",
                "type": "unsupported_operation"}})
        self.touch(model)
        return model, None

    @staticmethod
    def slot_list(model: Any) -> list[dict]:
        n_ctx = model.shown_options().get("ctx_size", 4096)
        return [{"id": 0, "id_task": -1, "n_ctx": n_ctx, "speculative": False,
                 "is_processing": model.busy > 0, "params": {"n_predict": -1},
                 "next_token": {"has_next_token": True, "n_remain": -1, "n_decoded": 0}}]

    async def h_slots(self, req: Request) -> Response:
        model, refused = self.llamacpp_target("Slots", "No model loaded for slots query")
        return refused or json_response(self.slot_list(model))

    async def h_slot_action(self, req: Request, slot_id: int) -> Response:
        action = (req.query.get("action") or [""])[0]
        if not action:
            raise ApiError(400, {"error": "POST /api/v1/slots/{id} requires action query "
                                          "parameter (e.g., ?action=erase)"})
        if action not in ("erase", "save", "restore"):
            raise ApiError(400, {"error": f"Unknown action: {action}. Supported actions: "
                                          "erase, save, restore"})
        model, refused = self.llamacpp_target(
            "Slots", f"No model loaded for slots {action} operation")
        if refused:
            return refused
        if req.body.strip() and req.json_or_none() is None:
            raise ApiError(400, {"error": "Invalid JSON in request body"})
        if slot_id >= len(self.slot_list(model)):
            return json_response({"error": {"message": "llama-server request failed",
                                            "type": "backend_error", "details": {
                                                "status_code": 400, "response": {"error": {
                                                    "code": 400, "message": "Invalid slot id",
                                                    "type": "invalid_request_error"}}}}})
        if action == "erase":
            return json_response({"id_slot": slot_id, "n_erased": 0})
        # lemond starts llama-server without --slot-save-path: the backend refuses
        return json_response({"error": {"message": "llama-server request failed",
                                        "type": "backend_error", "details": {
                                            "status_code": 501, "response": {"error": {
                                                "code": 501, "message": "This server does not "
                                                "support slots action. Start it with "
                                                "`--slot-save-path`",
                                                "type": "not_supported_error"}}}}})

    async def h_tokenize(self, req: Request) -> Response:
        body: Any = {}
        if req.body.strip():
            body = req.json_or_none()
            if body is None:
                raise ApiError(400, {"error": "Invalid JSON in request body"})
        if not isinstance(body, dict) or not isinstance(body.get("content"), str):
            raise ApiError(400, {"error": "'content' parameter is required"})
        model, refused = self.llamacpp_target("Tokenization",
                                              "No model loaded for tokenization")
        if refused:
            return refused
        pieces = [w if i == 0 else " " + w for i, w in enumerate(body["content"].split())]
        ids = [int.from_bytes(stable_hash(model.name, p)[:2], "big") for p in pieces]
        if body.get("with_pieces") is True:
            return json_response({"tokens": [{"id": i, "piece": p}
                                             for i, p in zip(ids, pieces, strict=True)]})
        return json_response({"tokens": ids})
