"""Small writes to the disk store made behind the readers, by one thread of their own.

A block cache hands the blocks it made or fetched to `WriteBehind.put_many` once whoever
waits for them has them. A small put (at most `BEHIND_UP_TO` bytes: a scalar feature's
values, a small file, a piece of HDF5 structure) is queued, and written once no small put
came for `QUIET` seconds (or the queue is half full, or its oldest put waited `MAX_AGE`): a
reader of many small files (all scalar features of a resource, `numpy.load` one after
another) is not slowed by the checksums, writes and accounting of the values it reads, which
took three quarters of the time of warming each one (doc/ARCHITECTURE.md, "The cache"). A
large put (a stream's run of
decoded blocks) is written by its maker, as is a put that does not fit in the queue (at most
`limit` bytes, a share of the mount's memory limit, `cache.budget`): a stream's makers write
side by side, where one writer thread fell behind. A put told `behind` (an object's first
bytes fetched by its probe, which nobody waits to see written) is queued whatever its size,
where it fits.

Until a queued block is written `get` serves it from the queue, so it is never absent from
both. `flush` waits until what was queued before it is written; `close` writes everything
queued and stops the writer. A block the store cannot take (a full disk, an error), queued
or not, is lost to the cache only: its readers have it already (the failure is logged and
counted in `errors`; the writer thread never ends on one).

The writer also writes what the store's reads leave (`DiskStore.settle`: marks of use, the
erasure of damaged blocks) when it is due, woken by the store (`DiskStore.on_unsettled`) even
when no put comes.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import threading
import time

from .diskstore import DiskStore
from .identity import ObjectId
from .slots import Block, stretches

log = logging.getLogger(__name__)

BEHIND_UP_TO = 1 << 20  # puts up to this many bytes are queued; larger ones written at once
QUIET = 0.05  # seconds without a small put before the queue is written …
MAX_AGE = 1.0  # … or when its oldest put waited this long (other mounts of the dir see it)
CLOSE_WAIT = 30.0  # seconds a closing mount waits for the writer

_Key = tuple[ObjectId, int, int]  # object, block size, index
_Put = tuple[ObjectId, int, dict[int, bytes]]  # object, block size, blocks by index


class WriteBehind:
    """A `DiskStore` whose small writes are made by a background thread (see the module)."""

    def __init__(self, store: DiskStore, *, limit: int) -> None:
        self._store = store
        self.queue_limit = limit
        self._cond = threading.Condition()
        self._queue: collections.deque[_Put] = collections.deque()
        self._pending: dict[_Key, bytes] = {}
        self._queued = 0  # bytes queued or being written
        self._peak = 0
        self._last_put = 0.0  # when the last small put came
        self._oldest = 0.0  # … and the oldest one still queued
        self._puts = 0  # puts queued so far
        self._taken = 0  # … taken by the writer
        self._written = 0  # … and written (or given up)
        self._flush_to = 0  # puts a `flush` waits for
        self._failed = 0  # writes that failed
        self._closing = False
        store.on_unsettled = self._wake  # (reads leave the store something to settle)
        self._thread = threading.Thread(target=self._run, name="disk-writer", daemon=True)
        self._thread.start()

    # -- what a block cache uses of a store ------------------------------------------------------

    @property
    def errors(self) -> int:
        """The store's integrity errors and the writes that failed."""
        return self._store.errors + self._failed

    @property
    def limit(self) -> int:
        """The disk store's size bound."""
        return self._store.limit

    def usage(self) -> tuple[int, int]:
        return self._store.usage()

    def get(
        self,
        obj: ObjectId,
        index: int,
        *,
        block_size: int | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Block | None:
        """As `DiskStore.get`; a block still queued is served from the queue."""
        size = block_size or self._store.block_size
        with self._cond:
            data = self._pending.get((obj, size, index))
        if data is None:
            return self._store.get(obj, index, block_size=size, start=start, stop=stop)
        stop = len(data) if stop is None else min(stop, len(data))
        return data if (start, stop) == (0, len(data)) else data[start:stop]

    def get_run(
        self,
        obj: ObjectId,
        first: int,
        count: int,
        *,
        block_size: int | None = None,
        pooled: bool = False,
    ) -> list[Block | None]:
        """As `DiskStore.get_run`; blocks still queued are served from the queue, the
        stretches between them read from the store (a queued block's file is never read: its
        entry may be half written)."""
        size = block_size or self._store.block_size
        with self._cond:
            found: list[Block | None] = [
                self._pending.get((obj, size, first + n)) for n in range(count)
            ]
        for n, end in stretches([data is None for data in found]):
            found[n:end] = self._store.get_run(
                obj, first + n, end - n, block_size=size, pooled=pooled
            )
        return found

    def put_many(
        self,
        obj: ObjectId,
        blocks: dict[int, bytes],
        *,
        block_size: int | None = None,
        behind: bool = False,
    ) -> int:
        """Store blocks of one object: queued if small (or `behind`: whatever their size,
        blocks that no reader waits for the writing of) and there is room, else written
        now; returns how many were taken (a write that fails is logged and counted, not
        raised: the caller has the bytes)."""
        size = block_size or self._store.block_size
        n = sum(len(data) for data in blocks.values())
        with self._cond:
            small = 0 < n <= BEHIND_UP_TO
            fits = self._queued + n <= self.queue_limit
            # a small put also goes to an empty queue it does not fit (at most BEHIND_UP_TO
            # bytes over the limit); one told `behind`, whatever its size, only where it fits
            queued = (small and (fits or not self._queued)) or (behind and n > 0 and fits)
            if queued and not self._closing and self._thread.is_alive():
                now = time.monotonic()
                if not self._queue:
                    self._oldest = now
                for index, data in blocks.items():
                    self._pending[(obj, size, index)] = data
                self._queue.append((obj, size, dict(blocks)))
                self._queued += n
                self._puts += 1
                self._peak = max(self._peak, self._queued)
                self._last_put = now
                self._cond.notify_all()
                return len(blocks)
        return self._write(obj, size, blocks)

    def stats(self) -> dict[str, int]:
        """Bytes queued now and at most so far, and the bound."""
        with self._cond:
            return {"queued": self._queued, "peak": self._peak, "limit": self.queue_limit}

    def flush(self) -> None:
        """Wait until every block queued before this call is written (or given up)."""
        with self._cond:
            target = self._puts
            self._flush_to = max(self._flush_to, target)
            self._cond.notify_all()
            while self._written < target and self._thread.is_alive():
                self._cond.wait(0.5)

    def close(self) -> None:
        """Write what is queued, then stop the writer (the store itself stays open)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(CLOSE_WAIT)
        if self._thread.is_alive():
            log.warning("cache: writes still under way after %.0f s; not waited for", CLOSE_WAIT)

    # -- the writer ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._due() and self._store.settle_in() != 0.0:
                    self._sleep()
                if self._closing and not self._queue:
                    return  # nothing left (the store settles at its close)
                batch = []
                if self._closing or self._due():
                    batch = list(self._queue)
                    self._queue.clear()
                    self._taken += len(batch)
            self._settle()
            if not batch:
                continue
            try:
                for obj, size, blocks in batch:
                    self._write(obj, size, blocks)
            finally:  # (`_write` raises nothing; whatever happens, the queue is let go)
                with self._cond:
                    for obj, size, blocks in batch:
                        for index, data in blocks.items():
                            if self._pending.get((obj, size, index)) is data:
                                del self._pending[(obj, size, index)]
                            self._queued -= len(data)
                    self._written += len(batch)
                    self._cond.notify_all()

    def _due(self) -> bool:
        """Whether the queue is to be written now (holding the lock): small puts paused, or
        the queue half full, or its oldest put waited `MAX_AGE`, or a flush waits for it."""
        if not self._queue:
            return False
        now = time.monotonic()
        return (
            now - self._last_put >= QUIET
            or self._queued * 2 >= self.queue_limit
            or now - self._oldest >= MAX_AGE
            or self._flush_to > self._taken
        )

    def _sleep(self) -> None:
        """Sleep until the queue or the store's `settle` is due, or until woken (holding
        the lock): by a put, a close, or the store (`_wake`)."""
        due = [] if not self._queue else [min(self._last_put + QUIET, self._oldest + MAX_AGE)]
        settle = self._store.settle_in()
        if settle is not None:
            due.append(time.monotonic() + settle)
        self._cond.wait(max(0.001, min(due) - time.monotonic()) if due else None)

    def _wake(self) -> None:
        """The store's `settle` came due sooner (`DiskStore.on_unsettled`: a read's first
        mark of use, a full batch of them, a damaged block): the writer looks again."""
        with self._cond:
            self._cond.notify_all()

    def _settle(self) -> None:
        """The store's `settle`, when due (its failures are its own: logged, never raised)."""
        if self._store.settle_in() == 0.0:
            try:
                self._store.settle()
            except Exception:  # a bug: never the end of the writer
                log.exception("cache: marks of use and damaged blocks not settled")

    def _write(self, obj: ObjectId, size: int, blocks: dict[int, bytes]) -> int:
        """Blocks written to the store now; how many it took. A failure is lost to the cache
        only (its readers have the bytes): logged and counted in `errors`."""
        try:
            return self._store.put_many(obj, blocks, block_size=size)
        except (OSError, sqlite3.Error) as exc:
            log.warning("cache: %d blocks of %s not stored: %s", len(blocks), obj.key, exc)
        except Exception:  # a bug: never the end of the writer (nor of a read)
            log.exception("cache: %d blocks of %s not stored", len(blocks), obj.key)
        with self._cond:
            self._failed += 1
        return 0
