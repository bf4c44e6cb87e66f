"""HTTP for dcorfs: one urllib3 connection pool per host, strict range GETs, the one retry
policy.

Promises: a ranged GET returns exactly the bytes asked for or raises (206 with the exact
`Content-Range`, length and, when known, ETag and total size are checked; a 200 to a ranged
GET is an error). The bytes are a read-only view of the one buffer they were read into: no
copy; a failed attempt's buffer is let go before the retry. Transient failures (connection
trouble, timeouts, 5xx/429, short or mislabelled bodies) are retried with exponential backoff
and full jitter, never past the caller's deadline. Messages never contain header values (the
API token) nor query strings (presigned signatures); an S3 store's error code
(`AccessDenied`, `SignatureDoesNotMatch`, `NoSuchKey` …) is quoted, since it tells a private
object from rejected credentials.

urllib3 itself, not `requests` over it: `requests` spent about as much CPU again per request
preparing and merging settings (listing a dataset of small resources sends six a resource).
What `requests` took from the environment is taken here too, once per scheme and host, with
`requests`' own functions: a proxy (`https_proxy`, `http_proxy`, `all_proxy`, `no_proxy`,
credentials in the proxy's URL) and the CA bundle (`REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`,
else certifi's).
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import certifi
import requests.utils
import urllib3

from .. import __version__
from ..errors import (
    AccessDenied,
    DcorfsError,
    DeadlineExceeded,
    Moved,
    NotFound,
    ObjectChanged,
    ProtocolError,
    TransientError,
    redact_url,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
_NOT_JSON = object()
DOCUMENT_LIMIT = 64 << 20  # bytes of a document (an S3 listing page) at most
READ_PIECE = 256 << 10  # bytes of a range's body read at a time (see `_read_body`)
_QUERY = re.compile(r"\?[^\s'\")]*")
_S3_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
NETWORK_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)
Response = urllib3.BaseHTTPResponse


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 5.0
    connect_timeout: float = 10.0
    read_timeout: float = 20.0


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str
    head: bytes | memoryview = b""  # the object's first bytes, when the probe asked for them


def _etag(value: str | None) -> str:
    value = (value or "").strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def _total(content_range: str | None, start: int, stop: int) -> int:
    """Total size from `bytes start-(stop-1)/total`; TransientError if the range differs."""
    expected = f"bytes {start}-{stop - 1}/"
    if not content_range or not content_range.startswith(expected):
        raise TransientError(f"got Content-Range {content_range!r}, asked {start}-{stop - 1}")
    try:
        return int(content_range[len(expected) :])
    except ValueError:
        raise TransientError(f"bad Content-Range {content_range!r}") from None


def _range_stop(content_range: str | None) -> int:
    """The end (exclusive) of `bytes 0-(end-1)/total`; TransientError otherwise."""
    try:
        first, last = (content_range or "").removeprefix("bytes ").split("/", 1)[0].split("-")
        if int(first) != 0:
            raise ValueError
        return int(last) + 1
    except ValueError:
        raise TransientError(f"bad Content-Range {content_range!r} for a probe") from None


def _raise_if_busy(response: Response, url: str) -> None:
    """5xx and 429 are transient; the server may say how long to wait."""
    status = response.status
    if status == 429 or status >= 500:
        raise TransientError(
            f"HTTP {status} for {redact_url(url)}", retry_after=_retry_after(response)
        )


def _internal_error(body: Any) -> bool:
    """Whether a 500's body (JSON) is CKAN's answer to an action that raised (`views/api.py`:
    error type "Internal Server Error"), which a retry at once does not cure (doc/DCOR.md §8);
    other 500s (a proxy, the search index unreachable) stay transient."""
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and error.get("__type") == "Internal Server Error"


def _s3_code(response: Response) -> str:
    """The `<Code>` of an S3 error body ("AccessDenied"), or "" when there is none."""
    if "xml" not in response.headers.get("Content-Type", ""):
        return ""
    try:
        head = response.read(4096, decode_content=True)
    except NETWORK_ERRORS:
        return ""
    match = _S3_CODE.search(head or b"")
    return match[1].decode() if match else ""


def _check_status(response: Response, url: str) -> None:
    status = response.status
    if status in (403, 404):
        code = _s3_code(response)
        message = f"HTTP {status}{f' ({code})' if code else ''} for {redact_url(url)}"
        if status == 403:
            raise AccessDenied(message, code=code)
        raise NotFound(message)
    _raise_if_busy(response, url)
    if status == 416:
        raise ProtocolError(f"HTTP 416 (range not satisfiable) for {redact_url(url)}")


def _check_object_status(response: Response, url: str) -> None:
    """As `_check_status`; a redirect is not followed: it would take a presigned query (or a
    request that should stay on its host) somewhere else."""
    _check_status(response, url)
    if 300 <= response.status < 400:
        raise Moved(f"HTTP {response.status} (a redirect) for {redact_url(url)}")


def ca_options() -> dict[str, str]:
    """Where HTTPS certificates are checked against, as `requests` finds them: a bundle file
    or a directory of hashed certificates (`REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`), else
    certifi's bundle. ProtocolError (not retried) when the path named does not exist."""
    named = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if not named:
        return {"ca_certs": certifi.where()}
    if Path(named).is_dir():
        return {"ca_cert_dir": named}
    if not Path(named).is_file():
        raise ProtocolError(
            f"the CA bundle {named} (REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE) is missing"
        )
    return {"ca_certs": named}


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url`'s scheme and host, or None (direct): as
    `requests` decides it (`no_proxy` with host names, ports, IP ranges in CIDR form)."""
    proxy: str | None = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    return proxy or None


def _proxy_manager(proxy: str, options: dict[str, Any]) -> urllib3.ProxyManager:
    """A pool manager through `proxy` (`http://` when it names no scheme), with the
    credentials it carries sent as `Proxy-Authorization` (as `requests` sends them)."""
    proxy = requests.utils.prepend_scheme_if_needed(proxy, "http")  # type: ignore[no-untyped-call]
    user, password = requests.utils.get_auth_from_url(proxy)
    headers = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}") if user else None
    try:
        parts = urllib3.util.parse_url(proxy)
        return urllib3.ProxyManager(parts._replace(auth=None).url, proxy_headers=headers, **options)
    except ValueError as exc:  # (a socks proxy, a malformed URL): named without credentials
        where = urlsplit(proxy)
        shown = f"{where.scheme}://{where.hostname}:{where.port}" if where.hostname else "named"
        raise ProtocolError(f"the proxy {shown} cannot be used ({type(exc).__name__})") from None


class Http:
    """Thread-safe: urllib3's pools are shared by the threads; a pool keeps at most
    `pool_size` idle connections to a host."""

    def __init__(
        self,
        *,
        policy: RetryPolicy = RetryPolicy(),
        pool_size: int = 16,
        user_agent: str = f"dcorfs/{__version__}",
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._pool_size = pool_size
        self._headers = {"User-Agent": user_agent, "Accept": "*/*"}
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        # pool managers by the proxy they send through (None: direct), and which serves a host
        self._by_proxy: dict[str | None, urllib3.PoolManager] = {}
        self._managers: dict[tuple[str, str], urllib3.PoolManager] = {}  # by (scheme, host)
        self._requests: collections.Counter[str] = collections.Counter()  # attempts, by kind

    def _manager(self, url: str) -> urllib3.PoolManager:
        """Who sends requests to `url`'s host: the environment is looked at once a host."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        manager = self._managers.get(key)
        if manager is not None:
            return manager
        proxy = proxy_for(url)
        with self._lock:
            manager = self._by_proxy.get(proxy)
            if manager is None:
                options: dict[str, Any] = {
                    "num_pools": 8,
                    "maxsize": self._pool_size,
                    "block": False,
                    "retries": False,
                    "cert_reqs": "CERT_REQUIRED",
                    **ca_options(),
                }
                manager = (
                    urllib3.PoolManager(**options)
                    if proxy is None
                    else _proxy_manager(proxy, options)
                )
                self._by_proxy[proxy] = manager
            self._managers[key] = manager
        return manager

    @contextmanager
    def _request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        timeout: tuple[float, float],
        *,
        encoded: bool = False,
        body: bytes | None = None,
    ) -> Iterator[Response]:
        """A request whose body is read as needed; redirects are not followed (a presigned
        query must not travel to another host). `encoded`: the body may come compressed
        (gzip, deflate) and is read decoded; otherwise bytes are read as sent. Afterwards the
        connection goes back to the pool only if the body was read to the end (urllib3 gives
        it back then), else it is closed, as `requests` did: a body left unread may be a whole
        large object (a 200 to a ranged GET), or trickle."""
        wanted = {
            **self._headers,
            "Accept-Encoding": "gzip, deflate" if encoded else "identity",
            **(headers or {}),
        }
        try:
            response = self._manager(url).request(
                method,
                url,
                body=body,
                headers=wanted,
                timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
                retries=False,
                redirect=False,
                preload_content=False,
                decode_content=encoded,
            )
        except urllib3.exceptions.LocationValueError as exc:  # (not worth a retry)
            raise ProtocolError(f"{redact_url(url)}: not a URL to fetch ({exc})") from None
        try:
            yield response
        finally:
            response.close()
            response.release_conn()

    def close(self) -> None:
        with self._lock:
            managers = list(self._by_proxy.values())
            self._by_proxy, self._managers = {}, {}
        for manager in managers:
            manager.clear()

    def request_counts(self) -> dict[str, int]:
        """Requests sent so far, by kind (range, probe, api, document, redirect)."""
        with self._lock:
            return dict(self._requests)

    def _retry(
        self,
        url: str,
        deadline: float,
        attempt: Callable[[tuple[float, float]], T],
        kind: str,
    ) -> T:
        """The one retry loop: transient errors are retried with backoff until the deadline."""
        policy = self.policy
        # what the last failure was, not the exception itself: its traceback would keep the
        # failed attempt's frames, a range GET's whole buffer among them, through the backoff
        # and the next attempt
        why = "no attempt made"
        for number in range(policy.attempts):
            left = deadline - self._clock()
            if left <= 0:
                break
            timeout = (min(policy.connect_timeout, left), min(policy.read_timeout, left))
            with self._lock:
                self._requests[kind] += 1
            retry_after = 0.0
            try:
                return attempt(timeout)
            except DcorfsError as exc:
                if not exc.transient:
                    raise
                why = _why(exc)
                if isinstance(exc, TransientError):
                    retry_after = exc.retry_after
            except NETWORK_ERRORS as exc:
                why = _why(exc)
            delay = random.uniform(0, min(policy.max_delay, policy.base_delay * 2**number))
            delay = max(delay, retry_after)
            log.debug("%s: attempt %d failed (%s)", redact_url(url), number + 1, why)
            if number + 1 < policy.attempts:
                self._sleep(max(0.0, min(delay, deadline - self._clock())))
        if self._clock() >= deadline:
            message = f"{redact_url(url)}: no answer within the deadline ({why})"
            log.warning("%s", message)
            raise DeadlineExceeded(message)
        message = f"{redact_url(url)}: failed {policy.attempts} times ({why})"
        log.warning("%s", message)
        raise TransientError(message)

    def get_json(
        self,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        deadline: float,
    ) -> tuple[int, Any]:
        query = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}" if params else url

        def attempt(timeout: tuple[float, float]) -> tuple[int, Any]:
            with self._request("GET", query, headers, timeout, encoded=True) as response:
                status = response.status
                try:
                    body = json.loads(response.read())
                except ValueError:
                    body = _NOT_JSON
                if status == 500 and _internal_error(body):
                    return 500, body  # not busy: the action itself failed
                _raise_if_busy(response, url)
                if body is _NOT_JSON:
                    if status < 400:
                        raise TransientError(f"invalid JSON from {redact_url(url)}")
                    raise ProtocolError(f"HTTP {status} without JSON from {redact_url(url)}")
                return status, body

        return self._retry(url, deadline, attempt, "api")

    def get_document(self, url: str, *, deadline: float, kind: str = "document") -> bytes:
        """The body of a GET answered with 200 (an S3 listing, an object of the shared
        cache: `kind` counts it apart); 403/404 as for objects."""

        def attempt(timeout: tuple[float, float]) -> bytes:
            with self._request("GET", url, None, timeout, encoded=True) as response:
                _check_status(response, url)
                if response.status != 200:
                    raise ProtocolError(f"HTTP {response.status} from {redact_url(url)}")
                data: bytes = response.read(DOCUMENT_LIMIT + 1)
                if len(data) > DOCUMENT_LIMIT:
                    raise ProtocolError(
                        f"{redact_url(url)}: answer larger than {DOCUMENT_LIMIT} bytes"
                    )
                return data

        return self._retry(url, deadline, attempt, kind)

    def put(self, url: str, body: bytes, *, deadline: float, kind: str = "upload") -> None:
        """PUT `body` at `url` (a presigned S3 URL): 200/201/204, else raises; 403/404 as for
        objects, 5xx and 429 transient."""

        def attempt(timeout: tuple[float, float]) -> None:
            with self._request("PUT", url, None, timeout, body=body) as response:
                _check_object_status(response, url)
                if response.status not in (200, 201, 204):
                    raise ProtocolError(f"HTTP {response.status} to a PUT of {redact_url(url)}")

        self._retry(url, deadline, attempt, kind)

    def get_range(
        self,
        url: str,
        start: int,
        stop: int,
        *,
        expect_etag: str | None = None,
        expect_size: int | None = None,
        headers: Mapping[str, str] | None = None,
        deadline: float,
    ) -> memoryview:
        """Bytes [start, stop) of the object at `url`, as a read-only view of the one buffer
        they were read into."""
        if not 0 <= start < stop:
            raise ValueError(f"bad range [{start}, {stop})")

        def attempt(timeout: tuple[float, float]) -> memoryview:
            wanted = {**(headers or {}), "Range": f"bytes={start}-{stop - 1}"}
            with self._request("GET", url, wanted, timeout) as response:
                _check_object_status(response, url)
                if response.status != 206:
                    raise TransientError(f"HTTP {response.status} to a ranged GET")
                total = _total(response.headers.get("Content-Range"), start, stop)
                etag = _etag(response.headers.get("ETag"))
                if expect_etag is not None and etag != expect_etag:
                    raise ObjectChanged(
                        f"{redact_url(url)}: ETag {etag!r}, expected {expect_etag!r}"
                    )
                if expect_size is not None and total != expect_size:
                    raise ObjectChanged(f"{redact_url(url)}: size {total}, expected {expect_size}")
                return _read_body(response, stop - start)

        return self._retry(url, deadline, attempt, "range")

    def probe(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        head: int = 1,
        deadline: float,
    ) -> ObjectInfo:
        """Size and ETag by a ranged GET (presigned URLs are not valid for HEAD), which also
        brings the object's first `head` bytes (all of it when it is smaller)."""

        head = max(1, head)

        def attempt(timeout: tuple[float, float]) -> ObjectInfo:
            wanted = {**(headers or {}), "Range": f"bytes=0-{head - 1}"}
            with self._request("GET", url, wanted, timeout) as response:
                _check_object_status(response, url)
                data: bytes | memoryview = b""
                if response.status == 206:
                    stop = _range_stop(response.headers.get("Content-Range"))
                    size = _total(response.headers.get("Content-Range"), 0, stop)
                    if stop != min(head, size):
                        raise TransientError(f"a probe of {redact_url(url)} got a wrong range")
                    data = _read_body(response, stop)
                elif response.status == 200 and "Content-Length" in response.headers:
                    size = int(response.headers["Content-Length"])  # body not read: maybe huge
                else:
                    raise TransientError(f"HTTP {response.status} to a size probe")
                etag = _etag(response.headers.get("ETag"))
                if not etag:
                    raise ProtocolError(f"{redact_url(url)} has no ETag")
                return ObjectInfo(size=size, etag=etag, head=data)

        return self._retry(url, deadline, attempt, "probe")

    def redirect(
        self, url: str, *, headers: Mapping[str, str] | None = None, deadline: float
    ) -> str:
        """Where a download route points (the presigned object URL)."""

        def attempt(timeout: tuple[float, float]) -> str:
            with self._request("GET", url, headers, timeout) as response:
                _check_status(response, url)
                if response.status in (301, 302, 303, 307, 308):
                    return urljoin(url, response.headers.get("Location", ""))
                if response.status == 200:
                    return url
                raise ProtocolError(f"HTTP {response.status} from {redact_url(url)}")

        return self._retry(url, deadline, attempt, "redirect")


