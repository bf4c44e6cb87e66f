"""A resource's bytes as they are (non-RT-DC resources: .csv, .pdf, .ini …), read lazily."""

from __future__ import annotations

from ...cache.blockcache import BlockCache
from ...cache.identity import ObjectId
from ..content import Buffer


class ObjectContent:
    def __init__(self, cache: BlockCache, obj: ObjectId) -> None:
        self._cache = cache
        self._obj = obj
        self.size = obj.size

    def read(self, offset: int, length: int, *, deadline: float) -> Buffer:
        stop = min(offset + length, self.size)
        if offset >= stop:
            return b""
        return self._cache.read(self._obj, offset, stop, deadline=deadline)

    def read_pieces(self, offset: int, length: int, *, deadline: float) -> list[Buffer]:
        stop = min(offset + length, self.size)
        if offset >= stop:
            return [b""]
        return self._cache.read_pieces(self._obj, offset, stop, deadline=deadline)

    def peek(self, offset: int, length: int, *, disk: bool = False) -> Buffer | None:
        stop = min(offset + length, self.size)
        if offset >= stop:
            return b""
        return self._cache.peek(self._obj, offset, stop, disk=disk)
