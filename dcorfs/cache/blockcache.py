"""The block cache: (object identity + ETag, block index) → bytes, memory over disk.

Objects are split into fixed blocks: the cache's size (1 MiB by default), or the object's
own (`ObjectId.block_size`: decoded values in blocks of whole HDF5 chunks). `read` serves a
byte range from the memory LRU, then the disk store, and fetches what is missing: adjacent
missing blocks in one range request (up to `max_fetch_bytes`), separate runs as parallel
requests (up to `parallel` at once). Concurrent misses on one block make one fetch.

Design note (concurrency): one lock guards the LRU and the table of in-flight fetches and is
never held during I/O. The thread that finds a block missing and not in flight becomes its
owner: it registers a `_Flight` for every block of its run, fetches, stores, and then sets
each flight's event. Other threads wanting those blocks wait on the event (bounded by their
deadline) and read the result from the flight; an error is handed to the waiters but never
stored, so the next read tries again.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from ..errors import DcorfsError, DeadlineExceeded, ProtocolError
from .budget import InFlight
from .diskstore import DiskStore
from .identity import ObjectId
from .prefetch import DISK_PARTS_FROM, DISK_RUN
from .runbuffers import pooled
from .slots import Block
from .writebehind import WriteBehind

__all__ = ["BlockCache", "CacheStats", "Fetch"]
log = logging.getLogger(__name__)

Fetch = Callable[[ObjectId, int, int, float], bytes | memoryview]  # a view: blocks are copied out
BlockKey = tuple[ObjectId, int]
_In = TypeVar("_In")
_Out = TypeVar("_Out")
PASSING_SHARE = 4  # passing blocks hold at most this part of the memory tier (see `ensure`)
# runs of blocks one read fetches at once: the HDF5 object headers of a large original come in
# batches of tens of small ranges (`RtdcSource._fetch_headers`); 16 instead of 8 opened the
# image.npy of a 100,000-event original in ~0.49 s instead of ~0.61 s (20 ms a request)
PARALLEL = 16
PARTS_AT_MOST = 2  # reads over this many blocks are served in whole blocks (see `_parts`)


@dataclass(frozen=True)
class CacheStats:
    memory_hits: int
    disk_hits: int
    misses: int
    fetches: int
    fetched_bytes: int
    served_bytes: int
    in_flight: int
    memory_bytes: int
    disk_bytes: int
    disk_limit: int
    errors: int


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: Block | None = None
        self.error: BaseException | None = None


class BlockCache:
    def __init__(
        self,
        *,
        fetch: Fetch,
        store: DiskStore | WriteBehind | None,
        block_size: int = 1 << 20,
        memory_bytes: int = 128 << 20,
        max_fetch_bytes: int = 8 << 20,
        parallel: int = PARALLEL,
        in_flight: InFlight | None = None,
    ) -> None:
        """`in_flight`: the bound on bytes held by fetches in flight (shared with others)."""
        self._fetch = fetch
        self._in_flight = in_flight
        self._store = store
        self.block_size = block_size
        self._memory_limit = memory_bytes
        self._max_fetch_bytes = max_fetch_bytes
        self._lock = threading.Lock()
        self._memory: collections.OrderedDict[BlockKey, Block] = collections.OrderedDict()
        self._memory_used = 0
        # passing blocks (fetched for `ensure(disk=False)`: read once, turned into something
        # kept elsewhere) in the order they came, their bytes bounded on their own, so that a
        # stream of them never fills the memory tier (nor the daemon's RSS)
        self._passing: collections.OrderedDict[BlockKey, int] = collections.OrderedDict()
        self._passing_used = 0
        self._passing_limit = memory_bytes // PASSING_SHARE
        self._flights: dict[BlockKey, _Flight] = {}
        self._counts: collections.Counter[str] = collections.Counter()
        self._parallel = parallel  # this thread and parallel - 1 workers
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, parallel - 1), thread_name_prefix="fetch"
        )

    # -- memory tier ---------------------------------------------------------------------------

    def _remember(self, key: BlockKey, data: Block, *, passing: bool = False) -> None:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                if not passing:  # wanted for good after all
                    self._passing_used -= self._passing.pop(key, 0)
                return
            self._memory[key] = data
            self._memory_used += len(data)
            if passing:
                self._passing[key] = len(data)
                self._passing_used += len(data)
                while self._passing_used > self._passing_limit and len(self._passing) > 1:
                    self._drop(next(iter(self._passing)))
            while self._memory_used > self._memory_limit and len(self._memory) > 1:
                self._drop(next(iter(self._memory)))

    def _drop(self, key: BlockKey) -> None:
        """Remove a block from memory (holding the lock)."""
        data = self._memory.pop(key, None)
        if data is not None:
            self._memory_used -= len(data)
        self._passing_used -= self._passing.pop(key, 0)

    def _recall(self, key: BlockKey) -> Block | None:
        with self._lock:
            data = self._memory.get(key)
            if data is not None:
                self._memory.move_to_end(key)
            return data

    # -- public --------------------------------------------------------------------------------

    def size_of(self, obj: ObjectId) -> int:
        """The size of the object's blocks: its own, or the cache's."""
        return obj.block_size or self.block_size

    def _indices(self, obj: ObjectId, start: int, stop: int) -> range:
        stop = min(stop, obj.size)
        if stop <= start:
            return range(0)
        size = self.size_of(obj)
        return range(start // size, (stop - 1) // size + 1)

    def peek(self, obj: ObjectId, start: int, stop: int, *, disk: bool = False) -> Block | None:
        """The bytes if every block is in memory, or with `disk` in memory or in the disk
        store (read on this thread, see `_parts`); never fetches, never waits for a fetch."""
        stop = min(stop, obj.size)
        if stop <= start:
            return b""
        indices = self._indices(obj, start, stop)
        parts = self._parts(obj, indices, start, stop, disk=disk)
        if parts is None:
            return None
        self._counts["served_bytes"] += stop - start
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, obj: ObjectId, start: int, stop: int, *, deadline: float) -> Block:
        pieces = self.read_pieces(obj, start, stop, deadline=deadline)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_pieces(self, obj: ObjectId, start: int, stop: int, *, deadline: float) -> list[Block]:
        """`read` as the blocks themselves (the first and last cut to the range), not joined."""
        stop = min(stop, obj.size)
        if stop <= start:
            return [b""]
        indices = self._indices(obj, start, stop)
        size = self.size_of(obj)
        parts = None
        if len(indices) <= PARTS_AT_MOST and size >= DISK_PARTS_FROM:
            parts = self._parts(obj, indices, start, stop, kept=True)
        if parts is not None:
            self._counts["served_bytes"] += stop - start
            return parts
        blocks = self._blocks(obj, indices, deadline)
        self._counts["served_bytes"] += stop - start
        first = (start // size) * size
        last = first + (len(blocks) - 1) * size
        if len(blocks) == 1:
            return [_cut(blocks[0], start - first, stop - first)]
        # (a slice of the whole of a bytes object is that object: no copy)
        return [
            _cut(blocks[0], start - first, size),
            *blocks[1:-1],
            _cut(blocks[-1], 0, stop - last),
        ]

    def _parts(
        self,
        obj: ObjectId,
        indices: range,
        start: int,
        stop: int,
        *,
        disk: bool = True,
        kept: bool = False,
    ) -> list[Block] | None:
        """A read served from memory and (`disk`) the disk store without fetching: of a block
        in memory its part (copied out of a block read from disk where the caller keeps the
        parts, `kept`: see `_cut`); of a block on disk of at least `DISK_PARTS_FROM` bytes
        only the pages holding the part (not kept in memory: the kernel keeps what it was
        served), of a smaller one the whole block (kept, as a fetched one). None when a block is in
        neither (then it is fetched, whole). Nothing is written (`DiskStore.get`): fit for
        the FUSE thread."""
        parts = []
        hits = collections.Counter[str]()  # counted once the whole read is served here
        size = self.size_of(obj)
        for index in indices:
            offset = index * size
            a, b = max(start, offset) - offset, min(stop, offset + size) - offset
            data = self._recall((obj, index))
            if data is not None:
                hits["memory_hits"] += 1
                parts.append(_cut(data, a, b) if kept else data[a:b])
                continue
            if not disk or self._store is None:
                return None
            if size >= DISK_PARTS_FROM:
                data = self._store.get(obj, index, block_size=size, start=a, stop=b)
                if kept and isinstance(data, memoryview):  # (a view of the pages read)
                    data = bytes(data)  # a kept piece holds its bytes alone (see `_cut`)
            else:
                data = self._store.get(obj, index, block_size=size)
                if data is not None:
                    self._remember((obj, index), data)
                    data = data if (a, b) == (0, len(data)) else data[a:b]
            if data is None:
                return None
            hits["disk_hits"] += 1
            parts.append(data)
        self._counts.update(hits)
        return parts

    def ensure(
        self,
        obj: ObjectId,
        ranges: Sequence[tuple[int, int]],
        *,
        deadline: float,
        disk: bool = True,
    ) -> None:
        """Have the blocks of these ranges in the cache: missing runs fetched in parallel.
        `disk=False`: what is fetched is kept in memory only, not written to the disk store
        (bytes read once to be turned into something else that is kept instead); blocks the
        store already has are still used (looked up one after another: mostly misses)."""
        wanted = sorted({i for a, b in ranges for i in self._indices(obj, a, b)})
        self._blocks(obj, wanted, deadline, keep=False, disk=disk)

    def forget(self, obj: ObjectId, ranges: Sequence[tuple[int, int]]) -> None:
        """Drop from memory the passing blocks (see `ensure`) that lie wholly inside these
        ranges (read once and not needed again: they would only push out blocks that are);
        blocks another reader fetched to keep stay."""
        size = self.size_of(obj)
        with self._lock:
            for a, b in ranges:
                first = -(-a // size)
                for index in range(first, min(b, obj.size) // size):
                    if (obj, index) in self._passing:
                        self._drop((obj, index))

    def recall_stored(self, objects: Sequence[ObjectId]) -> list[ObjectId]:
        """Bring the blocks of these whole objects that the disk store has into memory, read
        in parallel, fetching (or computing) none; returns the objects still incomplete."""
        absent = [
            (obj, index)
            for obj in objects
            for index in self._indices(obj, 0, obj.size)
            if self._recall((obj, index)) is None
        ]
        stored = self._stored(absent)
        incomplete: dict[ObjectId, None] = {}
        for block, data in zip(absent, stored, strict=True):
            if data is None:
                incomplete[block[0]] = None
            else:
                self._counts["disk_hits"] += 1
                self._remember(block, data)
        return list(incomplete)

    def admit(self, obj: ObjectId, data: bytes | memoryview) -> None:
        """Keep the object's first bytes, fetched by someone else (e.g. with its size probe):
        every whole block of them, and a last partial block at the object's end, written to
        disk behind the caller (a probe that fetched a whole condensed file of 3 MB wrote it
        before its file was read: ~3 ms before a reader's first scalar)."""
        blocks: dict[int, bytes] = {}
        size = self.size_of(obj)
        for index in range(-(-len(data) // size)):
            block = data[index * size : (index + 1) * size]
            if len(block) == size or index * size + len(block) == obj.size:
                blocks[index] = bytes(block)
                self._remember((obj, index), blocks[index])
        if blocks and self._store is not None:
            self._store.put_many(obj, blocks, block_size=size, behind=True)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def held(self) -> dict[str, int]:
        """The in-flight bound's figures (bytes used, peak, limit; times a fetch waited)."""
        return self._in_flight.stats() if self._in_flight is not None else {}

    def stats(self) -> CacheStats:
        disk_bytes = self._store.usage()[0] if self._store is not None else 0
        with self._lock:
            in_flight, memory = len(self._flights), self._memory_used
        c = self._counts
        return CacheStats(
            memory_hits=c["memory_hits"],
            disk_hits=c["disk_hits"],
            misses=c["misses"],
            fetches=c["fetches"],
            fetched_bytes=c["fetched_bytes"],
            served_bytes=c["served_bytes"],
            in_flight=in_flight,
            memory_bytes=memory,
            disk_bytes=disk_bytes,
            disk_limit=self._store.limit if self._store is not None else 0,
            errors=c["errors"] + (self._store.errors if self._store is not None else 0),
        )

    # -- the miss path ---------------------------------------------------------------------------

    def _store_get(self, key: BlockKey) -> Block | None:
        if self._store is None:
            return None
        return self._store.get(*key, block_size=self.size_of(key[0]))

    def _stored(
        self, keys: list[BlockKey], *, parallel: bool = True, pooled: bool = False
    ) -> list[Block | None]:
        """The blocks from the disk store (None where missing). Consecutive blocks of one
        object are read together, up to `DISK_RUN` bytes a run (`DiskStore.get_run`: one
        read of their entries and one of the slots of each stretch of stored blocks; on
        this VM's disk one reader of large reads is also the fastest; a miss costs one
        failed open, or one read of entries, a run), the first run on this thread and the
        others in parallel unless `parallel` is False (when misses are expected); `pooled`:
        as views of the store's reused buffers where it reads past the page cache, for a
        caller that does not keep them (`DiskStore.get_run`)."""
        if self._store is None:
            return [None] * len(keys)
        runs = _key_runs(keys, lambda obj: max(1, DISK_RUN // self.size_of(obj)))
        read = functools.partial(self._stored_run, pooled=pooled)
        if len(runs) <= 1 or self._parallel <= 1 or not parallel:
            return [data for run in runs for data in read(run)]
        return [data for run in self._side_by_side(read, runs) for data in run]

    def _stored_run(self, run: list[BlockKey], *, pooled: bool = False) -> list[Block | None]:
        assert self._store is not None
        obj, first = run[0]
        if len(run) == 1:
            return [self._store_get(run[0])]
        size = self.size_of(obj)
        return self._store.get_run(obj, first, len(run), block_size=size, pooled=pooled)

    def _blocks(
        self,
        obj: ObjectId,
        indices: Sequence[int],
        deadline: float,
        *,
        keep: bool = True,
        disk: bool = True,
    ) -> list[Block]:
        found: dict[int, Block] = {}
        waits: dict[int, _Flight] = {}
        missing: list[int] = []
        not_in_memory: list[int] = []
        for index in indices:
            data = self._recall((obj, index))
            if data is not None:
                self._counts["memory_hits"] += 1
                found[index] = data
            else:
                not_in_memory.append(index)
        # (what the caller keeps, read into reused buffers where it can: not kept here, nor
        # read so for `ensure`, which only wants the blocks in memory)
        keys = [(obj, i) for i in not_in_memory]
        stored = self._stored(keys, parallel=disk, pooled=keep)
        for index, data in zip(not_in_memory, stored, strict=True):
            if data is not None:
                self._counts["disk_hits"] += 1
                if not pooled(data):  # (a view of a reused buffer would hold all of it)
                    self._remember((obj, index), data, passing=not disk)
                found[index] = data
            else:
                missing.append(index)
        owned: list[int] = []
        with self._lock:
            for index in missing:
                flight = self._flights.get((obj, index))
                if flight is None:
                    self._flights[(obj, index)] = _Flight()
                    owned.append(index)
                else:
                    waits[index] = flight
        most = max(1, self._max_fetch_bytes // self.size_of(obj))  # blocks in one fetch
        found.update(self._fetch_runs(obj, _runs(owned, most), deadline, disk))
        for index, flight in waits.items():
            if not flight.done.wait(max(0.0, deadline - time.monotonic())):
                raise DeadlineExceeded(f"{obj.key}: block {index} still in flight at deadline")
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            found[index] = flight.data
        return [found[i] for i in indices] if keep else []

    def _fetch_runs(
        self, obj: ObjectId, runs: list[list[int]], deadline: float, disk: bool
    ) -> dict[int, Block]:
        """Fetch runs of blocks, up to `parallel` at once; the first error is raised after
        all have ended (every run resolves its own flights either way)."""
        if len(runs) <= 1 or self._parallel <= 1:
            found: dict[int, Block] = {}
            for n, run in enumerate(runs):
                try:
                    found.update(self._fetch_run(obj, run, deadline, disk))
                except BaseException as exc:
                    self._abandon(obj, runs[n + 1 :], exc)  # their waiters must not hang
                    raise
            return found
        fetched = self._side_by_side(lambda run: self._fetch_run(obj, run, deadline, disk), runs)
        return {index: data for part in fetched for index, data in part.items()}

    def _side_by_side(self, fn: Callable[[_In], _Out], items: Sequence[_In]) -> list[_Out]:
        """`fn` of each item, in their order: the first on this thread, the others in the
        pool (so a pool thread running this never only waits for others); the first error
        is raised once every call has ended."""
        others = [self._pool.submit(fn, item) for item in items[1:]]
        results: list[_Out] = []
        error: BaseException | None = None
        calls: list[Callable[[], _Out]] = [functools.partial(fn, items[0])]
        calls += [future.result for future in others]
        for call in calls:
            try:
                results.append(call())
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error
        return results

    def _abandon(self, obj: ObjectId, runs: list[list[int]], error: BaseException) -> None:
        """Runs this thread owns but will not fetch: their flights end with `error`."""
        with self._lock:
            flights = [self._flights.pop((obj, index)) for run in runs for index in run]
        for flight in flights:
            flight.error = error
            flight.done.set()

    def _held(self, n: int, deadline: float, what: str) -> contextlib.AbstractContextManager[None]:
        """Hold `n` bytes of the in-flight bound while fetching (waiting for room first)."""
        if self._in_flight is None:
            return contextlib.nullcontext()
        return self._in_flight.hold(n, deadline=deadline, what=what)

    def _fetch_run(
        self, obj: ObjectId, run: list[int], deadline: float, disk: bool = True
    ) -> dict[int, Block]:
        size = self.size_of(obj)
        start = run[0] * size
        stop = min((run[-1] + 1) * size, obj.size)
        flights = {index: self._flights[(obj, index)] for index in run}
        try:
            self._counts["misses"] += len(run)
            self._counts["fetches"] += 1
            # the fetched bytes and their blocks, copied out of them (an upper bound: a block
            # that spans all of a `bytes` result is that very object, not a copy)
            held = 2 * (stop - start)
            with self._held(held, deadline, obj.key):
                data = self._fetch(obj, start, stop, deadline)
                if len(data) != stop - start:
                    raise ProtocolError(
                        f"{obj.key}: fetched {len(data)} bytes for [{start}, {stop})"
                    )
                self._counts["fetched_bytes"] += len(data)
                blocks: dict[int, bytes] = {}
                for index in run:
                    offset = index * size - start
                    block = bytes(data[offset : offset + size])
                    blocks[index] = block
                    self._remember((obj, index), block, passing=not disk)
                del data
                # the blocks are in memory: whoever waits for them goes on while they are
                # written to disk
                for index, flight in flights.items():
                    flight.data = blocks[index]
                    flight.done.set()
                if self._store is not None and disk:
                    self._store.put_many(obj, blocks, block_size=size)
            return cast(dict[int, Block], blocks)
        except BaseException as exc:
            if isinstance(exc, DcorfsError | OSError):
                self._counts["errors"] += 1
            for flight in flights.values():
                if not flight.done.is_set():  # (not those given their blocks before the error)
                    flight.error = exc
            raise
        finally:
            with self._lock:
                for index in run:
                    self._flights.pop((obj, index), None)
            for flight in flights.values():
                flight.done.set()


def _cut(block: Block, start: int, stop: int) -> Block:
    """Bytes [start, stop) of a block: of bytes a slice (the block itself when it is all of
    it), of a view (a block read from disk) a copy unless it is all of it, so that a piece
    of a read does not keep a whole block alive outside the cache's bound."""
    if isinstance(block, bytes) or (start, stop) == (0, len(block)):
        return block[start:stop]
    return bytes(block[start:stop])


def _key_runs(keys: list[BlockKey], limit: Callable[[ObjectId], int]) -> list[list[BlockKey]]:
    """Keys in their order, grouped into runs of consecutive blocks of one object (`_runs`),
    each of at most `limit(object)` blocks."""
    return [
        [(obj, index) for index in run]
        for obj, group in itertools.groupby(keys, key=lambda key: key[0])
        for run in _runs([index for _, index in group], limit(obj))
    ]


def _runs(indices: list[int], limit: int) -> list[list[int]]:
    """Consecutive indices grouped into runs of at most `limit`."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1 and len(runs[-1]) < limit:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs
