"""Serving the simulator with Daphne, and its command line."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from http import HTTPStatus
from typing import Any

from autobahn.websocket.types import ConnectionDeny
from daphne.ws_protocol import WebSocketProtocol

from providers.lemonade.simulator.app import Simulator
from providers.lemonade.simulator.config import SimOptions
from providers.lemonade.simulator.constants import SHAPES
from providers.lemonade.simulator.wire import is_loopback

# --------------------------------------------------------------------------------------
# serving


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's command-line options (shared by `lemond_sim` and `python -m`)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (loopback only unless --allow-remote); "
                             "/internal/set of host/port is accepted and stored, but the "
                             "simulator keeps listening where it was started")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default 13305, whatever the shape; 0 = any)")
    parser.add_argument("--websocket-port", type=int, default=None,
                        help="the separate log websocket port (lemond's websocket_port; "
                             "default: a random free port, like lemond's \"auto\"); "
                             "not opened for --version-shape 10.0 (no websockets before "
                             "v10.1)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow binding a non-loopback interface")
    parser.add_argument("--version-shape", choices=sorted(SHAPES), default="10.6",
                        help="which lemond to imitate (default 10.6, the pinned runtime)")
    parser.add_argument("--max-loaded-models", type=int, default=1,
                        help="models per type before LRU eviction (-1 = unlimited)")
    parser.add_argument("--load-delay", type=float, default=1.5, help="seconds per load")
    parser.add_argument("--pull-delay", type=float, default=2.0, help="seconds per download")
    parser.add_argument("--fail-model", action="append", default=[], metavar="NAME",
                        dest="fail_model", help="loads of this model fail (repeatable)")
    parser.add_argument("--api-key", default="", help="LEMONADE_API_KEY to require")
    parser.add_argument("--admin-api-key", default="",
                        help="LEMONADE_ADMIN_API_KEY for /internal/* (defaults to --api-key)")
    parser.add_argument("--downloaded", default=None, metavar="NAME,...",
                        help="models that start downloaded (default: a small useful set)")
    parser.add_argument("--ttft", type=float, default=0.0,
                        help="seconds before the first token of a response")
    parser.add_argument("--token-delay", type=float, default=0.01,
                        help="seconds between streamed chunks")
    parser.add_argument("--verbose", action="store_true", help="echo the log to stdout")


def options_from_args(ns: Any) -> dict[str, Any]:
    get = ns.get if isinstance(ns, dict) else lambda k, d=None: getattr(ns, k, d)
    downloaded = get("downloaded")
    return {
        "version_shape": get("version_shape") or "10.6",
        "max_loaded_models": get("max_loaded_models", 1),
        "load_delay": get("load_delay", 1.5),
        "pull_delay": get("pull_delay", 2.0),
        "fail_models": tuple(get("fail_model") or ()),
        "api_key": get("api_key") or "",
        "admin_api_key": get("admin_api_key") or "",
        "downloaded": (tuple(n.strip() for n in downloaded.split(",") if n.strip())
                       if downloaded is not None else None),
        "ttft": get("ttft", 0.0),
        "token_delay": get("token_delay", 0.01),
        "verbose": bool(get("verbose", False)),
    }


def default_port(version_shape: str) -> int:
    # Real lemond <= 10.0 listened on 8000, but that is hal0's own port and the contract
    # (design.md) says 13305 for every shape; pass --port 8000 to mimic an old install.
    return 13305


def check_host(host: str, allow_remote: bool) -> None:
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"refusing to bind {host!r}: the simulator is for loopback only "
                         "(pass --allow-remote to override)")


class DenyingWebSocketProtocol(WebSocketProtocol):
    """Daphne's websocket protocol plus ASGI's websocket denial response extension, so the
    simulator can answer an upgrade it refuses with a full HTTP response (as lemond's HTTP
    server answers the plain GET the upgrade also is) instead of Daphne's bare 403. A
    streamed denial (the ≤v10.0 SSE log stream) goes out chunked as it is produced."""

    denial: dict | None = None

    def handle_reply(self, message):
        kind = message.get("type")
        if kind == "websocket.http.response.start" and hasattr(self, "handshake_deferred"):
            self.denial = {"status": int(message["status"]), "body": b"",
                           "headers": list(message.get("headers") or []),
                           "streaming": False}
        elif kind == "websocket.http.response.body" and self.denial is not None:
            chunk, more = message.get("body", b""), bool(message.get("more_body"))
            denial = self.denial
            if more and not denial["streaming"]:
                # A streamed body: send the head now and the body chunked as it comes;
                # no handshake timeout applies to an answered request.
                denial["streaming"] = True
                if self.openHandshakeTimeoutCall is not None:
                    self.openHandshakeTimeoutCall.cancel()
                    self.openHandshakeTimeoutCall = None
                self.sendData(self._denial_head(["Transfer-Encoding: chunked"]))
                chunk, denial["body"] = denial["body"] + chunk, b""
            if denial["streaming"]:
                if chunk:
                    self.sendData(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                if not more:
                    self.sendData(b"0\r\n\r\n")
                    self._finish_denial()
            else:
                denial["body"] += chunk
                if not more:
                    self._finish_denial()
        else:
            super().handle_reply(message)

    def _denial_head(self, extra: list[str]) -> bytes:
        status = self.denial["status"]
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        # framing is this method's: the length (or chunking) it gives, then close
        head += [f"{k.decode('latin-1')}: {v.decode('latin-1')}"
                 for k, v in self.denial["headers"]
                 if k.lower() not in (b"content-length", b"transfer-encoding",
                                      b"connection")]
        head += [*extra, "Connection: close"]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")

    def _finish_denial(self):
        status = self.denial["status"]
        self.handshake_deferred.errback(ConnectionDeny(
            code=status, reason=HTTPStatus(status).phrase))
        del self.handshake_deferred
        self.server.protocol_disconnected(self)

    def sendHttpErrorResponse(self, code, reason, responseHeaders=None):
        if self.denial is None:
            return super().sendHttpErrorResponse(code, reason, responseHeaders)
        if not self.denial["streaming"]:  # a streamed denial is already on the wire
            body = self.denial["body"]
            self.sendData(self._denial_head([f"Content-Length: {len(body)}"]) + body)
        return None

    def check_timeouts(self):
        if self.denial is not None and self.denial["streaming"]:
            return  # an HTTP answer in progress, not a websocket still connecting
        super().check_timeouts()


def port_in_use(host: str, port: int) -> bool:
    """Whether a server already listens there (a port in TIME_WAIT is free: SO_REUSEADDR,
    as Twisted's own listener uses)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def run(host: str = "127.0.0.1", port: int | None = None, *, allow_remote: bool = False,
        websocket_port: int | None = None, **options: Any) -> int:
    """Serve the simulator with Daphne until SIGINT/SIGTERM or `/internal/shutdown`.

    Listens on the main port and, from the 10.6 shape on, on a separate websocket port
    (lemond's `websocket_port`, a random free one unless given; lemond ≤v10.0 had no
    websocket, so the 10.0 shape opens none), prints one line once listening and returns
    the process exit code. `port`/`host` set later over `/internal/set` are stored but
    not rebound: the simulator keeps listening here.
    """
    check_host(host, allow_remote)
    sim_options = SimOptions.build(**options)
    if port is None:
        port = default_port(sim_options.version_shape)

    if port and port_in_use(host, port):
        # lemond probes its port first and exits non-zero when another server holds it
        # (Daphne would log the failure and carry on with its other listeners).
        print(f"lemond simulator: port {port} on {host} is already in use", file=sys.stderr,
              flush=True)
        return 1

    # daphne.server installs Twisted's asyncio reactor on import: import it before Twisted,
    # and only here, in the process that serves, not in everything that imports the package.
    from daphne.server import Server  # noqa: PLC0415 - installs a reactor (see above)
    from twisted.internet import reactor  # noqa: PLC0415 - only after daphne.server

    app = Simulator(sim_options)
    interface = host.strip("[]").replace(":", r"\:")
    endpoints = [f"tcp:port={port}:interface={interface}"]
    if app.since(10, 1):  # websockets arrived in v10.1
        endpoints.append(f"tcp:port={websocket_port or 0}:interface={interface}")
    server = Server(application=app, endpoints=endpoints,
                    signal_handlers=True, verbosity=0, server_name="",
                    application_close_timeout=5)
    denying = DenyingWebSocketProtocol
    create_application = server.create_application

    def create_with_extensions(protocol, scope):
        if scope.get("type") == "websocket" and isinstance(protocol, denying):
            scope = {**scope, "extensions": {"websocket.http.response": {}}}
        return create_application(protocol, scope)

    server.create_application = create_with_extensions

    def announce() -> None:
        # Listeners report in the order the endpoints were given: main port, then websocket.
        ports = [address[1] for address in server.listening_addresses]
        actual = ports[0] if ports else port
        app.listen_port = actual
        app.listen_host = host
        app.websocket_port = ports[1] if len(ports) > 1 else None
        server.ws_factory.protocol = denying
        shown = f"[{host}]" if ":" in host else host
        app.log("Info", "Server", f"Port: {actual}")
        if app.websocket_port:
            app.log("Info", "WebSocket", f"Server started on port {app.websocket_port}")
            extra = f"websocket port {app.websocket_port}"
        else:
            extra = "no websocket port: logs stream over SSE"
        print(f"lemond simulator (version {app.version}) listening on http://{shown}:{actual} "
              f"({extra})", flush=True)

    server.ready_callable = announce
    app.shutdown_hook = lambda: reactor.callLater(0, server.stop)
    server.run()
    app.stop_all_backends()
    if len(server.listening_addresses) < len(endpoints):
        print(f"lemond simulator: could not listen on {host}:{port}", file=sys.stderr,
              flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m providers.lemonade.simulator",
                                     description="A lemond simulator (no inference).")
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        return run(ns.host, ns.port, allow_remote=ns.allow_remote,
                   websocket_port=ns.websocket_port, **options_from_args(ns))
    except ValueError as exc:
        parser.error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
