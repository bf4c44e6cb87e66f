"""What a file of the tree holds: a size known up front and reads of any byte range.

`FileContent.read` may block (network, decoding) and runs in a worker thread; `peek` must not
block and returns the bytes only when they are at hand (served on the trio thread), possibly
as a view of bytes kept elsewhere (`Buffer`: the FUSE reply copies them once, into the kernel).
`peek(…, disk=True)` counts the local disk cache as at hand too: it may read it (a short,
blocking read of a local file), but never waits for the network, for decoding or for another
thread's work (doc/ARCHITECTURE.md, "Speed": warm reads on the FUSE thread).
`read_pieces` is `read` for large ranges (read-ahead windows): the same bytes as a list of
pieces, for contents that can give them without joining them first (`Pieced`; one large
join copies more bytes than fit in the CPU's caches, measured 2.5 GB/s for 16 MiB here).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from ..cache.slots import Block

Buffer = Block  # bytes, or a read-only view of bytes held elsewhere


class FileContent(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int, *, deadline: float) -> Buffer: ...

    def peek(self, offset: int, length: int, *, disk: bool = False) -> Buffer | None: ...


@runtime_checkable
class Pieced(Protocol):
    def read_pieces(self, offset: int, length: int, *, deadline: float) -> list[Buffer]: ...


def read_pieces(content: FileContent, offset: int, length: int, *, deadline: float) -> list[Buffer]:
    """`content.read(offset, length)` as pieces that, joined, are the same bytes."""
    if isinstance(content, Pieced):
        return content.read_pieces(offset, length, deadline=deadline)
    return [content.read(offset, length, deadline=deadline)]


class StaticContent:
    """Bytes made locally (README, JSON and text views)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int, *, deadline: float) -> bytes:
        return self._data[offset : offset + length]

    def peek(self, offset: int, length: int, *, disk: bool = False) -> bytes | None:
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

    def peek(self, offset: int, length: int, *, disk: bool = False) -> bytes | None:
        if min(offset + length, self.size) <= len(self._header):
            return self._header[offset : offset + length]
        return None


class PartsContent:
    """A file made of parts at fixed offsets; bytes no part covers read as zeros.

    `parts` are (offset, content) pairs that do not overlap. A read asks each part only for
    the bytes it covers; `peek` answers when every part it touches can answer at once.
    """

    def __init__(self, size: int, parts: list[tuple[int, FileContent]]) -> None:
        self.size = size
        self._parts = sorted(parts, key=lambda part: part[0])
        self._starts = [offset for offset, _ in self._parts]

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, FileContent | None]]:
        """(offset within the part, length, part or None for zeros) covering the range."""
        pos, stop = offset, min(offset + length, self.size)
        i = max(0, bisect.bisect_right(self._starts, pos) - 1)
        while pos < stop:
            while i < len(self._parts) and self._starts[i] + self._parts[i][1].size <= pos:
                i += 1
            if i == len(self._parts) or self._starts[i] >= stop:
                yield 0, stop - pos, None
                return
            start, part = self._parts[i]
            if start > pos:
                yield 0, start - pos, None
                pos = start
            end = min(start + part.size, stop)
            yield pos - start, end - pos, part
            pos = end

    def read(self, offset: int, length: int, *, deadline: float) -> Buffer:
        pieces = self.read_pieces(offset, length, deadline=deadline)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_pieces(self, offset: int, length: int, *, deadline: float) -> list[Buffer]:
        pieces: list[Buffer] = []
        for at, n, part in self._pieces(offset, length):
            if part is None:
                pieces.append(bytes(n))
            else:
                pieces += read_pieces(part, at, n, deadline=deadline)
        return pieces or [b""]

    def peek(self, offset: int, length: int, *, disk: bool = False) -> Buffer | None:
        pieces: list[Buffer] = []
        for at, n, part in self._pieces(offset, length):
            data = bytes(n) if part is None else part.peek(at, n, disk=disk)
            if data is None:
                return None
            pieces.append(data)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)
