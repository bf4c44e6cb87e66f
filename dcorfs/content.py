"""What a file of the tree holds: a size known up front and reads of any byte range.

`FileContent.read` may block (network, decoding) and runs in a worker thread; `peek` must not
block and returns the bytes only when they are at hand (served on the trio thread).
"""

from __future__ import annotations

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
