"""Object identity: which remote object, in which version, every layer's bytes belong to.

Blocks on disk, decoded values, remembered features and the shared structures of synthesized
files are all keyed by an `ObjectId` (never by a URL): the object's bucket/key and its ETag,
so bytes of one version are never served for another, and the same object read by any route
(dcserv's URLs, `--s3-endpoint`, `--s3-only`) shares one cache (doc/ARCHITECTURE.md, "The cache").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectId:
    """A remote object's identity and version: bucket/key, ETag, size; and the size of its
    blocks in the caches where it is not theirs (0): a derived object's blocks hold whole
    chunks of what it is decoded from (`cache.derived`), part of what its ETag digests."""

    key: str
    etag: str
    size: int
    block_size: int = 0

    @property
    def identity(self) -> bytes:
        return hashlib.sha256(f"{self.key}\0{self.etag}".encode()).digest()
