"""One memory limit for a mount (`--memory-limit`), shared out among what holds bytes.

`MemoryPlan.of(limit)` divides the limit: the memory tier of remote blocks and of decoded
values (kept for reuse), the read-ahead windows of all open files, the bytes that fetches
and decodes hold while in flight (`InFlight`), and blocks queued for the disk cache
(`writebehind`); what is left is the daemon's own (Python,
NumPy, h5py and HDF5, the threads' stacks: `BASELINE`). Every part is bounded on its own and
none grows with the number of readers: a reader that would exceed the in-flight bound waits
until others are done (back-pressure), so 16 readers take as much memory as a few, only
longer; a failing link (retries, stalls) holds no more than a sound one. Measured figures:
doc/ARCHITECTURE.md, "Memory".
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import DeadlineExceeded

BASELINE = 110 << 20  # the daemon without cached bytes (measured: doc/ARCHITECTURE.md)
SMALLEST = 150 << 20  # a limit below this leaves too little to read a large file smoothly
SHARES = {  # of what the limit leaves above BASELINE
    "blocks": 0.25,  # remote blocks kept in memory (HDF5 structure, small files)
    "decoded": 0.10,  # decoded values kept in memory
    "prefetch": 0.25,  # read-ahead windows of all open files
    "fetching": 0.20,  # bytes of remote fetches in flight
    "decoding": 0.15,  # decoded values being made
    "writing": 0.05,  # blocks waiting to be written to the disk cache (`writebehind`)
}
# with a shared cache tier: pieces waiting to be uploaded to it, a share taken from read-ahead
UPLOADING = 0.10


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes each part of the daemon may hold (see the module's note)."""

    limit: int
    blocks: int
    decoded: int
    prefetch: int
    fetching: int
    decoding: int
    writing: int
    uploading: int = 0  # pieces waiting for the shared cache tier (`shared`)

    @classmethod
    def of(cls, limit: int, *, shared: bool = False) -> MemoryPlan:
        room = max(limit, SMALLEST) - BASELINE
        shares = {**SHARES, "prefetch": SHARES["prefetch"] - (UPLOADING if shared else 0.0)}
        parts = {name: int(room * share) for name, share in shares.items()}
        return cls(limit=limit, uploading=int(room * UPLOADING) if shared else 0, **parts)


class Budget:
    """Bytes that may be held at once, taken only when they fit now (`try_take`: never
    waits) and given back (`give`): read-ahead windows, uploads to the shared tier."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._peak = 0
        self._cond = threading.Condition()

    def _waiting(self) -> bool:
        """Whether someone waits for room (then `try_take` does not pass them)."""
        return False

    def try_take(self, n: int) -> bool:
        with self._cond:
            if self._waiting() or self._used + n > self.limit:
                return False
            self._used += n
            self._peak = max(self._peak, self._used)
            return True

    def give(self, n: int) -> None:
        with self._cond:
            self._used -= n
            assert self._used >= 0
            self._cond.notify_all()  # the next in line may fit now

    @property
    def used(self) -> int:
        return self._used

    @property
    def peak(self) -> int:
        return self._peak


class InFlight(Budget):
    """Bytes that work in flight may hold at once. `hold(n)` waits, in turn (first come,
    first served: a large holder is not passed over for good by a stream of small ones),
    until `n` more fit; a holder larger than the limit counts as the limit (it goes alone)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._waits = 0
        self._queue: collections.deque[object] = collections.deque()

    def _waiting(self) -> bool:
        return bool(self._queue)

    @contextmanager
    def hold(self, n: int, *, deadline: float, what: str) -> Iterator[None]:
        n = min(n, self.limit)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                if self._queue[0] is not ticket or self._used + n > self.limit:
                    self._waits += 1
                while self._queue[0] is not ticket or self._used + n > self.limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DeadlineExceeded(f"{what}: no memory free before the deadline")
                    self._cond.wait(remaining)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now
            self._used += n
            self._peak = max(self._peak, self._used)
        try:
            yield
        finally:
            self.give(n)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "used": self._used,
                "peak": self._peak,
                "limit": self.limit,
                "waits": self._waits,
            }
