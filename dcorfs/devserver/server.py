"""The devserver's HTTP front: one threaded server for the CKAN API, the download routes and
the object store (path-style S3), with latency/fault injection and request counters.

Routes:
    /api/3/action/<action>                          CKAN actions incl. dcserv (GET or POST)
    /dataset/<pkg>/resource/<rid>/download/<name>   302 to a presigned resource URL
    /dataset/<pkg>/resource/<rid>/condensed.rtdc    302 to a presigned condensed URL
    /<bucket>/<artifact>/<rid[:3]>/<rid[3:6]>/<rid[6:]>   objects (GET/HEAD, Range); buckets
                                                    `circle-<org-id>` (--bucket-template)
    /_devserver/{stats,faults,info,state}           test hooks, loopback clients only

Sockets use TCP_NODELAY (otherwise every small response waits ~40 ms for a delayed ACK) and
files are streamed with sendfile, never read into memory.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import logging
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, unquote, urlsplit

from .. import __version__
from .ckan import ActionError, CkanApi
from .external import ExternalServer
from .faults import Fault, FaultConfig, Faults
from .files import send_file
from .objects import RangeNotSatisfiable, S3Error, StoredObject, parse_range
from .site import Site, SiteOptions
from .stats import Stats

log = logging.getLogger(__name__)

API_PATH = re.compile(r"^/api(?:/3)?/action/(?P<action>[^/]+)$")
DOWNLOAD_PATH = re.compile(
    r"^/dataset/(?P<pkg>[^/]+)/resource/(?P<rid>[^/]+)/"
    r"(?:download/(?P<name>[^/]*)|(?P<artifact>condensed\.rtdc|preview\.jpg))$"
)
OBJECT_PATH = re.compile(r"^/(?P<bucket>[a-z0-9][a-z0-9.-]+)/(?P<key>.+)$")  # after the others
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
LIFETIME_DOWNLOAD_PUBLIC = 86400
LIFETIME_DOWNLOAD_PRIVATE = 3600


class DevServer:
    """A local DCOR: `with DevServer(data_dir) as server: ... server.url ...`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        bind: str = "127.0.0.1",
        port: int = 0,
        state_dir: Path | None = None,
        faults: FaultConfig | None = None,
        options: SiteOptions | None = None,
        seed: int | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.state_dir = Path(state_dir) if state_dir else self.data_dir / ".devserver"
        self.faults = Faults(faults or FaultConfig(), seed)
        self.stats = Stats()
        self._options = options or SiteOptions()
        self._progress = progress
        self._httpd = _HTTPServer((bind, port), _Handler)
        host, real_port = self._httpd.server_address[:2]
        assert isinstance(host, str)
        # on port 80 without it, as on DCOR: dclab follows a `dcor` basin only to a URL with a
        # dotted host and no port (doc/DCOR.md §3)
        self.url = f"http://{host}" if real_port == 80 else f"http://{host}:{real_port}"
        self._thread: threading.Thread | None = None
        self.site: Site | None = None
        self.external: ExternalServer | None = None  # where link resources point

    def start(self) -> str:
        """Build the site (condensing what is new) and serve in a background thread."""
        try:
            site = self.site = Site.build(
                self.data_dir, self.state_dir, self.url, self._options, self._progress
            )
            if self._options.external_host:
                self.external = ExternalServer(self.data_dir, bind=self._options.external_host)
                site.external = self.external
                self.external.start()
            self._httpd.app = _App(
                site, CkanApi(site, lambda: self.faults.config.url_lifetime), self
            )
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.1},
                name="devserver",
                daemon=True,
            )
            self._thread.start()
        except BaseException:
            self.stop()  # (what was made of the site goes too)
            raise
        return self.url

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        if self.site is not None:
            self.site.close()
        if self.external is not None:
            self.external.stop()
            self.external = None

    def __enter__(self) -> DevServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _App:
    def __init__(self, site: Site, api: CkanApi, server: DevServer) -> None:
        self.site = site
        self.api = api
        self.faults = server.faults
        self.stats = server.stats
        self._ids = itertools.count(1)

    def request_id(self) -> str:
        return f"DEVSERVER{next(self._ids):010d}"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128
    app: _App

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that vanish (dclab drops streamed header probes) are normal, not errors."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("connection from %s ended: %s", client_address, exc)
        else:
            log.error("request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"dcorfs-devserver/{__version__}"
    sys_version = ""
    timeout = 120  # seconds a connection may sit idle or blocked
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- dispatch -------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        app = self.server.app
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        try:
            body = self._read_body()
            if path.startswith("/_devserver/"):
                self._admin(method, path, query, body)
                return
            latency = app.faults.config.latency_ms
            if latency:
                time.sleep(latency / 1000)
            if match := API_PATH.match(path):
                self._api(method, match["action"], query, body)
            elif match := DOWNLOAD_PATH.match(path):
                self._download(match)
            elif match := OBJECT_PATH.match(path):
                self._object(method, match["bucket"], match["key"], query)
            elif path in ("/", "/api", "/api/3"):
                self._landing(path)
            else:
                self._html(404, "Not Found", "The page you requested does not exist.")
        except OSError as exc:  # client went away, reset, timeout
            log.debug("connection %s: %s", self.address_string(), exc)
            self.close_connection = True
        except Exception:
            log.exception("devserver failed on %s %s", method, url.path)
            self.close_connection = True

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _user_token(self) -> str:
        return (
            self.headers.get("Authorization") or self.headers.get("X-CKAN-API-Key") or ""
        ).strip()

    # -- CKAN API -------------------------------------------------------------------------

    def _api(self, method: str, action: str, query: dict[str, str], body: bytes) -> None:
        app = self.server.app
        params: dict[str, Any] = dict(query)
        if method == "POST" and body:
            try:
                posted = json.loads(body)
            except ValueError:
                posted = dict(parse_qsl(body.decode("utf-8", "replace")))
            if isinstance(posted, dict):
                params.update(posted)
        elif method not in ("GET", "POST"):
            self._html(405, "Method Not Allowed", "The method is not allowed for this URL.")
            return
        fault = app.faults.draw(api=True, ranged=False)
        if fault is Fault.ERROR:
            app.stats.record_api(action, 503, fault.value)
            self._html(503, "Service Unavailable", "DCOR is currently under maintenance.")
            return
        if fault is Fault.RESET:
            app.stats.record_api(action, 0, fault.value)
            self._reset()
            return
        if fault is Fault.STALL:
            time.sleep(app.faults.config.stall_seconds)
        user = app.site.repo.user_for_token(self._user_token())
        help_url = f"{app.site.url}/api/3/action/help_show?name={action}"
        payload: Any
        try:
            result = app.api.call(action, params, user)
            status, payload = 200, {"help": help_url, "success": True, "result": result}
        except ActionError as exc:
            status = exc.status
            payload = exc.error
            if not isinstance(exc.error, str):
                payload = {"help": help_url, "success": False, "error": exc.error}
        except Exception:
            log.exception("action %s failed", action)
            status = 500
            error = {"__type": "Internal Server Error", "message": "Internal Server Error"}
            payload = {"help": help_url, "success": False, "error": error}
        data = json.dumps(payload).encode()
        app.stats.record_api(action, status, fault.value, str(params.get("query", "")))
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method == "HEAD":
            return
        if fault is Fault.SHORT:
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)

    # -- download routes ------------------------------------------------------------------

    def _download(self, match: re.Match[str]) -> None:
        site = self.server.app.site
        user = site.repo.user_for_token(self._user_token())
        found = site.repo.resource(match["rid"])
        if not UUID.match(match["pkg"]) or found is None or not site.repo.can_read(found[0], user):
            self._html(404, "Resource not found", "Resource not found")
            return
        ds, res = found
        if match["artifact"] == "preview.jpg":
            self._html(404, "Not Found", "No preview available")
            return
        if match["artifact"] == "condensed.rtdc":
            obj = site.resource_object(res.id, "condensed")
            stem, dot, suffix = res.name.rpartition(".")
            filename = f"{stem}_condensed.{suffix}" if dot else f"{res.name}_condensed"
            if obj is None:
                self._html(404, "Not Found", "Condensed resource not found")
                return
        elif res.storage != "s3":  # dc_serve `route_funcs.py` ~138-148 (doc/DCOR.md §6)
            if res.storage == "upload":  # the file from the site's disk, as flask sends it
                send_file(self, res.path, filename=res.name)
            else:
                self._redirect(site.link_url(res))
            return
        else:
            obj = site.resource_object(res.id, "resource")
            filename = res.name
            if obj is None:
                self._html(404, "Resource not found", "Resource not found")
                return
        lifetime = LIFETIME_DOWNLOAD_PRIVATE if ds.private else LIFETIME_DOWNLOAD_PUBLIC
        location, _ = site.presigner.url(
            site.objects_url, obj.bucket, obj.key, lifetime, filename=filename
        )
        self._redirect(location)

    def _redirect(self, location: str) -> None:
        body = f'<a href="{location}">Redirecting</a>'.encode()
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # -- object store ---------------------------------------------------------------------

    def _object(self, method: str, bucket: str, key: str, query: dict[str, str]) -> None:
        app = self.server.app
        request_id = app.request_id()
        resource = f"/{bucket}/{key}"
        try:
            if method not in ("GET", "HEAD"):
                raise S3Error(403, "AccessDenied", "Access Denied", resource)
            signed = app.site.presigner.check(method, bucket, key, query)
            obj = app.site.stored_object(bucket, key)
            if obj is None:
                if signed:  # DCOR's credentials may list the bucket: 404
                    raise S3Error(404, "NoSuchKey", "The specified key does not exist.", resource)
                raise S3Error(403, "AccessDenied", "Access Denied", resource)
            if not signed and not app.site.is_public(obj):
                raise S3Error(403, "AccessDenied", "Access Denied", resource)
        except S3Error as exc:
            self._s3_error(exc, request_id, method, size=None)
            return
        try:
            byte_range = parse_range(self.headers.get("Range"), obj.size)
        except RangeNotSatisfiable:
            invalid = S3Error(
                416, "InvalidRange", "The requested range is not satisfiable", resource
            )
            self._s3_error(invalid, request_id, method, size=obj.size)
            return
        fault = app.faults.draw(api=False, ranged=byte_range is not None)
        if fault is Fault.ERROR:
            status, code = app.faults.choice(((500, "InternalError"), (503, "SlowDown")))
            message = "We encountered an internal error. Please try again."
            if code == "SlowDown":
                message = "Please reduce your request rate."
            self._record(
                obj, method=method, byte_range=byte_range, status=status, sent=0, fault=fault
            )
            self._s3_error(S3Error(status, code, message, resource), request_id, method, size=None)
            return
        if fault is Fault.IGNORE_RANGE:
            byte_range = None
        elif fault is Fault.WRONG_RANGE and byte_range is not None:
            byte_range = _shifted(byte_range, obj.size)
        start, stop = byte_range if byte_range is not None else (0, obj.size)
        self.send_response(206 if byte_range is not None else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        if byte_range is not None:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{obj.size}")
        self.send_header("ETag", f'"{obj.etag}"')
        self.send_header("Last-Modified", email.utils.formatdate(obj.last_modified, usegmt=True))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("x-amz-request-id", request_id)
        if "response-content-disposition" in query:
            self.send_header("Content-Disposition", query["response-content-disposition"])
        self.end_headers()
        status = 206 if byte_range is not None else 200
        if method == "HEAD":
            self._record(
                obj, method=method, byte_range=byte_range, status=status, sent=0, fault=fault
            )
            return
        sent = 0
        try:
            with obj.path.open("rb") as handle:
                sent = self._send_body(handle, start, stop, fault)
        finally:
            self._record(
                obj, method=method, byte_range=byte_range, status=status, sent=sent, fault=fault
            )

    def _send_body(self, handle: BinaryIO, start: int, stop: int, fault: Fault) -> int:
        """Stream [start, stop) of `handle`; faults cut, pause or truncate the body."""
        length = stop - start
        if fault not in (Fault.RESET, Fault.STALL, Fault.SHORT):
            return int(self.connection.sendfile(handle, start, length)) if length else 0
        half = length // 2
        sent = int(self.connection.sendfile(handle, start, half)) if half else 0
        if fault is Fault.RESET:
            self._reset()
            return sent
        if fault is Fault.SHORT:
            self.close_connection = True
            return sent
        time.sleep(self.server.app.faults.config.stall_seconds)
        return sent + int(self.connection.sendfile(handle, start + half, length - half))

    def _record(
        self,
        obj: StoredObject,
        *,
        method: str,
        byte_range: tuple[int, int] | None,
        status: int,
        sent: int,
        fault: Fault,
    ) -> None:
        self.server.app.stats.record_object(
            path=f"{obj.bucket}/{obj.key}",
            resource_id=obj.resource_id,
            artifact=obj.artifact,
            method=method,
            byte_range=byte_range,
            status=status,
            sent=sent,
            fault=fault.value,
            host=self.headers.get("Host", ""),
            authorized=bool(self._user_token()),
        )

    def _s3_error(self, exc: S3Error, request_id: str, method: str, size: int | None) -> None:
        body = exc.xml(request_id)
        self.send_response(exc.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", request_id)
        if size is not None:
            self.send_header("Content-Range", f"bytes */{size}")
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Abort the connection with a TCP reset (SO_LINGER 0, then close)."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    # -- small pages and test hooks -------------------------------------------------------

    def _html(self, status: int, title: str, text: str) -> None:
        data = (
            f"<html><head><title>{title}</title></head>"
            f"<body><h1>{title}</h1><p>{text}</p></body></html>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, status: int, value: Any) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _landing(self, path: str) -> None:
        if path != "/":
            self._json(200, {"version": 3})
            return
        site = self.server.app.site
        self._html(
            200,
            site.repo.site_title,
            f"A local DCOR-compatible server with {len(site.repo.datasets)} datasets. "
            f'API: <a href="/api/3/action/status_show">/api/3/action/status_show</a>',
        )

    def _admin(self, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        host = self.client_address[0]
        if not (host.startswith("127.") or host == "::1"):
            self._json(403, {"error": "test hooks are for loopback clients only"})
            return
        app = self.server.app
        if path == "/_devserver/stats" and method == "GET":
            self._json(200, app.stats.snapshot(with_log=query.get("log") in ("1", "true")))
        elif path == "/_devserver/stats" and method in ("DELETE", "POST"):
            app.stats.reset()
            self._json(200, {})
        elif path == "/_devserver/faults" and method == "GET":
            self._json(200, app.faults.config.as_dict())
        elif path == "/_devserver/faults" and method in ("PUT", "POST"):
            try:
                changes = json.loads(body or b"{}")
                self._json(200, app.faults.update(changes).as_dict())
            except (ValueError, TypeError) as exc:
                self._json(400, {"error": str(exc)})
        elif path == "/_devserver/state" and method in ("PUT", "POST"):
            try:
                change = json.loads(body or b"{}")
                ds = app.site.repo.set_state(str(change["dataset"]), str(change["state"]))
                self._json(200, {"dataset": ds.name, "state": ds.state})
            except (ValueError, TypeError, KeyError) as exc:
                self._json(400, {"error": str(exc)})
        elif path == "/_devserver/clock" and method in ("PUT", "POST"):
            try:  # the site's lags (SiteOptions.condensed_lag, fields_lag) count further
                app.site.advance(float(json.loads(body or b"{}")["advance"]))
                self._json(200, {"elapsed": app.site.elapsed()})
            except (ValueError, TypeError, KeyError) as exc:
                self._json(400, {"error": str(exc)})
        elif path == "/_devserver/info" and method == "GET":
            self._json(200, _info(app.site))
        else:
            self._json(404, {"error": f"no test hook {method} {path}"})


def _shifted(byte_range: tuple[int, int], size: int) -> tuple[int, int]:
    """Another range of the same length (for the wrong-Content-Range fault)."""
    start, stop = byte_range
    shift = max(1, (stop - start) // 2)
    if stop + shift <= size:
        return start + shift, stop + shift
    if start - shift >= 0:
        return start - shift, stop - shift
    return (start, stop - 1) if stop - start > 1 else (start, stop)


def _info(site: Site) -> dict[str, Any]:
    resources = []
    for ds, res in site.repo.iter_resources():
        resources.append(
            {
                "id": res.id,
                "name": res.name,
                "dataset": ds.name,
                "dataset_id": ds.id,
                "circle": ds.circle.name,
                "private": ds.private,
                "path": str(res.path),
                "size": res.size,
                "rtdc": res.is_rtdc,
                "storage": res.storage,
                "condensed": site.resource_object(res.id, "condensed") is not None,
            }
        )
    external = site.external.url if site.external is not None else None
    return {
        "url": site.url,
        "external": external,
        "resources": resources,
        "users": sorted(site.repo.users),
    }
