"""The DCOR client: CKAN actions, dcserv queries, basins, and where each object's bytes are.

Owns the API token: it goes into the `Authorization` header of requests to the DCOR host only
(API calls and download routes), never to object-store URLs, which are public or presigned.
`Locator` maps an object's identity (bucket/key) to a URL that works now, renewing presigned
URLs before they expire and once more when the store answers 403.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..errors import (
    AccessDenied,
    DcorfsError,
    Moved,
    NotFound,
    ProtocolError,
    ServerError,
    redact_url,
)
from ..settings import Token
from .http import Http

log = logging.getLogger(__name__)

RENEW_MARGIN = 60.0  # renew a presigned URL this many seconds before it expires


@dataclass(frozen=True)
class Basin:
    """One entry of dcserv's `basins`: the resource or its condensed file, as an object URL."""

    kind: str  # "resource" or "condensed"
    url: str
    key: str  # object identity: "<bucket>/<key>" (the URL's path), never the expiring URL
    features: tuple[str, ...] | None
    lifetime: float | None  # seconds the URL stays valid after it was handed out; None: forever


def object_key(url: str) -> str:
    """The identity of an object from any URL to it (path-style: /bucket/key, query dropped)."""
    path = urlsplit(url).path.lstrip("/")
    if "/" not in path:
        raise ProtocolError(f"not an object URL: {redact_url(url)}")
    return path


BUCKET_TEMPLATE = "circle-{organization_id}"  # DCOR's production `dcor_object_store.bucket_name`


def bucket_name(circle_id: str, template: str = BUCKET_TEMPLATE) -> str:
    """A circle's bucket: the server's template (dcor_shared `s3cc.py` ~184-188, dcor_schemas
    `plugin.py` ~176-179) filled with the circle (organization) id (doc/DCOR.md §10)."""
    return template.format(organization_id=circle_id)


def bucket_circle(bucket: str, template: str = BUCKET_TEMPLATE) -> str | None:
    """The circle id a bucket name was made from with `template`; None for other names."""
    prefix, _, suffix = template.partition("{organization_id}")
    if len(bucket) <= len(prefix) + len(suffix) or not bucket.startswith(prefix):
        return None
    if not bucket.endswith(suffix):
        return None
    return bucket[len(prefix) : len(bucket) - len(suffix)]


def resource_key(
    circle_id: str, resource_id: str, artifact: str = "resource", template: str = BUCKET_TEMPLATE
) -> str:
    """DCOR's object layout: <bucket>/<artifact>/<rid[:3]>/<rid[3:6]>/<rid[6:]>."""
    rid = resource_id
    return f"{bucket_name(circle_id, template)}/{artifact}/{rid[:3]}/{rid[3:6]}/{rid[6:]}"


_RESOURCE_KEY = re.compile(
    r"^[^/:]+/(?P<artifact>resource|condensed|preview)/(?P<a>[^/]{3})/(?P<b>[^/]{3})/(?P<c>[^/]+)$"
)


def parse_resource_key(key: str) -> tuple[str, str] | None:
    """(resource id, artifact) of a key in DCOR's object layout, in any bucket; None for
    other keys."""
    match = _RESOURCE_KEY.match(key)
    if match is None:
        return None
    return match["a"] + match["b"] + match["c"], match["artifact"]


class DcorApi:
    """CKAN's action API of one DCOR host, with its envelope and errors (doc/DCOR.md, "The
    calls")."""

    def __init__(self, *, http: Http, base_url: str, token: Token | None) -> None:
        self._http = http
        self.base_url = base_url
        self._token = token

    @property
    def authenticated(self) -> bool:
        return self._token is not None

    def auth_headers(self) -> dict[str, str]:
        """Headers for requests to the DCOR host itself (never for object URLs)."""
        return {"Authorization": self._token.reveal()} if self._token else {}

    def action(self, name: str, params: Mapping[str, str], *, deadline: float) -> Any:
        url = f"{self.base_url}/api/3/action/{name}"
        status, body = self._http.get_json(
            url, params=params, headers=self.auth_headers(), deadline=deadline
        )
        if isinstance(body, dict) and body.get("success") is True and "result" in body:
            return body["result"]
        message = _error_message(body)
        what = f"{name}({', '.join(f'{k}={v}' for k, v in params.items() if k != 'q')})"
        if status == 403:
            raise AccessDenied(f"{what}: {message}")
        if status == 404:
            raise NotFound(f"{what}: {message}")
        if status == 409 and "must be an .rtdc dataset" in message:
            raise NotFound(f"{what}: {message}")
        if status == 500:
            raise ServerError(f"{what}: HTTP 500: {message}")
        raise ProtocolError(f"{what}: HTTP {status}: {message}")

    def token_user(self, *, deadline: float) -> str | None:
        """The name of the token's user, None when the host takes the token for anonymous:
        CKAN treats a wrong or expired token so, silently, and `user_show` without an id is
        what anonymous callers are refused (404, or 403 without public user details) while
        any logged-in user gets their own account (doc/DCOR.md §9)."""
        try:
            result = self.action("user_show", {}, deadline=deadline)
        except (NotFound, AccessDenied):
            return None
        name = result.get("name") if isinstance(result, dict) else None
        if not isinstance(name, str) or not name:
            raise ProtocolError("user_show: an account without a name")
        return name

    def dcserv(self, resource_id: str, query: str, *, deadline: float) -> Any:
        return self.action(
            "dcserv", {"id": resource_id, "query": query, "version": "2"}, deadline=deadline
        )

    def basins(self, resource_id: str, *, deadline: float) -> list[Basin]:
        return parse_basins(self.dcserv(resource_id, "basins", deadline=deadline))

    def route(self, dataset_id: str, resource_id: str, name: str) -> str:
        """DCOR's download route of a resource."""
        return f"{self.base_url}/dataset/{dataset_id}/resource/{resource_id}/download/{name}"

    def download_url(self, dataset_id: str, resource_id: str, name: str, *, deadline: float) -> str:
        """Follow DCOR's download route (with the token) to the presigned object URL."""
        route = self.route(dataset_id, resource_id, name)
        return self._http.redirect(route, headers=self.auth_headers(), deadline=deadline)


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error.get("__type") or error)[:300]
        return str(error)[:300]
    return str(body)[:300]


