"""Another web server, where DCOR's link resources point (their `url`; doc/DCOR.md §6): files
of the data directory by their path in it, whole or a `Range`, with ETags; it counts requests,
bytes and requests that carried an `Authorization` header (a token must never come here).

Routes: /<path in the data dir>  (GET/HEAD);  /_moved/<path>: a redirect (302) to /<path>, for
a link that redirects first (a `link_to` of `_moved/…`);  /_stats (GET: counters, DELETE: reset).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from .files import send_file

log = logging.getLogger(__name__)
MOVED = "/_moved/"  # paths below it redirect to the path without it


class ExternalServer:
    """`with ExternalServer(root, bind="127.0.0.62") as server: ... server.url ...`."""

    def __init__(self, root: Path, *, bind: str, port: int = 0) -> None:
        self.root = Path(root).resolve()
        self._httpd = _HTTPServer((bind, port), _Handler)
        self._httpd.external = self
        host, real_port = self._httpd.server_address[:2]
        assert isinstance(host, str)
        self.url = f"http://{host}:{real_port}"
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {}
        self.reset()
        self._thread: threading.Thread | None = None

    def url_of(self, path: Path) -> str:
        return f"{self.url}/{quote(path.resolve().relative_to(self.root).as_posix())}"

    def reset(self) -> None:
        with self._lock:
            self.counters = {"requests": 0, "authorized": 0, "bytes": 0}

    def count(self, *, authorized: bool, sent: int) -> None:
        with self._lock:
            self.counters["requests"] += 1
            self.counters["authorized"] += int(authorized)
            self.counters["bytes"] += sent

    def start(self) -> str:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> ExternalServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    external: ExternalServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "external"
    timeout = 120
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("external %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        external = self.server.external
        path = unquote(urlsplit(self.path).path)
        if path == "/_stats":
            if self.command == "DELETE":
                external.reset()
            self._json(external.counters)
            return
        if path.startswith(MOVED):  # a link that redirects first, as DOIs and repositories do
            self.send_response(302)
            self.send_header("Location", f"{external.url}/{quote(path[len(MOVED) :])}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            external.count(authorized=bool(self.headers.get("Authorization")), sent=0)
            return
        target = (external.root / path.lstrip("/")).resolve()
        if (
            self.command == "DELETE"
            or not target.is_relative_to(external.root)
            or not target.is_file()
            or target.name.startswith(".")
        ):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            sent = send_file(self, target)
        except OSError as exc:
            log.debug("external %s: %s", self.address_string(), exc)
            self.close_connection = True
            sent = 0
        external.count(authorized=bool(self.headers.get("Authorization")), sent=sent)

    def _json(self, value: Any) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
