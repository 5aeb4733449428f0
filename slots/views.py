"""Pages: function-based views that render from the database and never wait on lemond.

Buttons start their action on a worker (`Runtime.submit`) and answer at
once; the card then changes through the websocket push. The few reads a page needs from
lemond (the swap picker's model list, a model's raw entry) are async views with a short
timeout that render an error message when lemond is down. htmx requests get a named
partial of the same template (`request.htmx`).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from urllib.parse import quote, urlencode

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.db.models import Count
from django.http import Http404, HttpResponse, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from providers.lemonade import catalog
from providers.lemonade.errors import LemonadeError

from . import activity, capacity, leases, live, metrics, runtime, states, tokens, trying
from .actions import config, fit, lifecycle, pulls
from .actions.errors import SlotError
from .capacity import Plan
from .consumers import LEVELS
from .forms import NodeForm, SlotForm, TokenForm
from .models import LEMOND_TYPE, ApiToken, Capability, Node, Slot, can_manage_slots
from .templatetags.hal0 import ago

# How long a button's request waits for a quick action (pin, an unload) to finish, so its
# answer can carry the final card; longer actions answer before and push when done.
ACTION_WAIT_S = 0.25
PICKER_ROWS = 60
LOAD_HISTORY = 20
# How a download ended, as told to the open pages (a cancel is no failure).
PULL_OUTCOMES = {
    "complete": ("success", "Downloaded {model}."),
    "error": ("error", "The download of {model} failed: {message}"),
    "cancelled": ("info", "The download of {model} was cancelled."),
}
# A download this big asks first (the picker's confirmation).
CONFIRM_DOWNLOAD_GB = 5

# How a button's action is told: while it runs, and when it is done.
ACTION_WORDS = {
    "load": ("Loading {name}…", "{name} is loaded."),
    "unload": ("Unloading {name}…", "{name} is unloaded."),
    "restart": ("Restarting {name}…", "{name} restarted."),
    "swap": ("Swapping {name} to {model}…", "{name} now serves {model}."),
    "pin": ("Pinning {name}…", "{name} is pinned."),
    "unpin": ("Unpinning {name}…", "{name} is unpinned."),
}


def toast(response: HttpResponse, message: str, level: str = "success",
          *events: str) -> HttpResponse:
    """Tell the page how an htmx request went: hal0.js shows an `hal0:toast` event as a
    message that screen readers announce (full-page posts use Django's messages)."""
    # on the body: the button that asked may be gone already (a pushed card replaced it),
    # and an event on a detached element reaches nobody
    triggers = {"hal0:toast": {"level": level, "message": message},
                **{name: {"target": "body"} for name in events}}
    triggers["hal0:toast"]["target"] = "body"
    response["HX-Trigger"] = json.dumps(triggers)
    return response


def toast_html(message: str, level: str) -> str:
    """The same message pushed over the websocket to the open pages (appended to #toasts)."""
    item = render_to_string("slots/_toast.html", {"level": level, "text": message})
    return f'<div id="toasts" hx-swap-oob="beforeend">{item}</div>'


# --- dashboard ---------------------------------------------------------------------------

@login_required
def dashboard(request):
    return render(request, "slots/dashboard.html", {**live.layout_context(),
                                                    "live_url": "/ws/slots/"})


# --- one slot ----------------------------------------------------------------------------

@login_required
@require_http_methods(["GET", "POST"])
def slot_detail(request, name):
    slot = get_object_or_404(Slot.objects.select_related("node"), name=name)
    saved, note = False, ""
    if request.method == "POST":
        form = SlotForm(request.POST, instance=Slot.objects.select_related("node").get(pk=slot.pk),
                        user=request.user)
        if form.is_valid():
            updated = form.save_through_actions(request.user)
            note = form.model_note
            if updated is not None:
                if updated.name != name:
                    messages.success(request, f"Saved {name} as {updated.name}.")
                    if note:
                        messages.warning(request, note)
                    target = reverse("slots:detail", args=[updated.name])
                    if request.htmx:
                        return HttpResponse(headers={"HX-Redirect": target})
                    return redirect(target)
                slot, saved = updated, True
                form = SlotForm(instance=updated, user=request.user)
        if request.htmx:
            response = render(request, "slots/detail.html#slot-form",
                              {"slot": slot, "form": form, "saved": saved, "note": note})
            if saved:
                return toast(response, f"Saved {slot.name}.")
            return toast(response, "Not saved: see the form's errors.", "error")
        if saved:
            messages.success(request, f"Saved {slot.name}.")
    else:
        form = SlotForm(instance=slot, user=request.user)
    return render(request, "slots/detail.html", {
        "slot": slot, "form": form, "saved": saved, "note": note,
        "events": slot.events.all()[:50],
        "chart": load_chart(slot),
        "traffic": metrics.slot_stats(slot.name, runtime.current().metrics.pending()),
        "trend": activity.trend(slot.name),
        "try_endpoint": trying.PANEL_ENDPOINTS.get(slot.capability),
        "lemond_entry": json.dumps(readable_entry(slot), indent=2, sort_keys=True)
        if slot.lemond_entry else "",
        "live_url": f"/ws/slots/?slot={quote(slot.name)}",
    })


@login_required
def activity_page(request):
    """The last gateway requests this user may see, newest first; new ones arrive on the
    page's socket (`/ws/activity/`, with the same filters)."""
    slot = request.GET.get("slot", "")
    status = request.GET.get("status", "")
    status = status if status in activity.STATUSES else ""
    slots = list(Slot.objects.order_by("name").only("pk", "name", "max_concurrency"))
    names = {s.name for s in slots}
    slot = slot if slot in names else ""
    queues = activity.queues(runtime.current().admission, slots)
    filters = {k: v for k, v in (("slot", slot), ("status", status)) if v}
    return render(request, "slots/activity.html", {
        "rows": activity.recent(request.user, slot, status), "slots": slots,
        "slot": slot, "status": status, "statuses": activity.STATUSES, "queues": queues,
        "flush_s": settings.HAL0_METRICS_FLUSH_S,
        "live_url": "/ws/activity/" + (f"?{urlencode(filters)}" if filters else ""),
    })


def readable_entry(slot: Slot) -> dict:
    """lemond's health entry for the slot, with `last_use` (milliseconds on lemond's own
    steady clock, meaningless to a reader) as the age hal0 derived from it."""
    entry = dict(slot.lemond_entry)
    if "last_use" in entry:
        age = ago(slot.last_use_at) if slot.last_use_at else "not seen in use"
        entry["last_use"] = f"{age} (lemond's clock: {entry['last_use']} ms)"
    return entry


def load_chart(slot: Slot) -> dict:
    """The last loads' durations, oldest first, scaled for a small inline SVG bar chart."""
    events = list(
        slot.events.filter(ok=True, action__in=states.LOAD_ACTIONS,
                           duration_ms__isnull=False)
        .values("duration_ms", "created_at", "action", "model")[:LOAD_HISTORY])[::-1]
    if not events:
        return {"bars": [], "rows": []}
    width, height, gap = 300, 80, 2
    top = max(e["duration_ms"] or 0 for e in events) or 1
    bar = (width - gap * (LOAD_HISTORY - 1)) / LOAD_HISTORY
    bars = []
    for i, event in enumerate(events):
        ms = event["duration_ms"] or 0
        h = max(2.0, height * ms / top)
        bars.append({**event, "x": round(i * (bar + gap), 1), "y": round(height - h, 1),
                     "w": round(bar, 1), "h": round(h, 1), "s": ms / 1000})
    median = sorted(e["duration_ms"] or 0 for e in events)[len(events) // 2]
    return {"bars": bars, "rows": events[::-1], "width": width, "height": height,
            "max_s": top / 1000, "median_s": median / 1000}


@login_required
@require_http_methods(["GET", "POST"])
def slot_create(request):
    # bound on any POST, an empty one too, so missing fields are reported
    form = SlotForm(request.POST if request.method == "POST" else None, user=request.user)
    if request.method == "POST" and form.is_valid():
        slot = form.save_through_actions(request.user)
        if slot is not None and form.model_note:
            messages.warning(request, form.model_note)  # saved, but lemond was not asked
        if slot is not None:  # open dashboards get the new card from the action
            messages.success(request, f"Created slot {slot.name}.")
            target = reverse("slots:detail", args=[slot.name])
            if request.htmx:
                return HttpResponse(headers={"HX-Redirect": target})
            return redirect(target)
    if request.htmx and request.method == "POST":
        return toast(render(request, "slots/create.html#slot-form", {"form": form}),
                     "Not created: see the form's errors.", "error")
    return render(request, "slots/create.html", {"form": form})


@login_required
@require_http_methods(["GET", "POST"])
def slot_delete(request, name):
    if not can_manage_slots(request.user):
        return HttpResponse("Only staff (or slots.manage_slots) can delete slots.", status=403)
    slot = get_object_or_404(Slot.objects.select_related("node"), name=name)
    error = ""
    if request.method == "POST":
        try:
            config.do_delete_slot(slot, actor=request.user)
        except SlotError as exc:
            error = exc.message
        else:
            messages.success(request, f"Deleted slot {name}.")
            if request.htmx:
                return HttpResponse(headers={"HX-Redirect": reverse("slots:dashboard")})
            return redirect("slots:dashboard")
    return render(request, "slots/delete.html", {"slot": slot, "error": error},
                  status=409 if error else 200)


# --- buttons -----------------------------------------------------------------------------

@login_required
async def slot_action(request, name, action):
    """Start an action and answer at once: the card follows over the websocket."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    if action not in lifecycle.ACTIONS:
        raise Http404(f"Unknown action {action!r}.")
    user = await request.auser()
    model = (request.POST.get("model") or "").strip()
    if action == "swap" and not model:
        return await _answer(request, name, "Pick a model to swap to.")
    if action in ("load", "swap") and request.htmx and request.POST.get("confirmed") != "1":
        # the confirm step: a load that evicts, may not fit or is refused shows its plan first
        plan = await sync_to_async(_plan_or_none, thread_sensitive=False)(name, model, action)
        if plan is not None and plan.verdict in ("refused", "warning"):
            return await sync_to_async(_confirm)(request, name, action, model, plan)
    state = runtime.current()
    future = state.submit(lifecycle.do_action, action, name, actor=user, model=model)
    wrapped = asyncio.wrap_future(future)
    done, _ = await asyncio.wait({wrapped}, timeout=ACTION_WAIT_S)
    started, finished = (w.format(name=name, model=model) for w in ACTION_WORDS[action])
    if done:
        error = action_error(action, wrapped.exception())
        message = error or finished
    else:
        # the outcome comes later: the card goes to every open page, the toast to this
        # user's own pages
        future.add_done_callback(lambda f: state.live.send_to(
            live.user_group(user.pk), toast_html(*_outcome(action, f, finished))))
        error, message = "", started
    return await _answer(request, name, error, message=message, with_card=bool(done),
                         close_modal=(action == "swap" or request.POST.get("confirmed") == "1")
                         and not error,
                         level="error" if error else "success" if done else "info")


def _plan_or_none(name: str, model: str, action: str) -> Plan | None:
    try:
        return fit.plan(name, model or None, action=action)
    except SlotError:
        return None  # no such slot: the action says so
    finally:
        connection.close()  # a worker thread of its own


def _confirm(request, name: str, action: str, model: str, plan: Plan) -> HttpResponse:
    """The fit verdict in the dialog, with "… anyway" unless hal0 refuses."""
    slot = Slot.objects.select_related("node").get(name=name)
    html = render_to_string("slots/_fit_confirm.html", {
        "slot": slot, "action": action, "model": model, "plan": plan}, request=request)
    return HttpResponse(html)


def action_error(action: str, exc: BaseException | None) -> str:
    if isinstance(exc, SlotError):
        return exc.message
    return f"{action} failed: {exc}" if exc is not None else ""


def _outcome(action: str, future, finished: str) -> tuple[str, str]:
    exc = future.exception() if not future.cancelled() else None
    error = action_error(action, exc)
    return (error, "error") if error else (finished, "success")


async def _answer(request, name: str, error: str = "", message: str = "",
                  with_card: bool = False, close_modal: bool = False,
                  level: str = "error") -> HttpResponse:
    if not request.htmx:
        target = request.POST.get("next") or ""
        if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
            target = reverse("slots:dashboard")
        if message or error:
            await sync_to_async(messages.add_message)(
                request, messages.ERROR if error else messages.INFO, message or error)
        return redirect(target)

    def render_answer() -> str:
        # Only a finished action's card: an unfinished one could overwrite a newer push.
        if with_card:
            slot = Slot.objects.select_related("node").filter(name=name).first()
            if slot is not None:
                return live.render_slot_card(slot)
        return ""

    response = HttpResponse(await sync_to_async(render_answer)())
    # the swap dialog closes itself (and gives focus back to its Swap button)
    events = ["hal0:closeModal"] if close_modal else []
    return toast(response, message or error, level, *events)


# --- the swap picker and downloads (reads lemond; short timeouts) ----------------------------

async def _slot_or_404(name: str) -> Slot:
    slot = await Slot.objects.select_related("node").filter(name=name).afirst()
    if slot is None:
        raise Http404(f"No slot named {name!r}.")
    return slot


def model_rows(rows: list[dict], capability: str, query: str, current: str) -> list[dict]:
    """Catalogue rows that fit the slot's lemond type, downloaded and suggested first."""
    pool = LEMOND_TYPE[Capability(capability)]
    query = query.strip().lower()
    fitting = []
    for row in rows if isinstance(rows, list) else ():
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            continue  # lemond answered something odd: list what can be read
        model_id = row["id"]
        if not model_id or catalog.model_type(row) != pool:
            continue
        if query and not _matches(row, query):
            continue
        fitting.append({
            "id": model_id, "downloaded": bool(row.get("downloaded")),
            "suggested": bool(row.get("suggested")),
            "size": size if isinstance(size := row.get("size"), (int, float)) else None,
            "big": is_big_download(size),
            "recipe": row.get("recipe") if isinstance(row.get("recipe"), str) else "",
            "current": model_id == current,
            "dom_id": dom_id(model_id),
            "entry": row,
            "labels": [x for x in row.get("labels") or [] if isinstance(x, str)]
            if isinstance(row.get("labels"), list) else [],
        })
    fitting.sort(key=lambda r: (not r["current"], not r["downloaded"], not r["suggested"],
                                r["id"].lower()))
    return fitting


def is_big_download(size_gb: object) -> bool:
    """Over CONFIRM_DOWNLOAD_GB: the Download button asks first."""
    return isinstance(size_gb, (int, float)) and size_gb > CONFIRM_DOWNLOAD_GB


def _size_field(request) -> float | None:
    """The catalogue size the picker sent back with a download (only words a prompt)."""
    try:
        return float(request.POST.get("size") or "")
    except ValueError:
        return None


_SIZE_FILTER = re.compile(r"^([<>]=?)\s*([0-9]+(?:\.[0-9]+)?)\s*(?:gb)?$")


def _matches(row: dict, query: str) -> bool:
    """Every word of `query` matches: `<5` / `>=2gb` the size in GB, anything else a part
    of the name, a label or the recipe."""
    labels, recipe = row.get("labels"), row.get("recipe")
    words = [row["id"], recipe if isinstance(recipe, str) else ""]
    words += [x for x in (labels if isinstance(labels, list) else []) if isinstance(x, str)]
    text = " ".join(words).lower()
    size = row.get("size") if isinstance(row.get("size"), (int, float)) else None
    for word in query.split():
        bound = _SIZE_FILTER.match(word)
        if bound:
            op, limit = bound.group(1), float(bound.group(2))
            if size is None or not {"<": size < limit, "<=": size <= limit,
                                     ">": size > limit, ">=": size >= limit}[op]:
                return False
        elif word not in text:
            return False
    return True


def _plan_rows(slot: Slot, rows: list[dict], health) -> None:
    slots = list(Slot.objects.filter(node_id=slot.node_id))
    for row in rows:
        row["plan"] = capacity.compute(slot, row["id"], "swap", entry=row["entry"],
                                       health=health, stats=slot.node.system_stats or {},
                                       slots=slots)


def dom_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


@login_required
async def swap_picker(request, name):
    slot = await _slot_or_404(name)
    rows, error, health = [], "", None
    try:
        async with slot.node.client(settings.HAL0_PAGE_LEMOND_TIMEOUT_S) as client:
            listed, health = await asyncio.wait_for(
                asyncio.gather(client.models(show_all=True), client.health()),
                settings.HAL0_PAGE_LEMOND_TIMEOUT_S)
        rows = model_rows(listed, slot.capability, request.GET.get("q", ""), slot.model_name)
    except (LemonadeError, TimeoutError) as exc:
        error = f"Cannot list lemond's models: {exc or 'no answer in time'}"
    shown = rows[:PICKER_ROWS]
    if shown:  # each row's fit verdict, from one health read and the node's totals
        await sync_to_async(_plan_rows)(slot, shown, health)
    context = {"slot": slot, "rows": shown, "more": max(0, len(rows) - PICKER_ROWS),
               "error": error, "q": request.GET.get("q", ""),
               "pulling": {r["id"] for r in rows if pulls.pull_running(slot.node_id, r["id"])}}
    template = "slots/_swap_picker.html#rows" if "q" in request.GET else "slots/_swap_picker.html"
    return await sync_to_async(render)(request, template, context)


@login_required
async def model_pick(request):
    """The Model field's picker: the node's catalogue for a capability (the same rows as
    Swap: filter by name, label or size, downloaded first, sizes in GB); "Use this" fills
    the field. Takes the form's `capability`, `node` and `model_name`, and on a slot's own
    page its `slot`: then each row shows its fit, and a model not downloaded offers
    "Download & load" (as long as the form still names the slot's node and capability:
    the download goes to the slot's node)."""
    capability = request.GET.get("capability") or ""
    if capability not in Capability.values:
        return HttpResponse("Choose the slot's capability first.", status=400)
    node_id = request.GET.get("node") or ""
    node = await Node.objects.filter(pk=int(node_id)).afirst() if node_id.isdigit() \
        else await sync_to_async(Node.local)()
    if node is None:
        return HttpResponse("No such node.", status=400)
    slot = await Slot.objects.select_related("node").filter(
        name=request.GET.get("slot") or "", node_id=node.pk, capability=capability).afirst()
    current = (request.GET.get("model_name") or "").strip()
    query = request.GET.get("q", "")
    rows, error, health = [], "", None
    try:
        async with node.client(settings.HAL0_PAGE_LEMOND_TIMEOUT_S) as client:
            reads = [client.models(show_all=True)] + ([client.health()] if slot else [])
            listed, *rest = await asyncio.wait_for(asyncio.gather(*reads),
                                                   settings.HAL0_PAGE_LEMOND_TIMEOUT_S)
        health = rest[0] if rest else None
        rows = model_rows(listed if isinstance(listed, list) else [], capability, query,
                          current)
    except (LemonadeError, TimeoutError) as exc:
        error = f"Cannot list lemond's models: {exc or 'no answer in time'}"
    shown = rows[:PICKER_ROWS]
    if slot is not None and shown:  # the fit of each, as in Swap
        await sync_to_async(_plan_rows)(slot, shown, health)
    context = {"rows": shown, "more": max(0, len(rows) - PICKER_ROWS),
               "error": error, "q": query, "node": node, "capability": capability,
               "label": Capability(capability).label, "current": current, "slot": slot,
               "pulling": {r["id"] for r in rows if pulls.pull_running(node.pk, r["id"])}}
    template = "slots/_model_pick.html#rows" if "q" in request.GET else "slots/_model_pick.html"
    return await sync_to_async(render)(request, template, context)


def _pull_fragment(slot: Slot, model: str, phase: str, data: dict,
                   size: float | None = None, then: str = "") -> str:
    done = data.get("bytes_downloaded")
    total = data.get("bytes_total") or data.get("total_download_size")
    return render_to_string("slots/_pull.html", {
        "slot": slot, "model": model, "dom_id": dom_id(model), "phase": phase,
        "size": size, "big": is_big_download(size), "then": then,
        "percent": data.get("percent"), "file": data.get("file"),
        "done_mb": round(done / 2**20) if isinstance(done, int) else None,
        "total_mb": round(total / 2**20) if isinstance(total, int) else None,
        "message": data.get("message", ""), "oob": True,
    })


@login_required
@require_POST
async def pull_start(request, name):
    slot = await _slot_or_404(name)
    model = (request.POST.get("model") or "").strip()
    if not model:
        return HttpResponse("Pick a model.", status=400)
    user = await request.auser()
    size = _size_field(request)
    # what the slot does once it is downloaded: "swap" (the Swap dialog) or "load" (the
    # Model field's picker); either way the slot ends up serving it
    then = request.POST.get("then") if request.POST.get("then") in ("swap", "load") else ""
    last_push: list[float] = []  # empty: nothing pushed yet (not "at monotonic 0")

    async def progress(phase: str, data: dict) -> None:
        now = time.monotonic()
        if phase == "progress" and last_push and now - last_push[0] < 0.2:
            return  # a few updates a second are plenty for a progress bar
        last_push[:] = [now]
        runtime.current().live.send(_pull_fragment(slot, model, phase, data, size, then))
        if phase in PULL_OUTCOMES:
            level, words = PULL_OUTCOMES[phase]
            runtime.current().live.send_to(live.user_group(user.pk), toast_html(
                words.format(model=model, message=data.get("message", "")), level))

    pulls.do_start_pull(slot, model, actor=user, progress=progress, then_serve=bool(then))
    return toast(HttpResponse(_pull_fragment(slot, model, "starting", {}, size, then)),
                 f"Downloading {model} for {slot.name}…", "info")


@login_required
@require_POST
async def pull_cancel(request, name):
    slot = await _slot_or_404(name)
    model = (request.POST.get("model") or "").strip()
    cancelled = pulls.do_cancel_pull(slot.node_id, model)
    phase = "cancelling" if cancelled else "idle"
    response = HttpResponse(_pull_fragment(slot, model, phase, {}, _size_field(request)))
    if cancelled:
        return toast(response, f"Cancelling the download of {model}…", "info")
    return toast(response, f"{model} was not downloading.", "info")


@login_required
async def lemond_model(request, name):
    """lemond's own catalogue entry for the slot's model (`/v1/models/{id}`)."""
    slot = await _slot_or_404(name)
    entry, error = None, ""
    try:
        async with slot.node.client(settings.HAL0_PAGE_LEMOND_TIMEOUT_S) as client:
            entry = await asyncio.wait_for(client.model(slot.model_name),
                                           settings.HAL0_PAGE_LEMOND_TIMEOUT_S)
    except (LemonadeError, TimeoutError) as exc:
        error = f"Cannot ask lemond about {slot.model_name}: {exc or 'no answer in time'}"
    return await sync_to_async(render)(request, "slots/_lemond_model.html", {
        "entry": json.dumps(entry, indent=2, sort_keys=True) if entry is not None else "",
        "error": error})


# --- lemond logs -------------------------------------------------------------------------

@login_required
def logs(request):
    if not can_manage_slots(request.user):
        return HttpResponse("Only staff (or slots.manage_slots) can read lemond's logs.",
                            status=403)
    nodes = list(Node.objects.filter(enabled=True))
    # open on a node that answers, not the first name in the alphabet
    reachable = [n for n in nodes if n.reachable] or nodes
    current = request.GET.get("node") or (reachable[0].name if reachable else "")
    return render(request, "slots/logs.html", {
        "nodes": nodes, "current": current, "levels": LEVELS, "level": "info",
        "live_url": f"/ws/logs/?node={quote(current)}",
    })


def tell_connection(request, node: Node, saved: str) -> None:
    """Test a node just saved and say how it went: saving stands either way (lemond may
    come up later), but a typo in the URL shows at once."""
    if not node.enabled:
        messages.success(request, f"{saved} It is disabled: hal0 does not poll it.")
        return
    answered, said = node.check_connection()
    if answered:
        messages.success(request, f"{saved} Connection test: {node.base_url} answered ({said}).")
    else:
        messages.warning(request, f"{saved} Connection test failed: {node.base_url} did not "
                                  f"answer ({said}). hal0 keeps trying.")


def _staff_only(request) -> HttpResponse | None:
    if not request.user.is_staff:
        return HttpResponse("Only staff can manage nodes and API tokens.", status=403)
    return None


# --- lemond nodes ------------------------------------------------------------------------

@login_required
@require_http_methods(["GET", "POST"])
def nodes(request):
    """Every lemond node (reachability, which process polls it, its slots) and a form to
    add one."""
    if (denied := _staff_only(request)) is not None:  # nodes carry lemond's keys
        return denied
    form = NodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        node = form.save_through_actions(request.user)
        tell_connection(request, node, f"Added node {node.name}.")
        return redirect("slots:node", name=node.name)
    if request.method == "POST":
        messages.error(request, "The node was not added: see the form's errors.")
    rows = list(Node.objects.annotate(slot_count=Count("slots")).order_by("name"))
    polled_by = leases.holders()
    for row in rows:
        row.polled_by = polled_by.get(row.name, "")  # type: ignore[attr-defined]  # for the template
    status = 400 if request.method == "POST" else 200
    return render(request, "slots/nodes.html", {"nodes": rows, "form": form}, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def node_edit(request, name):
    if (denied := _staff_only(request)) is not None:  # nodes carry lemond's keys
        return denied
    node = get_object_or_404(Node, name=name)
    form = NodeForm(request.POST or None, instance=node)
    saved = False
    if request.method == "POST" and form.is_valid():
        node = form.save_through_actions(request.user)
        tell_connection(request, node, f"Saved node {node.name}.")
        if node.name != name:
            return redirect("slots:node", name=node.name)
        saved = True
        form = NodeForm(instance=node)
    elif request.method == "POST":
        messages.error(request, "Not saved: see the form's errors.")
    return render(request, "slots/node_edit.html", {
        "node": node, "form": form, "saved": saved,
        "slots": list(node.slots.order_by("capability", "name")),
        "polled_by": leases.holders().get(node.name, ""),
    }, status=400 if request.method == "POST" and not saved else 200)


@login_required
@require_POST
def node_delete(request, name):
    if (denied := _staff_only(request)) is not None:  # nodes carry lemond's keys
        return denied
    node = get_object_or_404(Node, name=name)
    try:
        config.do_delete_node(node, actor=request.user)
    except SlotError as exc:
        return render(request, "slots/node_edit.html", {
            "node": node, "form": NodeForm(instance=node),
            "slots": list(node.slots.order_by("capability", "name")),
            "polled_by": leases.holders().get(node.name, ""),
            "error": exc.message,
        }, status=409)
    messages.success(request, f"Deleted node {name}.")
    return redirect("slots:nodes")


# --- API tokens (the gateway's and the JSON API's bearer tokens) -----------------------------

@login_required
@require_http_methods(["GET", "POST"])
def token_list(request):
    """List tokens and create one; the new token is shown on this response only."""
    if (denied := _staff_only(request)) is not None:
        return denied
    form = TokenForm(request.POST if request.method == "POST" else None)
    created = None
    if request.method == "POST" and form.is_valid():
        row, raw = tokens.create_token(
            form.cleaned_data["name"], slots=form.cleaned_data["slots"],
            listed=form.cleaned_data["listed"], may_manage=form.cleaned_data["may_manage"],
            expires_days=form.cleaned_data["expires_days"],
            rpm_limit=form.cleaned_data["rpm_limit"], tpm_limit=form.cleaned_data["tpm_limit"],
            created_by=request.user.get_username())
        created = {"name": row.name, "token": raw}
        messages.success(request, f"Created token {row.name}: copy it now, it is shown once.")
        form = TokenForm()
    elif request.method == "POST":
        messages.error(request, "The token was not created: see the form's errors.")
    response = render(request, "slots/tokens.html", {
        "form": form, "created": created,
        "tokens": ApiToken.objects.order_by("revoked_at", "name"),
    })
    if created:
        response["Cache-Control"] = "no-store"  # the one page that shows a token
    return response


@login_required
@require_POST
def token_revoke(request, name):
    if (denied := _staff_only(request)) is not None:
        return denied
    try:
        tokens.revoke_token(name)
    except ApiToken.DoesNotExist:
        raise Http404(f"No token named {name!r}.") from None
    messages.success(request, f"Revoked token {name}: clients using it are refused from now on.")
    return redirect("slots:tokens")
