"""A small HTTP endpoint on a daemon thread: ``/metrics`` on every node, plus the
dashboard's page and JSON on the coordinator.

Handlers return bytes that were prepared elsewhere (a metrics snapshot, the
coordinator's last status); they never touch a role's state while the role's
thread changes it. The endpoint binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from downpour.errors import ConfigError

log = logging.getLogger(__name__)

# A route answers (content type, body); None means 404.
Route = Callable[[], tuple[str, bytes] | None]

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "application/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".json": "application/json", ".svg": "image/svg+xml"}


def static_file(name: str) -> tuple[str, bytes] | None:
    """A file shipped in ``monitor/static`` (only names that are there: no path tricks)."""
    if name not in os.listdir(STATIC_DIR):
        return None
    with open(os.path.join(STATIC_DIR, name), "rb") as f:
        body = f.read()
    return _TYPES.get(os.path.splitext(name)[1], "application/octet-stream"), body


def advertised_host(bind_host: str) -> str:
    """The host others should use to reach an endpoint bound on ``bind_host``."""
    if bind_host in ("0.0.0.0", "", "::"):
        return socket.gethostname()
    return bind_host


SOCKET_TIMEOUT_S = 10.0  # a connection that sends nothing for this long is closed
MAX_CONNECTIONS = 32  # connections served at once; more are closed at once (each holds a thread)


class _CappedServer(ThreadingHTTPServer):
    """A thread per connection, at most :data:`MAX_CONNECTIONS` at once."""

    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        # (socketserver's, with the slot given back before the connection is closed: a client that
        # sees the close and connects again finds it free; released after, it could be refused)
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - as socketserver: reported, the server goes on
            self.handle_error(request, client_address)
        finally:
            self._slots.release()
            self.shutdown_request(request)


class HttpEndpoint:
    """Serves ``routes`` (path -> handler) and ``/static/<file>`` at ``host:port`` (0 = a free port)."""

    def __init__(self, host: str, port: int, routes: dict[str, Route], name: str = "node") -> None:
        self.routes = dict(routes)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            timeout = SOCKET_TIMEOUT_S  # an idle or slow client (slowloris) loses its connection

            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = urlsplit(self.path).path
                try:
                    if path.startswith("/static/"):
                        answer = static_file(path[len("/static/"):])
                    else:
                        route = endpoint.routes.get(path)
                        answer = route() if route else None
                except Exception as err:  # a bug in a handler must not kill the endpoint
                    log.exception("%s: HTTP %s failed", name, path)
                    self._answer(500, "text/plain", f"internal error: {err}\n".encode())
                    return
                if answer is None:
                    self._answer(404, "text/plain", f"no such page: {path}\n".encode())
                else:
                    self._answer(200, *answer)

            def _answer(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("%s: http %s", name, fmt % args)

        try:
            self.server = _CappedServer((host, port), Handler)
        except OSError as err:
            raise ConfigError(f"{name}: cannot serve HTTP on {host}:{port}: {err}") from err
        self.server.daemon_threads = True
        self.host = advertised_host(host)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name=f"{name}-http", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=2.0)
