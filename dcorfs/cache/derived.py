"""Bytes computed from remote objects (decoded feature data), cached like remote objects.

A derived object is named like a remote one, `ObjectId(key, etag, size, block_size)`: its key is the
source object's key plus `#` and what was computed (`<source key>#rows/deform`), its ETag a
digest of everything the bytes depend on (the source's key, ETag and size, what was computed,
the dtype and shape, the block size and `VERSION`). So a derived block can only ever be served
for the very source version and computation it was made from; a new source ETag or a change
of the code (bump `VERSION`) names other blocks. Its block size is its own (`ObjectId.block_size`,
e.g. whole HDF5 chunks of decoded values, `cache.prefetch.decoded_block`).

`DerivedCache` is a `BlockCache` whose fetch computes instead of downloading: it shares the
disk store of the remote blocks (the same checksummed files, atomic writes, size bound and LRU
eviction, and the same sharing between processes), with blocks of its own size. What computes
an object's bytes is registered when a resource is opened (`register`); a warm read of blocks
already on disk never calls it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence

from ..errors import ProtocolError
from .blockcache import BlockCache
from .budget import InFlight
from .diskstore import DiskStore
from .identity import ObjectId
from .writebehind import WriteBehind

SEPARATOR = "#"
VERSION = 1  # bump when the bytes of any derived object change for the same inputs

# (start, stop, deadline) -> bytes [start, stop) (or a view of them: the cache copies blocks out)
Make = Callable[[int, int, float], bytes | memoryview]


def derived_id(
    source: ObjectId, what: str, size: int, *, facts: Sequence[object], block_size: int
) -> ObjectId:
    """The identity of `what` computed from `source`: `size` bytes, depending on `facts`
    (e.g. dtype and shape) besides the source's version."""
    described = repr((VERSION, source.key, source.etag, source.size, what, size, block_size))
    described += repr(tuple(facts))
    digest = hashlib.sha256(described.encode()).hexdigest()
    return ObjectId(
        key=f"{source.key}{SEPARATOR}{what}", etag=digest, size=size, block_size=block_size
    )


def source_key(key: str) -> str:
    """The key of the object a (derived or remote) object's bytes come from."""
    return key.split(SEPARATOR, 1)[0]


def is_derived(key: str) -> bool:
    return SEPARATOR in key


class DerivedCache(BlockCache):
    """Derived objects: memory over the shared disk store, computed on a miss."""

    def __init__(
        self,
        *,
        store: DiskStore | WriteBehind | None,
        block_size: int = 1 << 20,
        memory_bytes: int = 32 << 20,
        max_fetch_bytes: int = 8 << 20,
        parallel: int = 4,
        in_flight: InFlight | None = None,
    ) -> None:
        self._makers: dict[ObjectId, Make] = {}
        self._makers_lock = threading.Lock()
        super().__init__(
            fetch=self._make,
            store=store,
            block_size=block_size,
            memory_bytes=memory_bytes,
            max_fetch_bytes=max_fetch_bytes,
            parallel=parallel,
            in_flight=in_flight,
        )

    def register(self, obj: ObjectId, make: Make) -> None:
        with self._makers_lock:
            self._makers.setdefault(obj, make)

    def _make(self, obj: ObjectId, start: int, stop: int, deadline: float) -> bytes | memoryview:
        with self._makers_lock:
            make = self._makers.get(obj)
        if make is None:
            raise ProtocolError(f"nothing makes {obj.key} (not registered)")
        return make(start, stop, deadline)