def _is_object_basin(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("format") == "http"
        and isinstance(entry.get("urls"), list)
        and bool(entry["urls"])
    )


def parse_basins(answer: Any) -> list[Basin]:
    """The object basins (format http) of dcserv's `basins` answer."""
    if not isinstance(answer, list):
        raise ProtocolError("dcserv basins: expected a list")
    return [parse_basin(entry) for entry in answer if _is_object_basin(entry)]


def parse_basin(entry: dict[str, Any]) -> Basin:
    name = str(entry.get("name", ""))
    kind = "condensed" if name.startswith("condensed") else "resource"
    url = str(entry["urls"][0])
    features = entry.get("features")
    lifetime: float | None = None
    if entry.get("perishable"):
        try:
            lifetime = float(entry["time_expiration"]) - float(entry["time_request"])
        except (KeyError, TypeError, ValueError):
            lifetime = 600.0  # an older server: assume a short life, renew on 403 anyway
    return Basin(
        kind=kind,
        url=url,
        key=object_key(url),
        features=tuple(str(f) for f in features) if isinstance(features, list) else None,
        lifetime=lifetime,
    )


Renew = Callable[[float], tuple[str, float | None]]  # deadline -> (url, lifetime or None)


@dataclass
class _Entry:
    url: str
    valid_until: float | None
    renew: Renew | None
    headers: Mapping[str, str] | None = None


class Locator:
    """Object identity → a URL that works now; renews presigned URLs before they expire.

    Thread-safe. A renewal runs outside the lock; two threads renewing one key at once both
    ask the server, which hands out the same URL within its rounding window (harmless).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def register(
        self,
        key: str,
        url: str,
        *,
        lifetime: float | None,
        renew: Renew | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """`headers`: sent with every request to `url` — the token, for URLs on the DCOR host
        only (its download route serving a file itself: doc/DCOR.md §6)."""
        valid = None
        if lifetime is not None:  # renew a quarter of the life early, at most RENEW_MARGIN
            valid = self._clock() + lifetime - min(RENEW_MARGIN, max(lifetime, 0.0) / 4)
        with self._lock:
            self._entries[key] = _Entry(url, valid, renew, headers)

    def headers(self, key: str) -> Mapping[str, str] | None:
        with self._lock:
            entry = self._entries.get(key)
        return entry.headers if entry is not None else None

    def known(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def url(self, key: str, *, deadline: float) -> str:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            raise NotFound(f"no URL known for object {key}")
        if entry.valid_until is not None and self._clock() >= entry.valid_until:
            return self.renew(key, deadline=deadline)
        return entry.url

    def renew(self, key: str, *, deadline: float, cause: DcorfsError | None = None) -> str:
        """A new URL for `key` (after `cause`, the error its URL met); `cause` again, or
        AccessDenied, when the URL has no way to be renewed."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or entry.renew is None:
            if isinstance(cause, Moved):
                raise cause
            raise AccessDenied(f"object {key} is not accessible (URL cannot be renewed)")
        url, lifetime = entry.renew(deadline)
        log.debug("renewed the URL of %s", key)
        self.register(key, url, lifetime=lifetime, renew=entry.renew, headers=entry.headers)
        return url


class ObjectRef(Protocol):
    """What the fetcher needs of an object: identity, version and size (the cache's ObjectId)."""

    @property
    def key(self) -> str: ...
    @property
    def etag(self) -> str: ...
    @property
    def size(self) -> int: ...


def make_fetch(http: Http, locator: Locator) -> Callable[[ObjectRef, int, int, float], memoryview]:
    """The block cache's fetcher: range GET of an object, renewing its URL once on 403."""

    def fetch(obj: ObjectRef, start: int, stop: int, deadline: float) -> memoryview:
        headers = locator.headers(obj.key)

        def get(url: str) -> memoryview:
            return http.get_range(
                url,
                start,
                stop,
                expect_etag=obj.etag,
                expect_size=obj.size,
                headers=headers,
                deadline=deadline,
            )

        try:
            return get(locator.url(obj.key, deadline=deadline))
        except (AccessDenied, Moved) as exc:
            url = locator.renew(obj.key, deadline=deadline, cause=exc)
        try:
            return get(url)
        except DcorfsError as exc:
            raise type(exc)(f"{obj.key} [{start}, {stop}): {exc}") from None

    return fetch
