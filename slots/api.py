"""The JSON API over slots: `/api/slots/…` and `/api/health`.

Authentication is a session (browser, CSRF enforced) or a bearer token (scripts; no CSRF).
Errors are the actions' stable envelope `{"error": {"code", "message", "slot"}}`.
Lifecycle calls wait for the action to finish; they run on a worker thread so a long load
never blocks the rest of the site.
"""

from __future__ import annotations

import inspect
from functools import wraps
from http import HTTPStatus

from asgiref.sync import sync_to_async
from django.core.exceptions import (
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.db import connection
from django.http import JsonResponse, UnreadablePostError
from django.http.multipartparser import MultiPartParserError
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone
from django.utils.deprecation import MiddlewareMixin
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from . import runtime, tokens
from .actions import fit, lifecycle
from .actions.errors import SlotError, envelope, get_slot
from .jsonbody import NotAJsonObject, json_object
from .models import Node, Slot


def error_response(code: str, message: str, status: int, slot: str | None = None) -> JsonResponse:
    return JsonResponse(envelope(code, message, slot), status=status)


def authenticate(request):
    """The user behind a session (CSRF-checked for unsafe methods) or a bearer token;
    returns (user_or_token, None) or (None, error response)."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        token = tokens.authenticate(header[7:].strip(), runtime.current().token_stamps)
        if token is None:
            return None, error_response("auth.invalid_token", "Invalid or expired API token.", 401)
        return token, None
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None, error_response("auth.required", "Log in or send an API token.", 401)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        reason = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
        if reason is not None:
            return None, error_response("auth.csrf", "CSRF check failed: send the X-CSRFToken "
                                        "header with a session.", 403)
    return user, None


def _unreadable(exc: Exception) -> JsonResponse | None:
    """The envelope for a request body Django cannot (or may not) read."""
    if isinstance(exc, RequestDataTooBig):
        return error_response("api.too_large", "The request body is too large.", 413)
    if isinstance(exc, (TooManyFieldsSent, TooManyFilesSent)):
        return error_response("api.bad_request", "The request has too many form fields.", 400)
    if isinstance(exc, (MultiPartParserError, SuspiciousOperation, UnreadablePostError)):
        return error_response("api.bad_request", f"The request body cannot be read: {exc}", 400)
    return None


def api_view(view):
    """Auth for API views; sync or async. A body Django cannot read is answered with the
    envelope too (413/400), not Django's HTML page."""
    if inspect.iscoroutinefunction(view):
        @wraps(view)
        async def wrapper(request, *args, **kwargs):
            try:
                principal, denied = await sync_to_async(authenticate)(request)
                if denied:
                    return denied
                request.principal = principal
                return await view(request, *args, **kwargs)
            except Exception as exc:
                if (answer := _unreadable(exc)) is None:
                    raise
                return answer
    else:
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            try:
                principal, denied = authenticate(request)
                if denied:
                    return denied
                request.principal = principal
                return view(request, *args, **kwargs)
            except Exception as exc:
                if (answer := _unreadable(exc)) is None:
                    raise
                return answer
    return csrf_exempt(wrapper)


_ERROR_CODES = {400: "api.bad_request", 401: "auth.required", 403: "auth.forbidden",
                404: "api.not_found", 405: "api.method_not_allowed", 413: "api.too_large",
                500: "api.internal"}


class JsonErrorsMiddleware(MiddlewareMixin):
    """Everything under /api/ answers JSON, errors included: a 404 from the URL map, a 405,
    a 400 from Django's own checks, a crash (500; the traceback is in the log). The
    actions' envelope, with the HTTP reason as the message."""

    def process_response(self, request, response):
        if (request.path.startswith("/api/") and response.status_code >= 400
                and not response.get("Content-Type", "").startswith("application/json")):
            status = response.status_code
            answer = error_response(_ERROR_CODES.get(status, f"http.{status}"),
                                    HTTPStatus(status).phrase + ".", status)
            if response.has_header("Allow"):
                answer["Allow"] = response["Allow"]
            return answer
        return response


def _allowed(request, slot_name: str) -> bool:
    scope = getattr(request.principal, "allows_slot", None)
    return scope(slot_name) if scope else True


@require_GET
@api_view
def slot_list(request):
    slots = [s.as_json() for s in Slot.objects.for_dashboard() if _allowed(request, s.name)]
    return JsonResponse({"slots": slots})


@require_GET
@api_view
def slot_detail(request, name: str):
    if not _allowed(request, name):
        return error_response("auth.forbidden", f"This token may not use slot {name!r}.", 403, name)
    try:
        slot = get_slot(name)
    except SlotError as exc:
        return JsonResponse(exc.envelope(), status=exc.http_status)
    queue = runtime.current().admission.stats(slot.pk, slot.max_concurrency)
    return JsonResponse({**slot.as_json(), "queue": queue})  # this process's fair queue


def _run_action(action: str, name: str, body: dict, actor, dry_run: bool = False
                ) -> tuple[dict, int]:
    try:
        model = ""
        if action == "swap":
            model = body.get("model") or body.get("model_name")
            if not isinstance(model, str) or not model.strip():
                return envelope("slot.config_error", 'swap needs {"model": "<model name>"}',
                                name), 400
        if dry_run:  # the fit check's plan, nothing done
            return {"plan": fit.plan(name, model or None, action=action).as_json()}, 200
        slot = lifecycle.do_action(action, name, actor=actor, model=model)
        slot.refresh_from_db()
        return slot.as_json(), 200
    except SlotError as exc:
        return exc.envelope(), exc.http_status
    finally:
        connection.close()  # worker threads must not keep connections open


@require_POST
@api_view
async def slot_action(request, name: str, action: str):
    if action not in lifecycle.ACTIONS:
        return error_response("api.not_found", f"Unknown action {action!r}.", 404, name)
    if not _allowed(request, name):
        return error_response("auth.forbidden", f"This token may not use slot {name!r}.", 403, name)
    body: dict = {}
    if request.content_type == "application/json" and request.body:
        try:
            body = json_object(request.body)
        except NotAJsonObject as exc:
            return error_response("api.bad_json", str(exc), 400, name)
    elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        body = request.POST.dict()  # e.g. an htmx form posting model=...
    dry_run = request.GET.get("dry_run")
    if dry_run not in (None, "", "0", "1", "true", "false"):
        return error_response("api.bad_request", "dry_run is 1 (answer the plan, do "
                              "nothing) or 0.", 400, name)
    dry_run = dry_run in ("1", "true")
    if dry_run and action not in fit.ACTIONS:
        return error_response("api.bad_request", f"dry_run answers the fit check of load "
                              f"and swap; {action} has none.", 400, name)
    # On the runtime's action pool: a load takes minutes and must not hold Django's shared
    # sync thread, which every other sync view needs. The actor is a user or a token's
    # principal (recorded as "token:<name>").
    data, status = await sync_to_async(
        _run_action, thread_sensitive=False, executor=runtime.current().actions)(
        action, name, body, request.principal, dry_run)
    return JsonResponse(data, status=status)


def _node_json(node: Node, staff: bool) -> dict:
    data = {"name": node.name, "enabled": node.enabled, "reachable": node.reachable,
            "version": node.version, "simulated": node.simulated,
            "last_seen": node.last_seen.isoformat() if node.last_seen else None,
            "unreachable_since": node.unreachable_since.isoformat()
            if node.unreachable_since else None}
    if staff:  # where lemond lives and what went wrong there is for administrators
        data["url"] = node.base_url
        data["last_error"] = node.last_error
    return data


@require_GET
def health(request):
    """hal0's own health; the nodes' reachability (as last observed) for a logged-in caller
    or a token: a scoped token sees only the nodes of its slots, and only staff see node
    URLs and errors."""
    try:
        Slot.objects.exists()
        database = "ok"
    except Exception as exc:  # the database is the one thing hal0 cannot work without
        return JsonResponse({"status": "error", "database": str(exc)[:200]}, status=503)
    data = {"status": "ok", "database": database, "time": timezone.now().isoformat()}
    principal, denied = authenticate(request)
    if not denied:
        nodes = Node.objects.all()
        scope = getattr(principal, "allowed", ())  # a token's slots; () = every slot
        if scope:
            nodes = nodes.filter(slots__name__in=scope).distinct()
        staff = bool(getattr(principal, "is_staff", False))
        data["nodes"] = [_node_json(n, staff) for n in nodes]
    return JsonResponse(data)
