"""The disk store written behind the readers: by one thread, in batches.

Storing a block costs its SQLite transaction (admission and eviction, `DiskStore.put_objects`)
and its write into the object's file: a few milliseconds, more while other threads hold the
GIL, and nothing a reader needs before its answer: the bytes are in memory already. So
`WriteBehind.put_many` only queues the blocks; one writer thread stores everything queued in
one transaction, however many objects it spans, a moment (`GATHER`) after the first of them
was queued, once the reader that queued it has its answer. A queued block is served from the queue
(`get`) until it is on disk. The queue is bounded (`limit_bytes`; mostly the same bytes the
memory tier holds): a put that would exceed it waits for the writer (back-pressure). `close`
stores what is queued. After a crash, queued blocks are simply not cached (as after a crash
between a fetch and its write). Measured: doc/ARCHITECTURE.md, "The disk tier".
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from .diskstore import DiskStore, Put
from .identity import ObjectId

log = logging.getLogger(__name__)

PENDING_BYTES = 16 << 20  # queued for the disk at most
# seconds the writer lets a batch gather once woken: the reader that queued it is still being
# answered then, and does not share the CPU and the GIL with a write
GATHER = 0.01

Key = tuple[ObjectId, int, int]  # object, block size, index


class WriteBehind:
    def __init__(self, store: DiskStore, *, limit_bytes: int = PENDING_BYTES) -> None:
        self.store = store
        self._limit = limit_bytes
        self._queued: dict[Key, bytes] = {}
        self._bytes = 0
        self._writing = False  # the writer holds a batch taken from the queue
        self._counts = {"batches": 0, "blocks": 0, "waits": 0}
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="disk-writer", daemon=True)
        self._thread.start()

    # the store's figures, as BlockCache reads them
    @property
    def limit(self) -> int:
        return self.store.limit

    @property
    def errors(self) -> int:
        return self.store.errors

    def usage(self) -> tuple[int, int]:
        return self.store.usage()

    def get(
        self,
        obj: ObjectId,
        index: int,
        *,
        block_size: int | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> bytes | None:
        """As `DiskStore.get`; a block still queued is served from the queue."""
        size = block_size or self.store.block_size
        with self._changed:
            data = self._queued.get((obj, size, index))
        if data is not None:
            return data if (start, stop) in ((0, None), (0, len(data))) else data[start:stop]
        return self.store.get(obj, index, block_size=block_size, start=start, stop=stop)

    def put_many(
        self, obj: ObjectId, blocks: dict[int, bytes], *, block_size: int | None = None
    ) -> int:
        """Queue blocks of one object for the disk (waiting while the queue is full); returns
        how many were queued (none once closed)."""
        size = block_size or self.store.block_size
        nbytes = sum(len(data) for data in blocks.values())
        with self._changed:
            if self._bytes and self._bytes + nbytes > self._limit:
                self._counts["waits"] += 1
            while not self._closed and self._bytes and self._bytes + nbytes > self._limit:
                self._changed.wait()
            if self._closed:
                return 0
            for index, data in blocks.items():
                old = self._queued.pop((obj, size, index), None)
                self._bytes += len(data) - (len(old) if old is not None else 0)
                self._queued[(obj, size, index)] = data
            self._changed.notify_all()
        return len(blocks)

    def stats(self) -> dict[str, int]:
        """Blocks and bytes waiting for the disk, batches and blocks written, and how often a
        put waited for room (status.json's `disk_writes`)."""
        with self._changed:  # (a batch being written stays queued until it is on disk)
            return {
                "queued_blocks": len(self._queued),
                "queued_bytes": self._bytes,
                **self._counts,
            }

    def flush(self) -> None:
        """Return once everything queued before is on disk (or failed to be)."""
        with self._changed:
            while (self._queued or self._writing) and self._thread.is_alive():
                self._changed.wait()

    def close(self) -> None:
        """Store what is queued, then stop the writer (the store stays open)."""
        self.flush()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queued and not self._closed:
                    self._changed.wait()
                if not self._queued:
                    return
                # the answer goes out first; more may come meanwhile
                until = time.monotonic() + GATHER
                while not self._closed and self._bytes < self._limit // 2:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
                batch = dict(self._queued)
                self._writing = True
            try:
                self._write(batch)
                self._counts["batches"] += 1
                self._counts["blocks"] += len(batch)
            finally:
                with self._changed:
                    for key, data in batch.items():
                        if self._queued.get(key) is data:  # not queued again meanwhile
                            del self._queued[key]
                            self._bytes -= len(data)
                    self._writing = False
                    self._changed.notify_all()

    def _write(self, batch: dict[Key, bytes]) -> None:
        by_object: dict[tuple[ObjectId, int], dict[int, bytes]] = {}
        for (obj, size, index), data in batch.items():
            by_object.setdefault((obj, size), {})[index] = data
        puts: list[Put] = [(obj, blocks, size) for (obj, size), blocks in by_object.items()]
        try:
            self.store.put_objects(puts)
        except (OSError, sqlite3.Error) as exc:  # the blocks are not cached: refetched later
            log.warning("cache: %d blocks not stored: %s", len(batch), exc)
        except Exception:  # never the writer's end: the mount would wait for it
            log.exception("cache: %d blocks not stored", len(batch))


Store = DiskStore | WriteBehind  # what a BlockCache stores its blocks in
