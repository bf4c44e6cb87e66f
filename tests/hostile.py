"""A hostile DCOR for tests: a proxy in front of a devserver that can spoil what it answers.

Everything is forwarded to the devserver; the devserver's URL is replaced by the proxy's in
bodies and `Location` headers, so object requests (basins, downloads) pass through the proxy
too. `api` hooks may rewrite the body of a CKAN action's answer (names, sizes, broken JSON);
`objects` hooks may rewrite the headers of object-store answers (e.g. a new ETag). Bound to
127.0.0.1; bodies are small test files, held in memory.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

ApiHook = Callable[[str, str, bytes], bytes]  # (action, query string, body) → body
ObjectHook = Callable[[str, dict[str, str]], dict[str, str]]  # (path, headers) → headers
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class HostileProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.api: ApiHook | None = None
        self.objects: ObjectHook | None = None
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HostileProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._forward("GET")

    def do_POST(self) -> None:
        self._forward("POST")

    def do_HEAD(self) -> None:
        self._forward("HEAD")

    def _forward(self, method: str) -> None:
        proxy: HostileProxy = self.server.proxy
        upstream = urlsplit(proxy.upstream)
        length = int(self.headers.get("Content-Length") or 0)
        sent = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        try:
            connection.request(method, self.path, body=sent, headers=headers)
            answer = connection.getresponse()
            body = answer.read()
            status = answer.status
            got = {k: v for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP}
        finally:
            connection.close()
        path, _, query = self.path.partition("?")
        if path.startswith("/api/3/action/"):
            body = body.replace(proxy.upstream.encode(), proxy.url.encode())
            if proxy.api is not None:
                body = proxy.api(path.rsplit("/", 1)[1], query, body)
        elif proxy.objects is not None and not path.startswith(("/dataset/", "/_devserver/")):
            got = proxy.objects(path, got)
        if "Location" in got:
            got["Location"] = got["Location"].replace(proxy.upstream, proxy.url)
        self.send_response(status)
        for key, value in got.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)
