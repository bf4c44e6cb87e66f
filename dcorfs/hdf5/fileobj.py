"""The seekable part of the file objects h5py reads through (`RemoteFile`, the skeleton buffer)."""

from __future__ import annotations

import io


class SeekableFile(io.RawIOBase):
    """A readable, seekable raw file of `end()` bytes; subclasses add `readinto` (and `write`)."""

    def __init__(self) -> None:
        super().__init__()
        self._pos = 0

    def end(self) -> int:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.end()}[whence]
        self._pos = max(0, base + offset)
        return self._pos
