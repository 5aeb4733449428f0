"""Requests, responses and lemond's error shapes (lemond-api.md §1)."""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass, field
from typing import Any


class ApiError(Exception):
    """Raised anywhere below a handler; becomes the HTTP response as-is."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


def model_error(code: str, message: str, requested: str) -> ApiError:
    # Server::create_model_error + get_http_status_from_error
    status = {"slots_pinned_error": 409, "router_residency_conflict": 409,
              "model_load_error": 500}.get(code, 404)
    return ApiError(status, {"error": {"message": message, "type": code, "param": "model",
                                       "code": code, "requested_model": requested}})


def invalid_request(message: str) -> ApiError:
    return ApiError(400, {"error": {"message": f"Invalid request: {message}",
                                    "type": "invalid_request_error",
                                    "code": "invalid_request"}})


def endpoint_not_found(path: str) -> ApiError:
    # lemond's global error handler (lemond-api.md §1): any path nothing is registered on
    return ApiError(404, {"error": {"message": "The requested endpoint does not exist",
                                    "type": "not_found", "path": path}})


def now_ms() -> int:
    return int(time.time() * 1000)


def steady_ms() -> int:
    """lemond's `last_use`: a std::chrono::steady_clock reading in milliseconds, i.e. time
    since the machine booted (on Linux), not epoch time; only comparable with other
    `last_use` values from the same machine."""
    return int(time.monotonic() * 1000)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_required_json(body: bytes) -> Any:
    """lemond's `parse_required_json_body` (error shape 4 of lemond-api.md §1)."""
    if not body.strip():
        raise ApiError(400, {"error": "Request body is required but was empty"})
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        where = (f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
                 if isinstance(exc, json.JSONDecodeError) else str(exc))
        raise ApiError(400, {"error": "Invalid JSON in request body: "
                                      f"[json.exception.parse_error.101] parse error at {where}"}
                       ) from None


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client: str
    port: int

    def json_or_none(self) -> Any:
        try:
            return json.loads(self.body) if self.body.strip() else None
        except ValueError:
            return None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: Any = None  # an async iterator of bytes for SSE


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))  # compact, like nlohmann's dump()


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, dumps(data).encode())


def sse(event: str | None, data: Any) -> bytes:
    payload = data if isinstance(data, str) else dumps(data)
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


