"""Model downloads: started from a page, run as tasks on the serving process's event loop.

Closing lemond's SSE stream is how a download is cancelled (lemond-api.md §2.8), so the
task owns the stream; the runtime keeps the running tasks by (node, model).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection

from providers.lemonade.errors import LemonadeError

from .. import runtime
from ..capacity import Plan
from ..models import Slot
from . import fit, lifecycle
from .audit import Actor, actor_name, ms_since, record
from .errors import get_slot

log = logging.getLogger("hal0.actions")

Progress = Callable[[str, dict], Awaitable[None]]


def pull_running(node_id: int, model: str) -> bool:
    task = runtime.current().pulls.get((node_id, model))
    return task is not None and not task.done()


def do_start_pull(slot: Slot, model: str, *, actor: Actor, progress: Progress,
                  then_serve: bool = False) -> bool:
    """Start downloading `model` on the slot's node (call from the event loop). `progress`
    gets ("progress" | "complete" | "error" | "cancelled", data). False if one is running.
    `then_serve`: once downloaded, the slot serves it ("Download & swap" in the Swap
    dialog, "Download & load" in the Model field's picker: one step each)."""
    key = (slot.node_id, model)
    if pull_running(*key):
        return False
    pulls = runtime.current().pulls
    # A fresh context: the task outlives the request, whose thread-sensitive executor
    # (Django's per-request context) is gone by the time the download ends.
    task = asyncio.get_running_loop().create_task(
        _pull(slot, model, actor_name(actor), progress, then_serve),
        context=contextvars.Context())
    pulls[key] = task
    task.add_done_callback(lambda _task: pulls.pop(key, None))
    return True


def do_cancel_pull(node_id: int, model: str) -> bool:
    task = runtime.current().pulls.get((node_id, model))
    if task is None or task.done():
        return False
    task.cancel()
    return True


async def _pull(slot: Slot, model: str, actor: str, progress: Progress,
                then_serve: bool = False) -> None:
    started = time.monotonic()
    outcome, message = "error", ""
    try:
        # the fit check: a download that does not fit on lemond's model disk never starts
        plan = await sync_to_async(_plan_download, thread_sensitive=False)(slot, model)
        if plan.refusal:
            raise _Refused(f"Refused: {plan.refusal}")
        async with slot.node.client() as client:
            async for event in client.pull(model):
                if event.event == "error":
                    message = str(event.data.get("error") or event.data)
                    break
                await progress("progress" if event.event != "complete" else "complete",
                               event.data)
                if event.event == "complete":
                    outcome, message = "complete", f"downloaded {model}"
    except asyncio.CancelledError:
        outcome, message = "cancelled", f"download of {model} cancelled"
    except (LemonadeError, _Refused) as exc:
        message = str(exc)
    if outcome == "error":
        message = message or f"download of {model} ended without completing"
    try:
        await progress(outcome, {"message": message})
        await sync_to_async(_record_and_close, thread_sensitive=False)(
            slot, "pull", actor=actor, ok=outcome == "complete",
            duration_ms=ms_since(started), model=model,
            code="" if outcome == "complete" else f"pull.{outcome}", message=message)
    except Exception:  # the slot may be gone; the download outcome was still shown
        log.exception("could not record the pull of %s", model)
    if then_serve and outcome == "complete":  # its own fit check runs in the load or swap
        runtime.current().submit(serve_downloaded, slot.name, model, actor=actor)


def serve_downloaded(name: str, model: str, *, actor: Actor) -> Slot:
    """After "Download & load/swap": load the slot when the download was its own model
    (e.g. never downloaded yet), else swap it to the new one (which becomes its model only
    if the load succeeds)."""
    slot = get_slot(name)
    if slot.model_name == model:
        return lifecycle.do_load_slot(slot, actor=actor)
    return lifecycle.do_swap_slot(slot, model, actor=actor)


class _Refused(Exception):
    """The fit check refused the download (its message says why)."""


def _plan_download(slot: Slot, model: str) -> Plan:
    try:
        return fit.plan(slot, model, action="download")
    finally:
        connection.close()


def _record_and_close(*args: Any, **kwargs: Any) -> None:
    try:
        record(*args, **kwargs)
    finally:
        connection.close()
