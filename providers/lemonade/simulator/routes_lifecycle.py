"""Handlers: load, unload, delete, pin, shutdown."""

from __future__ import annotations

import asyncio
import json

from providers.lemonade.simulator.constants import RECIPE_OPTION_KEYS
from providers.lemonade.simulator.wire import (
    ApiError,
    Request,
    Response,
    invalid_request,
    json_response,
    parse_required_json,
)


class LifecycleRoutes:
    # ---- handlers: lifecycle -----------------------------------------------------------

    async def h_load(self, req: Request) -> Response:
        """Counts /v1/load requests open at once per model, so tests can prove a control
        plane never sends a second load for a model while one is in flight."""
        try:
            name = json.loads(req.body).get("model_name")
        except (ValueError, AttributeError):
            name = None
        if not isinstance(name, str):
            return await self._h_load(req)
        self.open_load_requests[name] = self.open_load_requests.get(name, 0) + 1
        self.max_open_load_requests[name] = max(self.max_open_load_requests.get(name, 0),
                                                 self.open_load_requests[name])
        try:
            return await self._h_load(req)
        finally:
            self.open_load_requests[name] -= 1

    async def _h_load(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise invalid_request("request body must be a JSON object")
        name = body.get("model_name")
        if not isinstance(name, str) or not name:
            raise invalid_request("model_name is required")
        self.load_requests[name] = self.load_requests.get(name, 0) + 1
        cid = self.resolve_name(name)
        if cid is None:
            raise self.not_found(name)
        self.require_supported(cid, name)
        pinned = body.get("pinned") if isinstance(body.get("pinned"), bool) else None
        if body.get("save_options") is True:
            keys = (*RECIPE_OPTION_KEYS.get(self.catalog[cid].get("recipe", ""), ()), "pinned")
            saved = self.saved_options.setdefault(cid, {})
            saved.update({k: body[k] for k in keys if body.get(k) is not None})
        model = await self.load(cid, body, pinned, explicit=True)
        if self.catalog[cid].get("recipe", "").startswith("collection"):
            return json_response({"status": "success", "model_name": cid,
                                  "recipe": self.catalog[cid]["recipe"]})
        return json_response({"status": "success", "model_name": name,  # as requested
                              "checkpoint": model.checkpoint, "recipe": model.recipe})

    async def h_unload(self, req: Request) -> Response:
        body = req.json_or_none()
        name = None
        if isinstance(body, dict):
            name = body.get("model_name") or body.get("model")
        if not isinstance(name, str) or not name:
            await self.evict_all("unload")
            return json_response({"status": "success",
                                  "message": "All models unloaded successfully"})
        cid = self.resolve_name(name) or name
        model = self.state.loaded.get(cid)
        if model is None or model.status == "loading":
            raise ApiError(404, {"error": f"Model not loaded: {name}"})
        await self.evict(model, "unload")
        return json_response({"status": "success", "message": "Model unloaded successfully",
                              "model_name": name})

    async def h_delete(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        name = (body.get("model_name") or body.get("model")) if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(400, {"error": "model_name is required"})
        cid = self.resolve_name(name)
        if cid is None:
            raise ApiError(422, {"error": f"Model not found: {name}"})
        if not self.supported(cid):
            raise ApiError(422, {"error": f"Model not supported on this system: {name}"})
        if cid.startswith("extra."):
            raise ApiError(500, {"error": "Cannot delete extra models via API. Models in "
                                          "--extra-models-dir are user-managed. Delete the file "
                                          "directly from: "
                                          + self.model_json(cid)["checkpoint"]})
        if cid not in self.downloaded:
            # ModelManager::delete_model finds no files to resolve; handle_delete answers 422
            # only for "Model not found" / "not supported", so this is a 500 (§2.7).
            raise ApiError(500, {"error": "Model has no resolved_path, cannot determine "
                                          "files to delete"})
        model = self.state.loaded.get(cid)
        if model is not None:
            await self.evict(model, "delete")
        self.downloaded.discard(cid)
        if cid.startswith("user."):
            del self.catalog[cid]  # deleting a user model also forgets its registration
            self.saved_options.pop(cid, None)
            self.catalog_changed()
        self.log("Info", "ModelManager", f"Deleted model {cid}")
        return json_response({"status": "success", "message": f"Deleted model: {name}"})

    async def h_pin(self, req: Request) -> Response:
        """Server::handle_pin: every refusal is a 400 in the OpenAI error shape."""
        def refuse(message: str) -> ApiError:
            return ApiError(400, {"error": {"message": message,
                                            "type": "invalid_request_error"}})

        try:
            body = json.loads(req.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise refuse(f"Invalid JSON body: {exc}") from None
        if not isinstance(body, dict) or ("model" not in body and "model_name" not in body):
            raise refuse("Parameter 'model' or 'model_name' is required")
        pinned = body.get("pinned")
        if not isinstance(pinned, bool):
            raise refuse("Parameter 'pinned' is required and must be a boolean")
        name = body["model"] if "model" in body else body["model_name"]
        if not isinstance(name, str):
            raise refuse("Parameter 'model' or 'model_name' must be a string")
        model = self.state.loaded.get(self.resolve_name(name) or name)
        if model is None or model.status == "loading":
            raise refuse(f"Model not loaded: {name}")
        model.pinned = pinned
        self.log("Info", "Router", f"{'Pinned' if pinned else 'Unpinned'} {model.name}")
        return json_response({"status": "success", "model_name": name, "pinned": pinned})

    async def h_shutdown(self, req: Request) -> Response:
        self.log("Info", "Server", "Shutdown requested; unloading all models")
        await self.evict_all("shutdown", wait_busy=False)
        if self.shutdown_hook is not None:
            asyncio.get_running_loop().call_later(0.2, self.shutdown_hook)
        return json_response({"status": "success", "message": "Server shutting down"})

