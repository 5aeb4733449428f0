"""Routes and checks that arrived in lemond 11.x: model registration without a download,
registry search and pull-variant lookups (validated locally: the simulator never reaches a
registry), pull source validation, model aliases (`/internal/aliases`), update checks, and
the route table that adds them (with the options and eviction routes) to the 11 shape."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from urllib.parse import unquote

from providers.lemonade.simulator.media import parse_multipart
from providers.lemonade.simulator.wire import (
    ApiError,
    Request,
    Response,
    json_response,
    parse_required_json,
)

REGISTRIES = {"huggingface": "huggingface", "hf": "huggingface", "modelscope": "modelscope",
              "ms": "modelscope"}
REGISTRY_NAMES = {"huggingface": "Hugging Face", "modelscope": "ModelScope"}
REGISTRY_URLS = (
    ("https://huggingface.co/", "huggingface"), ("http://huggingface.co/", "huggingface"),
    ("https://modelscope.cn/models/", "modelscope"),
    ("https://www.modelscope.cn/models/", "modelscope"),
    ("http://modelscope.cn/models/", "modelscope"),
    ("http://www.modelscope.cn/models/", "modelscope"),
    ("https://modelscope.ai/models/", "modelscope"),
    ("https://www.modelscope.ai/models/", "modelscope"),
)
LOCAL_SOURCES = ("local_upload", "local_path", "extra_models_dir")
RESERVED_ALIAS_PREFIXES = ("user.", "extra.", "builtin.")
MAX_ALIAS_HOPS = 16


def registry(source: str) -> str:
    """parse_remote_registry_source: a registry name (or alias), else 400."""
    found = REGISTRIES.get(source.lower() if source else "huggingface")
    if found is None:
        raise ValueError(f"Unsupported model source '{source}' (expected 'huggingface' or "
                         "'modelscope')")
    return found


def registry_url(value: str) -> tuple[str, str] | None:
    """detect_registry_url: (registry, owner/repo) for a provider URL, else None."""
    for prefix, source in REGISTRY_URLS:
        if value.startswith(prefix):
            rest = value[len(prefix):].split("?", 1)[0].split("#", 1)[0]
            return source, "/".join(rest.split("/")[:2])
    return None


def pull_source_problem(body: dict) -> str | None:
    """apply_default_pull_source's checks, before anything is registered or downloaded."""
    if body.get("local_import"):
        return None
    for field in ("source", "registry_source"):
        if field in body and body[field] is not None and not isinstance(body[field], str):
            return f"'{field}' must be a string"
    try:
        explicit = named_registry(body)
    except ValueError as exc:
        return str(exc)
    return checkpoint_registry_problem(body, explicit)


def named_registry(body: dict) -> str | None:
    """The registry a pull names by `registry_source` or `source` (which wins), or None;
    ValueError for a source that is neither a registry nor a local import type."""
    explicit = None
    if isinstance(body.get("registry_source"), str):
        explicit = registry(body["registry_source"])
    source = body.get("source")
    if isinstance(source, str):
        if source.lower() not in REGISTRIES and source not in LOCAL_SOURCES:
            raise ValueError(f"Unsupported model source '{source}' (expected remote registry "
                             "or local import type)")
        if source.lower() in REGISTRIES:
            explicit = registry(source)
    return explicit


def checkpoint_registry_problem(body: dict, explicit: str | None) -> str | None:
    """Checkpoint URLs must all point at one registry, the one the pull names if any."""
    checkpoints = body.get("checkpoints")
    slots = ([v for v in checkpoints.values() if isinstance(v, str)]
             if isinstance(checkpoints, dict) else
             [body["checkpoint"]] if isinstance(body.get("checkpoint"), str) else [])
    found = None
    for slot in slots:
        detected = registry_url(slot)
        if detected is None:
            continue
        if found and found != detected[0]:
            return "All checkpoints in one model must use the same remote registry"
        found = detected[0]
        if explicit and explicit != found:
            return f"checkpoint URL uses {found} but source was set to {explicit}"
    return None


