"""Page-aligned buffers, used again and again, for runs of blocks read past the page cache.

A run of a stream's blocks read from the disk cache (`slots.read_run`) through the page cache
costs the kernel twice: it fills fresh page-cache pages with the cache file's bytes, then
copies them into the reader's buffers, themselves fresh memory for each run. Read with
`O_DIRECT` into a buffer that earlier runs already touched, the disk's bytes land in the
buffer directly. Re-reading `image.npy` of 100,000 events (2 GB) from the disk cache this way
took the daemon 0.8–1.1 s of system time instead of 2.7–3.9 s, and ran at 1.01–1.40 GB/s
instead of 0.54–0.74 (doc/ARCHITECTURE.md, "Speed").

A run's blocks are views of its buffer, so a buffer is handed out again only once nothing
refers to it: each buffer is a NumPy array owning its memory, and every view of it (a
block's array, a memoryview of one, a slice of that) holds a reference to that owner, at the
end of a chain of `base`s (NumPy collapses the chain only between arrays of one type; the
`Pooled` view is of another), so the owner's reference count says exactly whether any view is
alive (`_unused`; CPython's counts, with the GIL). A buffer in use is never written. When
every buffer is in use (a reader holding windows) `take` gives None and the caller reads as
without this pool, into buffers of their own. At most `spare` unused buffers are kept when one
is taken, and none once the owner calls `trim` (the disk store's writer thread does, 5 s after
the first run read into them and every 5 s while some are in use). Buffers in use hold the
windows of streams, which the read-ahead share of the memory limit counts; `most` (4) is what
the windows of one stream at the default limit take at once (measured: 3, 4 and 6 were not
told apart in speed; 6 with two kept unused peaked 20 MB higher).
"""

from __future__ import annotations

import errno
import os
import sys
import threading

import numpy as np

ALIGN = 4096  # O_DIRECT: buffer addresses, offsets and lengths in multiples of this


class Pooled(np.ndarray):
    """A view of a pool's buffer (a block read into it): marks bytes not to keep for long
    (`pooled`), since they hold the whole buffer from being used again."""


def pooled(data: object) -> bool:
    """Whether `data` (a block: bytes, or a memoryview of an array) lies in a pool's buffer."""
    return isinstance(data, memoryview) and isinstance(data.obj, Pooled)


class RunBuffers:
    """Up to `most` buffers of `size` bytes each (page-aligned), at most `spare` of them kept
    while unused."""

    def __init__(self, size: int, *, most: int = 4, spare: int = 1) -> None:
        self.size = -(-size // ALIGN) * ALIGN
        self._most, self._spare = most, spare
        self._owners: list[np.ndarray] = []  # each buffer's owning array (ALIGN bytes more)
        self._lock = threading.Lock()
        self._runs = self._none_free = 0  # runs read into a buffer; times every one was in use
        self.refused = False  # a read past the page cache was refused (EINVAL): none again

    def take(self, n: int) -> Pooled | None:
        """A page-aligned buffer of `n` bytes (at most `size`) that nothing refers to, as a
        writable `Pooled` view (the caller's reference marks it in use); None when `n` is too
        large or every buffer is in use."""
        if n > self.size:
            return None
        with self._lock:
            self._keep_unused(1 + self._spare)  # (`spare` besides the one taken now)
            # (by index: a name bound to an owner while its references are counted is one)
            index = next((i for i in range(len(self._owners)) if _unused(self._owners, i)), None)
            if index is None and len(self._owners) < self._most:
                self._owners.append(np.empty(self.size + ALIGN, dtype=np.uint8))
                index = len(self._owners) - 1
            if index is None:
                self._none_free += 1
                return None
            owner = self._owners[index]
            start = -owner.__array_interface__["data"][0] % ALIGN
            return owner[start : start + n].view(Pooled)  # (refers to the owner)

    def read(self, fd: int, offset: int, n: int) -> tuple[Pooled, int] | None:
        """`n` bytes (a multiple of ALIGN) from `offset` (aligned) of `fd`, opened with
        O_DIRECT, into a free buffer: (the buffer, the bytes read: fewer where the file ends).
        None where no buffer is free or the read is refused (then `refused`, for EINVAL)."""
        buffer = self.take(n)
        if buffer is None:
            return None
        got = 0
        try:
            with buffer.data as view:
                while got < n:
                    part = os.preadv(fd, [view[got:]], offset + got)
                    got += part
                    if part == 0 or got % ALIGN:
                        break  # the file ends here
        except OSError as exc:  # (EINVAL: a filesystem that refuses O_DIRECT reads after all)
            self.refused = self.refused or exc.errno == errno.EINVAL
            return None
        with self._lock:
            self._runs += 1
        return buffer, got

    def trim(self) -> None:
        """Let every buffer nothing refers to go (their memory back to the system)."""
        with self._lock:
            self._keep_unused(0)

    def _keep_unused(self, most: int) -> None:
        """Keep at most `most` of the buffers nothing refers to, the first ones (lock held)."""
        unused = [i for i in range(len(self._owners)) if _unused(self._owners, i)]
        drop = set(unused[most:])
        self._owners = [owner for i, owner in enumerate(self._owners) if i not in drop]

    def stats(self) -> dict[str, int]:
        """Buffers kept, those in use now, runs read into them, times none was free."""
        with self._lock:
            in_use = sum(not _unused(self._owners, i) for i in range(len(self._owners)))
            return {
                "buffers": len(self._owners),
                "in_use": in_use,
                "runs": self._runs,
                "none_free": self._none_free,
            }

    def __len__(self) -> int:
        """Buffers made and kept (in use or not)."""
        return len(self._owners)


def _unused(owners: list[np.ndarray], index: int) -> bool:
    """Whether only the list refers to `owners[index]` (`getrefcount` counts its own argument
    too): no view of it is alive anywhere."""
    return sys.getrefcount(owners[index]) <= 2
