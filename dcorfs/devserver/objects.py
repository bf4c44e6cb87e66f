"""The object store part of the devserver: addressing, presigned URLs, ranges, S3 errors.

DCOR keeps every artifact of a resource in the bucket of its circle (named by a configured
template, `circle-<org-id>` in production; doc/DCOR.md §10), path-style:
`/circle-<org-id>/{resource,condensed,preview}/<rid[:3]>/<rid[3:6]>/<rid[6:]>`. Objects of public
datasets are readable anonymously; the others only through presigned URLs. DCOR creates those
with boto3 against a custom endpoint, which gives SigV2 query strings
(`AWSAccessKeyId`, `Signature`, `Expires`), and rounds the expiry so that one URL is handed
out for a while (dcor_shared `s3.create_presigned_url`): we do the same.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode
from xml.sax.saxutils import escape

ARTIFACTS = ("resource", "condensed", "preview")
ACCESS_KEY_ID = "DCORDEVSERVER"


BUCKET_TEMPLATE = "circle-{organization_id}"  # DCOR's `dcor_object_store.bucket_name`


def bucket_name(circle_id: str, template: str = BUCKET_TEMPLATE) -> str:
    """dcor_shared `s3cc.py` ~184-188: the configured template with the circle's id."""
    return template.format(organization_id=circle_id)


def object_key(artifact: str, resource_id: str) -> str:
    return f"{artifact}/{resource_id[:3]}/{resource_id[3:6]}/{resource_id[6:]}"


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    path: Path
    size: int
    etag: str
    public: bool
    last_modified: float
    resource_id: str
    artifact: str


class S3Error(Exception):
    """An error the object store answers with an S3-style XML body."""

    def __init__(self, status: int, code: str, message: str, resource: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.resource = resource

    def xml(self, request_id: str) -> bytes:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.code}</Code><Message>{escape(self.message)}</Message>"
            f"<Resource>{escape(self.resource)}</Resource><RequestId>{request_id}</RequestId>"
            "</Error>"
        ).encode()


class Presigner:
    """Makes and checks presigned GET URLs for one secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def url(
        self,
        base_url: str,
        bucket: str,
        key: str,
        lifetime: float,
        *,
        filename: str | None = None,
        now: float | None = None,
    ) -> tuple[str, int]:
        """Return a presigned URL and its expiry (seconds since the epoch)."""
        now = time.time() if now is None else now
        wrap = 0.2 * lifetime
        rounded = round(now / wrap) * wrap if wrap > 0 else now
        expires = int(rounded + lifetime)
        params = []
        disposition = None
        if filename is not None:
            disposition = f"attachment; filename = {filename}"
            params.append(("response-content-disposition", disposition))
        signature = self._sign("GET", bucket, key, expires, disposition)
        params += [("AWSAccessKeyId", ACCESS_KEY_ID), ("Signature", signature)]
        params.append(("Expires", str(expires)))
        return f"{base_url}/{bucket}/{quote(key)}?{urlencode(params)}", expires

    def check(
        self,
        method: str,
        bucket: str,
        key: str,
        query: dict[str, str],
        now: float | None = None,
    ) -> bool:
        """True for a valid presigned request, False for an unsigned one; S3Error otherwise."""
        if not any(name in query for name in ("Signature", "AWSAccessKeyId", "Expires")):
            return False
        resource = f"/{bucket}/{key}"
        if query.get("AWSAccessKeyId") != ACCESS_KEY_ID:
            raise S3Error(
                403,
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.",
                resource,
            )
        try:
            expires = int(query.get("Expires", ""))
        except ValueError:
            raise S3Error(
                403, "AccessDenied", "Invalid date (should be seconds since epoch)", resource
            ) from None
        expected = self._sign(
            method, bucket, key, expires, query.get("response-content-disposition")
        )
        if not hmac.compare_digest(expected, query.get("Signature", "")):
            raise S3Error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
                resource,
            )
        if expires < (time.time() if now is None else now):
            raise S3Error(403, "AccessDenied", "Request has expired", resource)
        return True

    def _sign(
        self, method: str, bucket: str, key: str, expires: int, disposition: str | None
    ) -> str:
        canonical = f"/{bucket}/{key}"
        if disposition is not None:
            canonical += f"?response-content-disposition={disposition}"
        string_to_sign = f"{method}\n\n\n{expires}\n{canonical}"
        digest = hmac.new(self._secret, string_to_sign.encode(), hashlib.sha1).digest()
        return base64.b64encode(digest).decode()


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range [start, stop) a `Range` header asks for, or None for the whole object.

    As S3 does: syntactically invalid headers and multiple ranges are ignored (whole object),
    a start at or past the end raises RangeNotSatisfiable, an end past the end is clamped.
    """
    if not header or not header.startswith("bytes="):
        return None
    spec = header[len("bytes=") :].strip()
    if "," in spec or "-" not in spec:
        return None
    first, _, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    if not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    stop = size if last == "" else min(int(last) + 1, size)
    return start, stop
