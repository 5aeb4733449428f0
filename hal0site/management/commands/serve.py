"""`manage.py serve`: the dashboard, API and gateway on Daphne, with the reconciler loop
running inside the same process (the embedded default: one process does everything)."""

import daphne.server  # isort:skip  (installs Twisted's asyncio reactor; must come first)

import asyncio
import contextlib
import datetime
import gc
import logging

from daphne.access import AccessLogGenerator
from daphne.endpoints import build_endpoint_description_strings
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from twisted.internet import defer, reactor
from twisted.web import http as twisted_http

from hal0site.asgi import application
from hal0site.bodylimit import LimitedHTTPFactory
from slots import reconciler
from slots.actions.config import do_follow_lemonade_url
from slots.runtime import Runtime

log = logging.getLogger("hal0.serve")


class Command(BaseCommand):
    help = "Serve hal0 (dashboard, JSON API, OpenAI gateway, websockets) with its reconciler."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--no-reconciler", action="store_true",
                            help="don't run the reconciler here (run `manage.py reconcile` "
                                 "as its own process instead)")
        parser.add_argument("--access-log", action="store_true", help="log every request")

    def handle(self, *args, host, port, no_reconciler, access_log, **options):
        if not 0 < port < 65536:
            raise CommandError(f"--port {port} is not a TCP port")
        runtime = Runtime().start()  # this process's executors, counters and buffers
        if moved := do_follow_lemonade_url(actor="serve"):  # hal0.env governs the local node
            log.warning("%s", moved)
        if not no_reconciler:
            running: dict[str, asyncio.Task] = {}

            def start_reconciler():
                task = daphne.server.twisted_loop.create_task(reconciler.run_forever())
                task.add_done_callback(_report_crash)
                running["task"] = task

            def stop_reconciler():
                # On SIGTERM/Ctrl-C, let the loop give its node leases back so another
                # process takes over at once instead of waiting out the lease TTL.
                task = running.get("task")
                if task is None or task.done():
                    return None
                task.cancel()
                return defer.Deferred.fromFuture(asyncio.ensure_future(_settle(task)))

            reactor.callWhenRunning(start_reconciler)
            reactor.addSystemEventTrigger("before", "shutdown", stop_reconciler)
        endpoints = build_endpoint_description_strings(host=host, port=port)
        shown = f"[{host}]" if ":" in host else host
        self.stdout.write(f"hal0 listening on http://{shown}:{port}/ "
                          f"({'without' if no_reconciler else 'with'} the reconciler)")
        self.stdout.flush()
        access = AccessLogGenerator(self.stdout) if access_log else None
        # Body caps where Daphne receives the bytes (hal0site.bodylimit): its Server builds
        # the HTTPFactory named in its module.
        daphne.server.HTTPFactory = LimitedHTTPFactory
        # Twisted knows no reason phrase for 429 and writes "429 Unknown Status": the
        # gateway's rate-limit and queue refusals read as what they are on the status line
        twisted_http.RESPONSES.setdefault(429, b"Too Many Requests")
        server = daphne.server.Server(
            application=log_cancelled(application, access) if access else application,
            endpoints=endpoints,
            action_logger=access,
            # lemond loads can take minutes; the gateway keeps its own time limits
            http_timeout=None,
            websocket_timeout=86400,
            application_close_timeout=10,
            server_name="hal0",
        )
        # What is loaded by now (Django, the apps, their modules) lives as long as the
        # process: out of the collector's sight, its full passes walk only what requests
        # leave behind, not all of Django each time (about a third of the serve
        # process's garbage-collection CPU per gateway request, docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        server.run()
        if server.abort_start:
            raise CommandError(f"could not listen on {host}:{port} (is the port in use?)")
        # Daphne has stopped (SIGTERM, Ctrl-C): requests still open were cut off, so give
        # this process's serving leases back now rather than after their TTL, and do not
        # wait minutes for loads lemond finishes anyway (recorded as interrupted).
        if runtime.stop(settings.HAL0_SHUTDOWN_GRACE_S):
            log.warning("exiting without waiting for lemond (see the interrupted actions above)")


def log_cancelled(app, access):
    """Daphne's access log writes a line when a response completes, so a request whose
    client went away first (a cancelled stream, a closed tab) left no trace. This ASGI
    wrapper writes those in the same format, with nginx's 499 and the bytes sent so far."""

    async def logged(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        seen = {"size": 0, "done": False, "gone": False}

        async def watched_receive():
            message = await receive()
            if message["type"] == "http.disconnect" and not seen["done"]:
                seen["gone"] = True
            return message

        async def counted_send(message):
            if message["type"] == "http.response.body" and not seen["gone"]:
                seen["size"] += len(message.get("body", b""))
                seen["done"] = not message.get("more_body", False)
            await send(message)

        try:
            return await app(scope, watched_receive, counted_send)
        finally:
            if seen["gone"] and not seen["done"]:
                client = scope.get("client")
                query = scope.get("query_string", b"").decode("latin1")
                access.write_entry(
                    host=f"{client[0]}:{client[1]}" if client else None,
                    date=datetime.datetime.now(), status=499, length=seen["size"],
                    request=f"{scope['method']} {scope['path']}" + (f"?{query}" if query else ""))

    return logged


async def _settle(task: asyncio.Task, timeout: float = 5.0) -> None:
    with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
        await asyncio.wait_for(asyncio.shield(task), timeout)


def _report_crash(task):
    if not task.cancelled() and task.exception():
        log.error("the reconciler stopped", exc_info=task.exception())
