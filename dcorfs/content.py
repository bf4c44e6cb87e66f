"""What a file of the tree holds: a size known up front and reads of any byte range.

`FileContent.read` may block (network, decoding) and runs in a worker thread; `peek` must not
block and returns the bytes only when they are at hand (served on the trio thread).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class FileContent(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int, *, deadline: float) -> bytes: ...

    def peek(self, offset: int, length: int) -> bytes | None: ...


class StaticContent:
    """Bytes made locally (README, JSON and text views)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int, *, deadline: float) -> bytes:
        return self._data[offset : offset + length]

    def peek(self, offset: int, length: int) -> bytes | None:
        return self._data[offset : offset + length]


class RowContent:
    """A local header followed by `count` rows of `row_bytes` each, made on demand.

    `rows(first, last, deadline)` returns the bytes of rows [first, last); a read of bytes
    [a, b) asks only for the rows it covers. The size is known without making any row.
    """

    def __init__(
        self,
        header: bytes,
        *,
        row_bytes: int,
        count: int,
        rows: Callable[[int, int, float], bytes],
    ) -> None:
        self._header = header
        self._row = row_bytes
        self._rows = rows
        self.size = len(header) + row_bytes * count

    def read(self, offset: int, length: int, *, deadline: float) -> bytes:
        stop = min(offset + length, self.size)
        if offset >= stop:
            return b""
        head = len(self._header)
        out = self._header[offset:stop] if offset < head else b""
        begin, end = max(offset, head) - head, stop - head
        if end > begin:
            first, last = begin // self._row, -(-end // self._row)
            data = self._rows(first, last, deadline)
            out += data[begin - first * self._row : end - first * self._row]
        return out

    def peek(self, offset: int, length: int) -> bytes | None:
        if offset + length <= len(self._header):
            return self._header[offset : offset + length]
        return None