def _read_body(response: Response, length: int) -> memoryview:
    """Read exactly `length` bytes into one buffer (no joining of chunks), handed on as a
    read-only view of it: a copy into `bytes` would hold the range twice at once."""
    buffer = bytearray(length)
    view = memoryview(buffer)
    done = 0
    while done < length:
        # in pieces: urllib3's readinto reads into a temporary buffer of the size asked for
        n = response.readinto(view[done : done + READ_PIECE])
        if not n:
            raise TransientError(f"short body: {done} of {length} bytes")
        done += n
    if response.read(1):
        raise TransientError(f"body longer than the {length} bytes asked for")
    return view.toreadonly()


def _retry_after(response: Response) -> float:
    try:
        return min(float(response.headers.get("Retry-After", "0")), 30.0)
    except ValueError:
        return 0.0


# what urllib3's long connection messages come down to, for one-line errors
_REASONS = (
    (("Temporary failure in name resolution",), "name lookup failed (DNS)"),
    (("NameResolutionError", "Name or service not known", "Failed to resolve"), "unknown host"),
    (("Connection refused",), "connection refused"),
    (("Network is unreachable", "No route to host"), "network unreachable"),
    (("CERTIFICATE_VERIFY_FAILED",), "TLS certificate not trusted"),
)


def _why(exc: BaseException) -> str:
    # (urllib3's NewConnectionError is a ConnectTimeoutError too: a refusal is no timeout)
    timeout = (urllib3.exceptions.TimeoutError, socket.timeout)
    if isinstance(exc, timeout) and not isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "timed out"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, NETWORK_ERRORS):
        for needles, reason in _REASONS:
            if any(needle in text for needle in needles):
                return reason
    return _QUERY.sub("?…", text)[:200]  # urllib3's messages may quote a presigned URL
