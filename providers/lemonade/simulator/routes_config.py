"""Handlers: runtime params, persisted config, defaults, log level."""

from __future__ import annotations

from providers.lemonade.simulator.constants import LOG_LEVELS
from providers.lemonade.simulator.wire import (
    ApiError,
    Request,
    Response,
    json_response,
    parse_required_json,
)


class ConfigRoutes:
    # ---- handlers: config --------------------------------------------------------------

    async def h_params_get(self, req: Request) -> Response:
        return json_response(self.config())

    async def h_params_set(self, req: Request) -> Response:
        if not self.since(10, 1):
            return json_response({"status": "success"})  # a stub before v10.1
        changes = self.normalize_config(parse_required_json(req.body))
        self.validate_config(changes)
        self.merge_into(self.state.runtime_config, changes)
        self.apply_config_side_effects(changes)
        self.log("Info", "Server", f"Applied runtime params (not persisted): {changes}")
        return json_response({"status": "success", "updated": changes})

    async def h_internal_set(self, req: Request) -> Response:
        changes = self.normalize_config(parse_required_json(req.body))
        self.validate_config(changes)
        self.merge_into(self.persisted_config, changes)
        for key in changes:  # a persisted value beats an older unpersisted one
            self.state.runtime_config.pop(key, None)
        self.apply_config_side_effects(changes)
        self.log("Info", "Server", f"Config updated: {changes}")
        return json_response({"status": "success", "updated": changes})

    def apply_config_side_effects(self, changes: dict) -> None:
        """Server::apply_config_side_effects, for what the simulator models."""
        if "extra_models_dir" in changes:
            self.rescan_extra_models()

    async def h_internal_config(self, req: Request) -> Response:
        return json_response(self.config())

    async def h_internal_defaults(self, req: Request) -> Response:
        return json_response(self.defaults())

    async def h_log_level(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        level = body.get("level") if isinstance(body, dict) else None
        if level not in LOG_LEVELS:
            raise ApiError(400, {"error": f"Invalid log level: {level}"})
        self.state.runtime_config["log_level"] = level
        return json_response({"status": "success", "level": level})

