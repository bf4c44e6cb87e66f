"""DCOR's S3 object store, read directly (the bypass of dcserv): addresses, signing, listing.

DCOR keeps every artifact of a resource in the bucket of its circle, path-style:
`{endpoint}/<bucket>/{resource,condensed}/<rid[:3]>/<rid[3:6]>/<rid[6:]>`, the bucket named by
the server's template (`circle-<org-id>` on DCOR: `dcserv.bucket_name`)
(`dcserv.resource_key`). The object's identity in the cache is that bucket/key and its ETag,
the same as on the dcserv path: blocks cached through either path serve the other.

Without credentials, requests are anonymous (DCOR: objects of public datasets only). With
credentials, every URL is presigned here with SigV4 by botocore's signer (the optional extra
`dcorfs[s3]`; no cryptography of our own), the same kind of URL dcserv hands out for private
data. So fetching, renewal before expiry and once more on 403, the one retry policy and the
redaction of query strings from messages are those of the dcserv path, unchanged. The secret
key stays in `S3Credentials` and botocore's signer: it is never in a URL (only the signature
and the access key id are), a message, a log or the cache.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import quote, urlencode
from xml.etree import ElementTree

from ..errors import ConfigError, ProtocolError
from ..settings import S3Credentials
from .http import Http, ObjectInfo

REGION = "us-east-1"  # what S3-compatible stores (DCOR's among them) accept for SigV4
URL_LIFETIME = 3600  # seconds a presigned URL made here is valid (renewed before it ends)
_SAFE = "-_.~"  # RFC 3986 unreserved characters: never percent-encoded


def object_url(endpoint: str, key: str) -> str:
    """The path-style URL of `bucket/key` (slashes kept, everything else not unreserved
    percent-encoded, as S3 expects)."""
    return f"{endpoint}/{quote(key, safe='/' + _SAFE)}"


@dataclass(frozen=True)
class Listed:
    """One object of a bucket listing (ListObjectsV2 `Contents`)."""

    key: str  # bucket/key, as the cache names objects
    size: int
    etag: str
    mtime: float


class Sign(Protocol):
    """Unsigned URL -> presigned URL, for a GET (or another `method`: the shared cache PUTs)."""

    def __call__(self, url: str, method: str = "GET") -> str: ...


def sigv4_presigner(credentials: S3Credentials) -> Sign:
    """A function presigning URLs with botocore's SigV4 query signer (payload unsigned)."""
    try:
        from botocore.auth import S3SigV4QueryAuth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
    except ImportError:
        raise ConfigError(
            "S3 credentials need botocore to sign requests: pip install 'dcorfs[s3]'"
        ) from None
    key_id, secret = credentials.reveal()
    signing = Credentials(key_id, secret)

    def presign(url: str, method: str = "GET") -> str:  # a signer per URL: it keeps state
        request = AWSRequest(method=method, url=url)
        S3SigV4QueryAuth(signing, "s3", REGION, expires=URL_LIFETIME).add_auth(request)
        return str(request.url)

    return presign


class ObjectStore:
    """One S3 endpoint, read anonymously or with presigned SigV4 URLs."""

    def __init__(self, *, http: Http, endpoint: str, sign: Sign | None = None) -> None:
        self._http = http
        self.endpoint = endpoint
        self._sign = sign

    @property
    def signed(self) -> bool:
        return self._sign is not None

    def url(self, key: str) -> tuple[str, float | None]:
        """A URL for GETs of `bucket/key` that works now, and how long (None: always)."""
        url = object_url(self.endpoint, key)
        if self._sign is None:
            return url, None
        return self._sign(url), float(URL_LIFETIME)

    def probe(self, key: str, *, head: int = 1, deadline: float) -> ObjectInfo:
        """Size and ETag of an object (a ranged GET; its first `head` bytes come along)."""
        return self._http.probe(self.url(key)[0], head=head, deadline=deadline)

    def list(
        self,
        bucket: str,
        prefix: str,
        *,
        max_keys: int | None = None,
        pages: int | None = None,
        deadline: float,
    ) -> list[Listed]:
        """The objects of `bucket` under `prefix` (ListObjectsV2, page by page): all of
        them, or those of the first `pages` pages of at most `max_keys` objects each."""
        found: list[Listed] = []
        token: str | None = None
        for _ in itertools.count() if pages is None else range(pages):
            params = [("list-type", "2"), ("prefix", prefix)]
            if max_keys is not None:
                params.append(("max-keys", str(max_keys)))
            if token is not None:
                params.append(("continuation-token", token))
            query = urlencode(params, quote_via=quote, safe=_SAFE)
            url = f"{object_url(self.endpoint, bucket)}?{query}"
            if self._sign is not None:
                url = self._sign(url)
            page, token = parse_listing(bucket, self._http.get_document(url, deadline=deadline))
            found.extend(page)
            if token is None:
                break
        return found


def _tag(element: Any) -> str:
    return str(element.tag).rsplit("}", 1)[-1]  # without the namespace


def _child(element: Any, name: str) -> str | None:
    for child in element:
        if _tag(child) == name:
            return str(child.text or "")
    return None


def _timestamp(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def parse_listing(bucket: str, body: bytes) -> tuple[list[Listed], str | None]:
    """The objects of one ListObjectsV2 page, and the continuation token (None: last page)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        raise ProtocolError(f"bucket {bucket}: the listing is not XML") from None
    if _tag(root) != "ListBucketResult":
        raise ProtocolError(f"bucket {bucket}: not a listing ({_tag(root)})")
    found = []
    for entry in root:
        if _tag(entry) != "Contents":
            continue
        key, size, etag = _child(entry, "Key"), _child(entry, "Size"), _child(entry, "ETag")
        try:
            if not key or size is None or not etag:
                raise ValueError
            listed = Listed(
                key=f"{bucket}/{key}",
                size=int(size),
                etag=etag.strip().strip('"'),
                mtime=_timestamp(_child(entry, "LastModified")),
            )
        except ValueError:
            raise ProtocolError(
                f"bucket {bucket}: a listing entry without key, size or ETag"
            ) from None
        found.append(listed)
    if (_child(root, "IsTruncated") or "").strip().lower() != "true":
        return found, None
    token = _child(root, "NextContinuationToken")
    if not token:
        raise ProtocolError(f"bucket {bucket}: a truncated listing without continuation token")
    return found, token
