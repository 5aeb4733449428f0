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
import time
from urllib.parse import quote

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db.models import Count
from django.http import Http404, HttpResponse, HttpResponseNotAllowed
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST

from providers.lemonade import catalog
from providers.lemonade.errors import LemonadeError

from . import leases, live, metrics, runtime, states, tokens
from .actions import config, lifecycle, pulls
from .actions.errors import SlotError
from .consumers import LEVELS
from .forms import NodeForm, SlotForm, TokenForm
from .models import LEMOND_TYPE, ApiToken, Capability, Node, Slot, can_manage_slots

# How long a button's request waits for a quick action (pin, an unload) to finish, so its
# answer can carry the final card; longer actions answer before and push when done.
ACTION_WAIT_S = 0.25
PICKER_ROWS = 60
LOAD_HISTORY = 20


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
    saved = False
    if request.method == "POST":
        form = SlotForm(request.POST, instance=Slot.objects.select_related("node").get(pk=slot.pk),
                        user=request.user)
        if form.is_valid():
            updated = form.save_through_actions(request.user)
            if updated is not None:
                if updated.name != name:
                    target = reverse("slots:detail", args=[updated.name])
                    if request.htmx:
                        return HttpResponse(headers={"HX-Redirect": target})
                    return redirect(target)
                slot, saved = updated, True
                form = SlotForm(instance=updated, user=request.user)
        if request.htmx:
            return render(request, "slots/detail.html#slot-form",
                          {"slot": slot, "form": form, "saved": saved})
    else:
        form = SlotForm(instance=slot, user=request.user)
    return render(request, "slots/detail.html", {
        "slot": slot, "form": form, "saved": saved,
        "events": slot.events.all()[:50],
        "chart": load_chart(slot),
        "traffic": metrics.slot_stats(slot.name, runtime.current().metrics.pending()),
        "lemond_entry": json.dumps(slot.lemond_entry, indent=2, sort_keys=True)
        if slot.lemond_entry else "",
        "live_url": f"/ws/slots/?slot={quote(slot.name)}",
    })


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
        if slot is not None:  # open dashboards get the new card from the action
            target = reverse("slots:detail", args=[slot.name])
            if request.htmx:
                return HttpResponse(headers={"HX-Redirect": target})
            return redirect(target)
    if request.htmx and request.method == "POST":
        return render(request, "slots/create.html#slot-form", {"form": form})
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
    future = runtime.current().submit(lifecycle.do_action, action, name, actor=user,
                                      model=model)
    wrapped = asyncio.wrap_future(future)
    done, _ = await asyncio.wait({wrapped}, timeout=ACTION_WAIT_S)
    error = ""
    if done:
        exc = wrapped.exception()
        if isinstance(exc, SlotError):
            error = exc.message
        elif exc is not None:
            error = f"{action} failed: {exc}"
    return await _answer(request, name, error, with_card=bool(done),
                         close_modal=action == "swap" and not error)


async def _answer(request, name: str, error: str = "", with_card: bool = False,
                  close_modal: bool = False) -> HttpResponse:
    if not request.htmx:
        target = request.POST.get("next") or ""
        if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
            target = reverse("slots:dashboard")
        return redirect(target)

    def render_answer() -> str:
        parts = []
        # Only a finished action's card: an unfinished one could overwrite a newer push.
        if with_card:
            slot = Slot.objects.select_related("node").filter(name=name).first()
            if slot is not None:
                parts.append(live.render_slot_card(slot))
        parts.append(render_to_string("slots/_flash.html", {"message": error, "oob": True}))
        if close_modal:
            parts.append('<div id="modal" hx-swap-oob="true"></div>')
        return "".join(parts)

    return HttpResponse(await sync_to_async(render_answer)())


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
        if query and query not in model_id.lower():
            continue
        fitting.append({
            "id": model_id, "downloaded": bool(row.get("downloaded")),
            "suggested": bool(row.get("suggested")),
            "size": row.get("size") if isinstance(row.get("size"), (int, float)) else None,
            "recipe": row.get("recipe") if isinstance(row.get("recipe"), str) else "",
            "current": model_id == current,
            "dom_id": dom_id(model_id),
        })
    fitting.sort(key=lambda r: (not r["current"], not r["downloaded"], not r["suggested"],
                                r["id"].lower()))
    return fitting


def dom_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


@login_required
async def swap_picker(request, name):
    slot = await _slot_or_404(name)
    rows, error = [], ""
    try:
        async with slot.node.client(settings.HAL0_PAGE_LEMOND_TIMEOUT_S) as client:
            listed = await asyncio.wait_for(client.models(show_all=True),
                                            settings.HAL0_PAGE_LEMOND_TIMEOUT_S)
        rows = model_rows(listed, slot.capability, request.GET.get("q", ""), slot.model_name)
    except (LemonadeError, TimeoutError) as exc:
        error = f"Cannot list lemond's models: {exc or 'no answer in time'}"
    context = {"slot": slot, "rows": rows[:PICKER_ROWS], "more": max(0, len(rows) - PICKER_ROWS),
               "error": error, "q": request.GET.get("q", ""),
               "pulling": {r["id"] for r in rows if pulls.pull_running(slot.node_id, r["id"])}}
    template = "slots/_swap_picker.html#rows" if "q" in request.GET else "slots/_swap_picker.html"
    return await sync_to_async(render)(request, template, context)


def _pull_fragment(slot: Slot, model: str, phase: str, data: dict) -> str:
    done = data.get("bytes_downloaded")
    total = data.get("bytes_total") or data.get("total_download_size")
    return render_to_string("slots/_pull.html", {
        "slot": slot, "model": model, "dom_id": dom_id(model), "phase": phase,
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
    last_push: list[float] = []  # empty: nothing pushed yet (not "at monotonic 0")

    async def progress(phase: str, data: dict) -> None:
        now = time.monotonic()
        if phase == "progress" and last_push and now - last_push[0] < 0.2:
            return  # a few updates a second are plenty for a progress bar
        last_push[:] = [now]
        runtime.current().live.send(_pull_fragment(slot, model, phase, data))

    pulls.do_start_pull(slot, model, actor=user, progress=progress)
    return HttpResponse(_pull_fragment(slot, model, "starting", {}))


@login_required
@require_POST
async def pull_cancel(request, name):
    slot = await _slot_or_404(name)
    model = (request.POST.get("model") or "").strip()
    cancelled = pulls.do_cancel_pull(slot.node_id, model)
    phase = "cancelling" if cancelled else "idle"
    return HttpResponse(_pull_fragment(slot, model, phase, {}))


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
    current = request.GET.get("node") or (nodes[0].name if nodes else "")
    return render(request, "slots/logs.html", {
        "nodes": nodes, "current": current, "levels": LEVELS, "level": "info",
        "live_url": f"/ws/logs/?node={quote(current)}",
    })


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
        return redirect("slots:node", name=node.name)
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
        if node.name != name:
            return redirect("slots:node", name=node.name)
        saved = True
        form = NodeForm(instance=node)
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
            listed=form.cleaned_data["listed"], expires_days=form.cleaned_data["expires_days"],
            rpm_limit=form.cleaned_data["rpm_limit"], tpm_limit=form.cleaned_data["tpm_limit"],
            created_by=request.user.get_username())
        created = {"name": row.name, "token": raw}
        form = TokenForm()
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
    return redirect("slots:tokens")