class V11Routes:
    """Handlers for the 11-shape routes (a Simulator mixin)."""

    def v11_api_routes(self) -> dict[str, dict[str, Any]]:
        """Routes after the prefix that the 11 shape adds (version-gated)."""
        routes: dict[str, dict[str, Any]] = {}
        if self.since(10, 2):
            routes["pull/variants"] = {"GET": self.h_pull_variants}
        if self.since(11, 0):
            routes["models/check-updates"] = {"POST": self.h_check_updates}
        if self.since(11, 5):
            routes["registry/search"] = {"GET": self.h_registry_search}
        if self.since(11, 7):
            routes["models/register"] = {"POST": self.h_models_register}
            # The route exists; routing policies themselves are out of the simulator's scope.
            routes["routing/validate"] = {"POST": self.h_routing_validate}
        return routes

    def v11_root_routes(self) -> dict[str, dict[str, Any]]:
        routes: dict[str, dict[str, Any]] = {}
        if self.since(10, 8):
            routes["/internal/simulate-vram-pressure"] = {"POST": self.h_simulate_vram_pressure}
        if self.since(11, 6):
            routes["/internal/aliases"] = {"GET": self.h_aliases_get,
                                           "POST": self.h_aliases_add}
        return routes

    def v11_dynamic_route(self, path: str, rest: str | None) -> dict | None:
        """Routes with a path parameter: `/internal/aliases/{alias}`,
        `models/{id}/options` (after the prefix)."""
        if self.since(11, 6) and path.startswith("/internal/aliases/"):
            alias = unquote(path[len("/internal/aliases/"):])
            return {"DELETE": lambda r: self.h_aliases_remove(r, alias)}
        if rest and self.since(10, 10) and rest.startswith("models/") \
                and rest.endswith("/files") and len(rest) > len("models//files"):
            model_id = unquote(rest[len("models/"):-len("/files")])
            return {"GET": lambda r: self.h_model_files(r, model_id)}
        if rest and self.since(11, 7) and rest.startswith("models/") \
                and rest.endswith("/options"):
            model_id = unquote(rest[len("models/"):-len("/options")])
            if model_id:
                return self.options_routes(model_id)
        return None

    # ---- pull ---------------------------------------------------------------------------

    async def h_pull(self, req: Request) -> Response:
        if self.since(11, 7):
            body = req.json_or_none()
            if isinstance(body, dict):
                problem = pull_source_problem(body)
                if problem:
                    raise ApiError(400, {"error": problem})
        return await super().h_pull(req)

    async def h_pull_variants(self, req: Request) -> Response:
        """Server::handle_pull_variants: the checks lemond makes before it asks the
        registry; the simulator has no registry to ask, so a valid lookup is a 404."""
        checkpoint = (req.query.get("checkpoint") or [""])[0]
        if not checkpoint:
            raise ApiError(400, {"error": "Missing required query parameter 'checkpoint'"})
        raw_source = (req.query.get("source") or [""])[0]
        detected = registry_url(checkpoint)
        try:
            if detected and raw_source and registry(raw_source) != detected[0]:
                raise ApiError(400, {"error": f"checkpoint URL uses {detected[0]} but source "
                                              f"was set to '{raw_source}'"})
            if detected:
                checkpoint, source = detected[1], detected[0]
            else:
                source = raw_source or self.config().get("default_model_source",
                                                         "huggingface")
            if "/" not in checkpoint:
                raise ApiError(400, {"error": "Malformed 'checkpoint': expected a repository "
                                              "id of the form 'owner/name'"})
            source = registry(source)
        except ValueError as exc:
            raise ApiError(400, {"error": str(exc)}) from None
        if self.config().get("offline"):
            raise ApiError(400, {"error": "Lemond is in offline mode, models not downloaded",
                                 "code": "lemond_offline"})
        raise ApiError(404, {"error": f"Checkpoint '{checkpoint}' not found on "
                                      f"{REGISTRY_NAMES[source]}"})

    async def h_registry_search(self, req: Request) -> Response:
        """Server::handle_registry_search: validated locally; the simulated registry is
        empty."""
        query = ((req.query.get("query") or req.query.get("q") or [""])[0]).strip()

        def bad(message: str) -> ApiError:
            return ApiError(400, {"error": {"message": message,
                                            "type": "invalid_request_error"}})

        if len(query) < 3:
            raise bad("Query parameter 'query' must contain at least 3 characters")
        try:
            source = registry((req.query.get("source") or ["huggingface"])[0])
        except ValueError as exc:
            raise bad(str(exc)) from None
        limit_text = (req.query.get("limit") or ["12"])[0]
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 50:
            raise bad("Query parameter 'limit' must be an integer from 1 to 50")
        fmt = (req.query.get("format") or [None])[0]
        if fmt is not None and fmt != "gguf":
            raise bad(f"Unsupported registry search format '{fmt}' (expected 'gguf')")
        if self.config().get("offline"):
            raise ApiError(400, {"error": {"message": "Lemond is in offline mode, registry "
                                                      "search is unavailable",
                                           "type": "invalid_request_error",
                                           "code": "lemond_offline"}})
        return json_response({"source": source, "query": query, "results": []})

    async def h_check_updates(self, req: Request) -> Response:
        """No upstream to compare with: nothing has an update."""
        return json_response({"status": "success", "models": []})

    async def h_routing_validate(self, req: Request) -> Response:
        parse_required_json(req.body)
        raise ApiError(400, {"error": "routing policies are not simulated"})

    async def h_models_register(self, req: Request) -> Response:
        """Server::handle_model_register: register a user model, download nothing."""
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise ApiError(400, {"error": "Request body must be a JSON object"})
        name = body.get("model_name")
        if not isinstance(name, str):
            raise ApiError(400, {"error": "A string `model_name` is required"})
        problem = pull_source_problem(body)
        if problem:
            raise ApiError(400, {"error": problem})
        if not (isinstance(body.get("checkpoint"), str) or
                isinstance(body.get("checkpoints"), dict)):
            raise ApiError(400, {"error": f"Model '{name}' needs a checkpoint to be "
                                          "registered"})
        cid = self.register_user_model(name, body)
        public = self.public_name(cid) if hasattr(self, "public_name") else cid
        return json_response({"status": "success", "model_name": public,
                              "canonical_model_name": cid,
                              "model": {**self.model_json(cid), "id": public}})

    # ---- audio --------------------------------------------------------------------------

    async def h_speech(self, req: Request) -> Response:
        """Server::handle_audio_speech (v11.7): `stream_format: "audio"` streams, and a
        stream carries what the backend's streaming encoder emits: Kokoros only raw PCM,
        so PCM is the default and any other explicit response_format is refused."""
        body = req.json_or_none()
        if not self.since(11, 7) or not isinstance(body, dict) or "input" not in body:
            return await super().h_speech(req)
        streaming = body.get("stream") is True or "stream_format" in body
        if "stream_format" in body and body["stream_format"] != "audio":
            raise ApiError(400, {"error": {"message": "Only 'audio' is supported for "
                                                      "stream_format",
                                           "type": "invalid_request_error"}})
        if not streaming:
            return await super().h_speech(req)
        fmt = body.get("response_format")
        if isinstance(fmt, str) and fmt != "pcm":
            raise ApiError(400, {"error": {"message": f"response_format '{fmt}' is not "
                                                      "supported by this model (supported: "
                                                      "pcm)",
                                           "type": "invalid_request_error"}})
        return await super().h_speech(replace(req, body=json.dumps(
            {**body, "response_format": "pcm"}).encode()))

    async def h_transcriptions(self, req: Request) -> Response:
        """v11.7 refuses a response_format it cannot produce before anything else."""
        if self.since(11, 7):
            form = parse_multipart(req.body, req.headers.get("content-type", ""))
            if "response_format" in form:
                fmt = form["response_format"][1].decode("utf-8", "replace")
                if fmt not in ("json", "verbose_json", "text", "srt", "vtt"):
                    raise ApiError(400, {"error": {"message": "Unsupported response_format: "
                                                              f"{fmt}",
                                                   "type": "invalid_request_error"}})
        return await super().h_transcriptions(req)

    # ---- aliases ------------------------------------------------------------------------

    def resolve_name(self, name: Any) -> str | None:
        """Aliases (v11.6+) resolve, hop by hop, before lemond's own name rules."""
        aliases = getattr(self, "aliases", None)
        if aliases and isinstance(name, str):
            for _ in range(MAX_ALIAS_HOPS):
                if name not in aliases:
                    break
                name = aliases[name]
        return super().resolve_name(name)

    async def h_model(self, req: Request, model_id: str) -> Response:
        response = await super().h_model(req, model_id)
        aliases = getattr(self, "aliases", None)
        if aliases and model_id in aliases and response.status == 200:
            data = json.loads(response.body)
            data["id"] = model_id  # an alias answers under its own name
            return json_response(data)
        return response

    @staticmethod
    def alias_error(message: str, code: str, status: int) -> ApiError:
        return ApiError(status, {"error": {"message": message, "type": "invalid_request_error",
                                           "code": code}})

    async def h_aliases_get(self, req: Request) -> Response:
        aliases = getattr(self, "aliases", {})
        listed = []
        for alias, target in aliases.items():
            cid = self.resolve_name(target)
            listed.append({"alias": alias, "target": target,
                           "downloaded": bool(cid and cid in self.downloaded),
                           "recipe": self.catalog[cid].get("recipe", "llamacpp") if cid
                           else "llamacpp"})
        return json_response({"aliases": listed})

    async def h_aliases_add(self, req: Request) -> Response:
        body = req.json_or_none()
        if not isinstance(body, dict):
            raise self.alias_error("Invalid JSON body", "invalid_request", 400)
        alias = str(body.get("alias") or "").strip()
        target = str(body.get("target") or body.get("model") or "").strip()
        if not alias or not target:
            raise self.alias_error("Alias and target fields are required", "invalid_request",
                                   400)
        if alias == target:
            raise self.alias_error("Alias cannot point to itself", "invalid_alias", 400)
        if alias.startswith(RESERVED_ALIAS_PREFIXES):
            raise self.alias_error("Alias name cannot use reserved prefixes (user., extra., "
                                   "builtin.)", "invalid_alias", 400)
        aliases = self.__dict__.setdefault("aliases", {})
        if alias not in aliases and super().resolve_name(alias) is not None:
            raise self.alias_error(f"Cannot create alias '{alias}': Name conflicts with an "
                                   "existing canonical model", "alias_conflict", 409)
        current, seen = target, {alias}
        while current in aliases:
            if current in seen:
                raise self.alias_error(f"Alias '{alias}' would create a cycle",
                                       "alias_conflict", 409)
            seen.add(current)
            current = aliases[current]
        if current in seen:
            raise self.alias_error(f"Alias '{alias}' would create a cycle", "alias_conflict",
                                   409)
        aliases[alias] = target
        self.log("Info", "AliasManager", f"Alias {alias} -> {target}")
        return json_response({"status": "ok", "alias": alias, "target": target})

    async def h_aliases_remove(self, req: Request, alias: str) -> Response:
        aliases = getattr(self, "aliases", {})
        if alias not in aliases:
            raise self.alias_error(f"Alias not found: {alias}", "alias_not_found", 404)
        del aliases[alias]
        return json_response({"status": "deleted", "alias": alias})
