"""blockcache over diskstore: single-flight, coalescing, integrity, size bound, permissions."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcorfs.cache import cachedir, slots
from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.diskstore import (
    TOTAL_TRIGGERS,
    CacheDamaged,
    DiskStore,
    damage_of,
    read_inventory,
)
from dcorfs.cache.identity import ObjectId
from dcorfs.cache.metastore import MetaStore
from dcorfs.cache.prefetch import DISK_PARTS_FROM
from dcorfs.cache.slots import Layout
from dcorfs.errors import DeadlineExceeded, ProtocolError, TransientError

from ..cachefiles import StoredBlock, flip, index_rows

BLOCK = 4096  # a filesystem block: an evicted block's space comes back whole
DATA = os.urandom(10 * BLOCK + 123)
OBJ = ObjectId(key="circle-x/resource/abc/def/ghi", etag="e1", size=len(DATA))


class Source:
    def __init__(self, data: bytes = DATA, delay: float = 0.0) -> None:
        self.data = data
        self.delay = delay
        self.calls: list[tuple[int, int]] = []
        self.fail = 0

    def __call__(self, obj: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        self.calls.append((start, stop))
        time.sleep(self.delay)
        if self.fail:
            self.fail -= 1
            raise TransientError("boom")
        return self.data[start:stop]


def object_file(cache: Path, obj: ObjectId, block_size: int = BLOCK) -> tuple[Layout, Path]:
    layout = Layout.of(obj, block_size)
    return layout, cache / "objects" / layout.name


def on_disk(cache: Path) -> int:
    """The disk space the object files of a cache dir take now (holes take none)."""
    return sum(p.stat().st_blocks * 512 for p in (cache / "objects").rglob("*.*"))


def later() -> float:
    return time.monotonic() + 30


def make(
    tmp_path: Path, source: Source, limit: int = 1 << 20, memory: int = 1 << 20, parallel: int = 8
) -> BlockCache:
    store = DiskStore(tmp_path / "cache", limit_bytes=limit, block_size=BLOCK)
    return BlockCache(
        fetch=source,
        store=store,
        block_size=BLOCK,
        memory_bytes=memory,
        max_fetch_bytes=8 * BLOCK,
        parallel=parallel,
    )


def test_reads_coalesce_and_then_hit(tmp_path: Path) -> None:
    source = Source()
    cache = make(tmp_path, source)
    assert cache.peek(OBJ, 0, 100) is None
    assert cache.read(OBJ, 0, 5 * BLOCK, deadline=later()) == DATA[: 5 * BLOCK]
    assert source.calls == [(0, 5 * BLOCK)]
    assert cache.peek(OBJ, 10, 4000) == DATA[10:4000]
    assert cache.read(OBJ, 0, len(DATA) + 99, deadline=later()) == DATA
    assert source.calls[1:] == [(5 * BLOCK, len(DATA))]  # last block is short
    stats = cache.stats()
    assert stats.fetches == 2 and stats.fetched_bytes == len(DATA)


def test_single_flight(tmp_path: Path) -> None:
    source = Source(delay=0.2)
    cache = make(tmp_path, source)
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.read(OBJ, 0, 3000, deadline=later())))
        for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [DATA[:3000]] * 16
    assert len(source.calls) == 1


def test_failure_reaches_waiters_and_is_not_cached(tmp_path: Path) -> None:
    source = Source(delay=0.1)
    source.fail = 1
    cache = make(tmp_path, source)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            cache.read(OBJ, 0, 100, deadline=later())
        except TransientError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 4 and len(source.calls) == 1
    assert cache.read(OBJ, 0, 100, deadline=later()) == DATA[:100]


@pytest.mark.parametrize("parallel", [1, 8])
def test_a_failed_run_leaves_no_block_in_flight(tmp_path: Path, parallel: int) -> None:
    """Runs after a failed one (fetched one by one without parallel workers) end too: else
    the next reader of their blocks would wait for a fetch nobody makes, until its deadline."""
    source = Source()
    cache = make(tmp_path, source, parallel=parallel)
    cache.read(OBJ, 4 * BLOCK, 5 * BLOCK, deadline=later())  # splits [0, 8) into two runs
    source.fail = 1
    with pytest.raises(TransientError):
        cache.read(OBJ, 0, 8 * BLOCK, deadline=later())
    assert cache.stats().in_flight == 0
    assert cache.read(OBJ, 0, 8 * BLOCK, deadline=time.monotonic() + 5) == DATA[: 8 * BLOCK]


def test_forgotten_ranges_leave_memory_but_not_their_neighbours(tmp_path: Path) -> None:
    source = Source()
    cache = make(tmp_path, source)
    cache.ensure(OBJ, [(0, len(DATA))], deadline=later(), disk=False)
    assert cache.stats().disk_bytes == 0  # disk=False: memory only
    cache.forget(OBJ, [(BLOCK + 10, 5 * BLOCK)])  # blocks 2, 3, 4 lie wholly inside
    assert [cache.peek(OBJ, i * BLOCK, i * BLOCK + 1) is not None for i in range(7)] == [
        True,
        True,
        False,
        False,
        False,
        True,
        True,
    ]
    assert cache.stats().memory_bytes == len(DATA) - 3 * BLOCK
    assert cache.read(OBJ, 0, len(DATA), deadline=later()) == DATA  # fetched again


def test_memory_only_ensure_still_uses_what_the_disk_has(tmp_path: Path) -> None:
    """`disk=False` writes nothing, but blocks already stored (e.g. a small file fetched
    whole, or offline) are read from the disk, not fetched again."""
    first = make(tmp_path, Source())
    first.read(OBJ, 0, 3 * BLOCK, deadline=later())  # blocks 0-2 stored
    stored = first.stats().disk_bytes
    source = Source()  # the same disk store, an empty memory
    again = BlockCache(fetch=source, store=first._store, block_size=BLOCK)
    again.ensure(OBJ, [(0, len(DATA))], deadline=later(), disk=False)
    assert source.calls == [(3 * BLOCK, len(DATA))]
    assert again.stats().disk_bytes == stored  # nothing written


def test_peek_from_the_disk_never_fetches(tmp_path: Path) -> None:
    """`peek(disk=True)` (a read on the FUSE thread): blocks in memory or in the disk store,
    read on the calling thread (small blocks kept in memory, as fetched ones); None as soon
    as one would have to be fetched, and nothing is fetched."""
    first = make(tmp_path, Source())
    first.read(OBJ, 0, 3 * BLOCK, deadline=later())  # blocks 0-2 stored
    source = Source()
    again = BlockCache(fetch=source, store=first._store, block_size=BLOCK)  # empty memory
    assert again.peek(OBJ, 100, 2 * BLOCK + 50) is None  # memory alone: not at hand
    assert again.peek(OBJ, 100, 2 * BLOCK + 50, disk=True) == DATA[100 : 2 * BLOCK + 50]
    assert again.stats().disk_hits == 3
    assert again.peek(OBJ, 100, 2 * BLOCK + 50) == DATA[100 : 2 * BLOCK + 50]  # kept
    assert again.peek(OBJ, 2 * BLOCK, 4 * BLOCK, disk=True) is None  # block 3: not stored
    assert again.peek(OBJ, len(DATA), len(DATA) + 5, disk=True) == b""
    assert source.calls == []
    assert again.stats().disk_hits == 3 and again.stats().memory_hits == 3


def test_peek_from_the_disk_reads_only_the_pages_of_large_blocks(tmp_path: Path) -> None:
    """Of a block of decoded values on disk, a peek reads the pages it needs and keeps
    nothing in memory (the kernel keeps what it was served), as a short read does."""
    size = DISK_PARTS_FROM
    data = os.urandom(2 * size + 77)
    obj = ObjectId(key="circle-x/derived/big", etag="e1", size=len(data))
    store = DiskStore(tmp_path / "cache", limit_bytes=8 * size, block_size=size)
    BlockCache(fetch=Source(data), store=store, block_size=size).read(
        obj, 0, len(data), deadline=later()
    )
    source = Source(data)
    again = BlockCache(fetch=source, store=store, block_size=size)
    assert again.peek(obj, size - 10, size + 5000, disk=True) == data[size - 10 : size + 5000]
    assert again.peek(obj, size - 10, size + 5000) is None  # nothing kept in memory
    assert again.peek(obj, 2 * size, len(data), disk=True) == data[2 * size :]
    assert source.calls == [] and again.stats().memory_bytes == 0


def test_a_disk_read_writes_nothing_and_leaves_its_marks_to_settle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of the disk store never writes the index (it may run on the FUSE thread, and
    the index's lock may be held by a writer, of this process or another): its mark of use
    and the erasure of a damaged block it found wait for `settle`, which writes both; a
    damaged block is a miss at once, counted once; one written anew before the settling,
    by this store or another, is kept; a failed settling loses the marks, keeps the damaged
    blocks and is not tried again at once; `close` settles what is left."""
    make(tmp_path, Source()).read(OBJ, 0, len(DATA), deadline=later())
    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 20, block_size=BLOCK)
    layout, path = object_file(tmp_path / "cache", OBJ)

    def written() -> None:
        raise AssertionError("the index written by a read")

    def used(index: int) -> float | None:
        return index_rows(tmp_path / "cache").get(f"{layout.name}-{index}")

    def block(index: int) -> bytes:
        return DATA[index * BLOCK : (index + 1) * BLOCK]

    before = {i: used(i) or 0.0 for i in range(6)}
    assert store.settle_in() is None  # nothing to settle yet
    for index in (0, 3, 5):
        flip(StoredBlock(path, layout, index))
    with monkeypatch.context() as patched:
        patched.setattr(store, "_transaction", written)
        patched.setattr(store, "_sql", written)
        time.sleep(0.01)
        assert store.get(OBJ, 1) == block(1)
        assert 0 < (store.settle_in() or 0.0) <= 5.0  # (a mark: due once TOUCH_EVERY old)
        assert [store.get(OBJ, i) for i in (0, 3, 5)] == [None] * 3
        assert store.get(OBJ, 0) is None and store.errors == 3  # a miss, counted once
        assert store.settle_in() == 0.0  # a damaged block: due at once

    def busy() -> None:
        raise sqlite3.OperationalError("database is locked")

    with monkeypatch.context() as patched:
        patched.setattr(store, "_transaction", busy)
        store.settle()  # fails: marks lost, damaged blocks kept, tried again later
    assert 4.0 < (store.settle_in() or 0.0) <= 5.0 and store.get(OBJ, 0) is None
    assert store.put_many(OBJ, {3: block(3)}) == 1  # 3 written anew by this store
    other = DiskStore(tmp_path / "cache", limit_bytes=1 << 20, block_size=BLOCK)
    assert other.put_many(OBJ, {5: block(5)}) == 1  # 5 by another one
    other.close()
    assert store.get(OBJ, 3) == block(3) and store.get(OBJ, 5) is None  # (5: not known yet)
    time.sleep(0.01)
    assert store.get(OBJ, 2) == block(2)
    store._retry_at = 0.0  # (the retry is due)
    store.settle()
    assert store.settle_in() is None and (used(2) or 0.0) > before[2]  # its mark written
    assert used(1) == before[1]  # (lost with the failed settling)
    assert store.get(OBJ, 3) == block(3) and store.get(OBJ, 5) == block(5)  # kept
    assert store.get(OBJ, 0) is None and store.errors == 3  # erased: no longer damaged
    assert used(0) is None and used(3) is not None and used(5) is not None
    time.sleep(0.01)
    marked = used(4)
    assert store.get(OBJ, 4) == block(4)
    store.close()
    assert (used(4) or 0.0) > (marked or 0.0)  # written at close
    store.settle()  # (closed: nothing, no index opened again)
    assert store._conn is None


def test_wrong_length_and_waiter_deadline(tmp_path: Path) -> None:
    cache = make(tmp_path, Source(data=DATA[:-5]))
    with pytest.raises(ProtocolError):
        cache.read(OBJ, len(DATA) - 10, len(DATA), deadline=later())
    slow = make(tmp_path / "slow", Source(delay=1.0))
    thread = threading.Thread(target=lambda: slow.read(OBJ, 0, 10, deadline=later()))
    thread.start()
    time.sleep(0.1)
    with pytest.raises(DeadlineExceeded):
        slow.read(OBJ, 0, 10, deadline=time.monotonic() + 0.1)
    thread.join()


def test_disk_tier_survives_and_checks_integrity(tmp_path: Path) -> None:
    make(tmp_path, Source()).read(OBJ, 0, len(DATA), deadline=later())
    source = Source()
    again = make(tmp_path, source)
    assert again.read(OBJ, 0, len(DATA), deadline=later()) == DATA
    assert source.calls == [] and again.stats().disk_hits == 11
    layout, path = object_file(tmp_path / "cache", OBJ)
    assert [p.name for p in (tmp_path / "cache" / "objects").rglob("*.*")] == [path.name]
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    raw = bytearray(path.read_bytes())
    raw[layout.data_at(0) + 5] ^= 0xFF  # block 0: a byte of its data flipped
    raw[layout.entry_at(1) + layout.entry_size - 1] ^= 0x01  # block 1: a byte of its entry
    raw[layout.entry_at(2) : layout.entry_at(3)] = bytes(layout.entry_size)  # 2: not stored
    four = raw[layout.data_at(4) : layout.data_at(5)]  # 3: block 4's entry and data instead
    raw[layout.data_at(3) : layout.data_at(4)] = four
    raw[layout.entry_at(3) : layout.entry_at(4)] = raw[layout.entry_at(4) : layout.entry_at(5)]
    path.write_bytes(raw[: layout.data_at(10) + 100])  # block 10 (the last): truncated
    source = Source()
    third = make(tmp_path, source)
    assert third.read(OBJ, 0, len(DATA), deadline=later()) == DATA
    refetched = {i for a, b in source.calls for i in range(a // BLOCK, -(-b // BLOCK))}
    assert refetched == {0, 1, 2, 3, 10}  # exactly the five bad blocks were fetched again
    assert third.stats().errors == 4  # damage (not the block never stored) is counted
    other = ObjectId(key=OBJ.key, etag="e2", size=OBJ.size)
    fourth = Source(data=bytes(len(DATA)))
    assert make(tmp_path, fourth).read(other, 0, 10, deadline=later()) == bytes(10)
    assert fourth.calls  # another version never reuses blocks


def test_stored_blocks_in_a_row_are_read_from_disk_in_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of many blocks the disk tier holds reads them with one read of their entries
    and one of their slots, not one read (and a thread's turn) per block; a block that fails
    its check there is read alone, found damaged and fetched again."""
    make(tmp_path, Source()).read(OBJ, 0, len(DATA), deadline=later())
    runs: list[tuple[int, int]] = []
    alone: list[int] = []
    real_run, real_read = slots.read_run, slots.read

    def read_run(fd: int, layout: Layout, first: int, count: int, **kw: Any) -> Any:
        runs.append((first, count))
        return real_run(fd, layout, first, count, **kw)

    def read(fd: int, layout: Layout, index: int, *args: Any) -> Any:
        alone.append(index)
        return real_read(fd, layout, index, *args)

    monkeypatch.setattr(slots, "read_run", read_run)
    monkeypatch.setattr(slots, "read", read)
    source = Source()
    again = make(tmp_path, source)
    assert again.read(OBJ, BLOCK, len(DATA), deadline=later()) == DATA[BLOCK:]
    assert runs == [(1, 10)] and alone == [] and source.calls == []
    layout, path = object_file(tmp_path / "cache", OBJ)
    raw = bytearray(path.read_bytes())
    raw[layout.data_at(5) + 7] ^= 0x01
    path.write_bytes(raw)
    runs.clear()
    third = make(tmp_path, source)
    assert third.read(OBJ, 0, len(DATA), deadline=later()) == DATA
    assert runs == [(0, 11)] and alone == [5]  # (read alone to say what is wrong)
    assert source.calls == [(5 * BLOCK, 6 * BLOCK)] and third.stats().errors == 1


def test_pieces_cut_from_blocks_read_from_disk_are_copies(tmp_path: Path) -> None:
    """Blocks read from disk in runs are views of buffers of their own, kept in memory: a
    read's pieces are those blocks where it takes them whole, copies where it cuts them (a
    piece kept by a read-ahead window must not keep a whole block alive outside the
    cache's bound), of small blocks as of large ones (read in parts: `_parts`; written and
    read through the page cache here: runs read past it are not kept, next test)."""
    for size in (BLOCK, DISK_PARTS_FROM):
        data = os.urandom(6 * size)
        obj = ObjectId(key=f"circle-x/resource/abc/def/cut{size}", etag="e1", size=len(data))

        def cache(source: Source, size: int = size) -> BlockCache:
            store = DiskStore(
                tmp_path / f"cache{size}", limit_bytes=1 << 30, block_size=size, direct_from=None
            )
            return BlockCache(fetch=source, store=store, block_size=size, parallel=4)

        cache(Source(data)).read(obj, 0, len(data), deadline=later())
        again = cache(Source(b""))
        assert again.read(obj, 0, len(data), deadline=later()) == data  # (in memory now)
        pieces = again.read_pieces(obj, size + 10, 5 * size - 10, deadline=later())
        assert b"".join(pieces) == data[size + 10 : 5 * size - 10]
        assert [type(p) for p in pieces] == [bytes, memoryview, memoryview, bytes]
        assert [len(p) for p in pieces] == [size - 10, size, size, size - 10]
        two = again.read_pieces(obj, 10, 2 * size - 10, deadline=later())
        assert [type(p) for p in two] == [bytes, bytes] and b"".join(two) == data[
            10 : 2 * size - 10
        ]
        whole = again.read_pieces(obj, 2 * size, 3 * size, deadline=later())
        assert [type(p) for p in whole] == [memoryview] and whole[0] == data[2 * size : 3 * size]


def test_parts_of_large_blocks_read_from_disk_are_views_unless_kept(tmp_path: Path) -> None:
    """A short read of a large block on disk reads only its pages (`_parts`): handed on as a
    view of them where the caller keeps nothing (`peek`: a FUSE reply), as bytes of their own
    where the caller keeps the pieces (`read_pieces`: a read-ahead window, whose budget counts
    the piece, not the pages read around it)."""
    size = DISK_PARTS_FROM
    data = os.urandom(3 * size)
    obj = ObjectId(key="circle-x/resource/abc/def/views", etag="e1", size=len(data))

    def cache(source: Source) -> BlockCache:
        store = DiskStore(tmp_path / "cache", limit_bytes=1 << 30, block_size=size)
        return BlockCache(fetch=source, store=store, block_size=size, parallel=4)

    cache(Source(data)).read(obj, 0, len(data), deadline=later())
    fresh = cache(Source(b""))  # (nothing in memory: every part comes from disk)
    seen = fresh.peek(obj, size + 10, size + 70_000, disk=True)
    assert isinstance(seen, memoryview) and seen == data[size + 10 : size + 70_000]
    kept = fresh.read_pieces(obj, 2 * size + 10, 2 * size + 70_000, deadline=later())
    assert [type(p) for p in kept] == [bytes] and kept[0] == data[2 * size + 10 : 2 * size + 70_000]
    assert fresh.stats().disk_hits == 2 and fresh.stats().memory_bytes == 0


def test_size_bound_and_lru(tmp_path: Path) -> None:
    limit = 4 * (BLOCK + 64)
    objects = [ObjectId(key=f"k{i}", etag="e", size=len(DATA)) for i in range(3)]
    # one fetch at a time: the runs of one read are admitted in order (in parallel, which run of
    # a read larger than the whole cache is kept last is up to chance)
    cache = make(tmp_path, Source(), limit=limit, memory=BLOCK, parallel=1)
    for obj in objects:
        assert cache.read(obj, 0, len(DATA), deadline=later()) == DATA
        assert on_disk(tmp_path / "cache") <= limit + 3 * 4096  # entry tables: a page each
    store = DiskStore(tmp_path / "cache", limit_bytes=limit, block_size=BLOCK)
    used, count = store.usage()
    assert used <= limit and count >= 3
    assert store.get(objects[2], 10) is not None  # the most recent survive
    assert store.get(objects[0], 0) is None


def test_two_stores_share_one_directory(tmp_path: Path) -> None:
    limit = 6 * (BLOCK + 64)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            cache = make(tmp_path, Source(), limit=limit, memory=BLOCK)
            for i in range(20):
                obj = ObjectId(key=f"k{(i + seed) % 7}", etag="e", size=len(DATA))
                assert cache.read(obj, 0, len(DATA), deadline=later()) == DATA
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert on_disk(tmp_path / "cache") <= limit + BLOCK + 7 * 4096


def test_disk_full_degrades_to_no_caching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    source = Source()
    cache = make(tmp_path, source)
    monkeypatch.setattr(os, "open", full)
    assert cache.read(OBJ, 0, len(DATA), deadline=later()) == DATA
    assert list((tmp_path / "cache" / "objects").rglob("*.*")) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(DATA) + 50), st.integers(0, 4 * BLOCK)), max_size=8))
def test_random_reads_equal_the_truth(reads: list[tuple[int, int]]) -> None:
    cache = BlockCache(fetch=Source(), store=None, block_size=BLOCK, memory_bytes=3 * BLOCK)
    for start, length in reads:
        assert (
            cache.read(OBJ, start, start + length, deadline=later()) == DATA[start : start + length]
        )


class CountingSource(Source):
    """Remembers how many fetches ran at the same time."""

    def __init__(self) -> None:
        super().__init__(delay=0.2)
        self.lock = threading.Lock()
        self.running = self.most = 0

    def __call__(self, obj: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return super().__call__(obj, start, stop, deadline)
        finally:
            with self.lock:
                self.running -= 1


def test_admitted_heads_and_parallel_runs(tmp_path: Path) -> None:
    source = CountingSource()
    cache = make(tmp_path, source)
    cache.admit(OBJ, DATA[: 3 * BLOCK + 10])  # the partial fourth block is not kept
    assert cache.read(OBJ, 0, 3 * BLOCK, deadline=later()) == DATA[: 3 * BLOCK]
    assert source.calls == []
    cache.ensure(
        OBJ,
        [(4 * BLOCK, 5 * BLOCK), (6 * BLOCK, 7 * BLOCK), (8 * BLOCK, 9 * BLOCK)],
        deadline=later(),
    )
    assert source.most > 1  # separate runs are fetched at the same time
    assert sorted(source.calls) == [
        (4 * BLOCK, 5 * BLOCK),
        (6 * BLOCK, 7 * BLOCK),
        (8 * BLOCK, 9 * BLOCK),
    ]
    tail = ObjectId(key="small", etag="e", size=BLOCK + 5)
    cache.admit(tail, DATA[: BLOCK + 5])  # a whole small object, last block included
    assert cache.read(tail, 0, BLOCK + 5, deadline=later()) == DATA[: BLOCK + 5]
    assert len(source.calls) == 3
    cache.close()


def test_inventory_names_objects_and_clear_empties_the_store(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 20, block_size=BLOCK)
    other = ObjectId(key="circle-x/condensed/abc/def/ghi", etag="e2", size=BLOCK)
    assert store.put_many(OBJ, {0: DATA[:BLOCK], 3: DATA[3 * BLOCK : 4 * BLOCK]}) == 2
    assert store.put_many(other, {0: os.urandom(BLOCK)}) == 1
    found = {obj.key: obj for obj in read_inventory(tmp_path / "cache")}
    assert found[OBJ.key].blocks == 2
    assert found[OBJ.key].nbytes == 2 * BLOCK
    assert (found[OBJ.key].etag, found[OBJ.key].size) == ("e1", len(DATA))
    assert found[other.key].nbytes == BLOCK
    before = store.usage()
    assert before[1] == 3
    assert store.clear() == before
    assert read_inventory(tmp_path / "cache") == []
    assert store.usage() == (0, 0)
    assert not any(p.is_file() for p in (tmp_path / "cache" / "objects").rglob("*"))
    assert store.get(OBJ, 0) is None
    store.close()


def test_a_store_in_use_refuses_an_exclusive_hold(tmp_path: Path) -> None:
    from dcorfs.cache.diskstore import CacheInUse, in_use

    directory = tmp_path / "cache"
    assert not in_use(directory)
    first = DiskStore(directory, limit_bytes=1 << 20, block_size=BLOCK)
    second = DiskStore(directory, limit_bytes=1 << 20, block_size=BLOCK)  # shared: fine
    assert in_use(directory)
    with pytest.raises(CacheInUse):
        DiskStore(directory, limit_bytes=1 << 20, exclusive=True)
    first.close()
    second.close()
    assert not in_use(directory)
    DiskStore(directory, limit_bytes=1 << 20, exclusive=True).close()


def test_inventory_of_a_cache_from_before_the_objects_table(tmp_path: Path) -> None:
    import sqlite3

    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 20, block_size=BLOCK)
    assert store.put_many(OBJ, {0: DATA[:BLOCK]}) == 1
    store.close()
    with sqlite3.connect(tmp_path / "cache" / "index.sqlite3") as db:
        db.execute("DROP TABLE objects")
    (found,) = read_inventory(tmp_path / "cache")
    assert (found.key, found.blocks, found.nbytes) == (None, 1, BLOCK)
    assert read_inventory(tmp_path / "nowhere") == []


def garbage(path: Path) -> bytes:
    """Overwrite a SQLite database (and drop its journal files): no longer a database."""
    for journal in path.parent.glob(f"{path.name}-*"):
        journal.unlink()
    data = b"not a database at all" * 100
    path.write_bytes(data)
    return data


def test_damage_is_told_apart_from_trouble() -> None:
    assert cachedir.is_damaged(sqlite3.DatabaseError("file is not a database"))
    for other in (sqlite3.OperationalError, sqlite3.IntegrityError, sqlite3.ProgrammingError):
        assert not cachedir.is_damaged(other("locked, busy, a constraint, a misuse"))


def test_a_damaged_index_is_renewed_and_keeps_the_valid_blocks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    store = DiskStore(cache, limit_bytes=1 << 20, block_size=BLOCK)
    store.put_many(OBJ, {i: DATA[i * BLOCK : (i + 1) * BLOCK] for i in range(4)})
    store.close()
    assert damage_of(cache / cachedir.INDEX) is None
    garbage(cache / cachedir.INDEX)
    meta = garbage(cache / cachedir.META)
    layout, path = object_file(cache, OBJ)
    raw = bytearray(path.read_bytes())
    raw[layout.data_at(2) + BLOCK - 1] ^= 0x21  # block 2's last byte
    path.write_bytes(raw)
    assert damage_of(cache / cachedir.INDEX) is not None
    assert MetaStore(cache / cachedir.META, scope="").get("x") is None  # unusable: in memory
    assert (cache / cachedir.META).read_bytes() == meta  # … and never deleted by it
    renewed = DiskStore(cache, limit_bytes=1 << 20, block_size=BLOCK)
    try:
        assert [renewed.get(OBJ, i) is not None for i in range(4)] == [True, True, False, True]
        assert renewed.get(OBJ, 0) == DATA[:BLOCK]
        assert renewed.usage()[1] == 3
        assert path.read_bytes()[layout.entry_at(2) : layout.entry_at(3)].count(0) == len(
            raw[layout.entry_at(2) : layout.entry_at(3)]
        )  # the bad block was erased
        assert (
            damage_of(cache / cachedir.META) is None and damage_of(cache / cachedir.INDEX) is None
        )
    finally:
        renewed.close()
    assert "replaced by a new one" in caplog.text and "3 cached blocks kept" in caplog.text


def test_a_damaged_index_in_use_by_another_store_is_left_alone(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    holder = DiskStore(cache, limit_bytes=1 << 20, block_size=BLOCK)
    try:
        data = garbage(cache / cachedir.INDEX)
        with pytest.raises(CacheDamaged, match="in use by another mount"):
            DiskStore(cache, limit_bytes=1 << 20, block_size=BLOCK)
        assert (cache / cachedir.INDEX).read_bytes() == data
    finally:
        holder.close()
    DiskStore(cache, limit_bytes=1 << 20, block_size=BLOCK).close()  # alone: renewed
    assert damage_of(cache / cachedir.INDEX) is None


def stored_total(cache: Path) -> tuple[int, int]:
    """(the kept total, the sum of the rows) of a cache dir's index."""
    with sqlite3.connect(cache / "index.sqlite3") as db:
        (kept,) = db.execute("SELECT bytes FROM total").fetchone()
        (summed,) = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM blocks").fetchone()
    return kept, summed


def test_the_kept_total_follows_admissions_evictions_and_clear(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = DiskStore(cache, limit_bytes=4 * (BLOCK + 64), block_size=BLOCK)
    for n in range(6):  # more than the limit holds: evictions
        obj = ObjectId(key=f"k{n}", etag="e", size=len(DATA))
        assert store.put_many(obj, {i: DATA[i * BLOCK : (i + 1) * BLOCK] for i in range(2)}) == 2
        kept, summed = stored_total(cache)
        assert kept == summed > 0
        assert kept <= store.limit
    store.put_many(OBJ, {0: DATA[:BLOCK]})  # the same block again: its row replaced
    store.put_many(OBJ, {0: DATA[:BLOCK]})
    assert stored_total(cache)[0] == stored_total(cache)[1]
    store.clear()
    assert stored_total(cache) == (0, 0)
    store.close()


def test_an_index_from_before_the_kept_total_gets_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = DiskStore(cache, limit_bytes=1 << 20, block_size=BLOCK)
    assert store.put_many(OBJ, {0: DATA[:BLOCK], 1: DATA[BLOCK : 2 * BLOCK]}) == 2
    store.close()
    with sqlite3.connect(cache / "index.sqlite3") as db:
        for trigger in TOTAL_TRIGGERS:
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DROP TABLE total")
    store = DiskStore(cache, limit_bytes=1 << 20, block_size=BLOCK)
    two = 2 * BLOCK
    assert stored_total(cache) == (two, two)
    assert store.put_many(OBJ, {2: DATA[2 * BLOCK : 3 * BLOCK]}) == 1
    kept, summed = stored_total(cache)
    assert kept == summed == store.usage()[0]
    store.close()


def test_passing_blocks_are_bounded_apart_and_push_out_no_others(tmp_path: Path) -> None:
    """Blocks fetched for `ensure(disk=False)` (a stream decoded once) hold at most a share of
    the memory tier: a long stream of them pushes out neither the blocks read for good nor
    the memory's bound, and a block read for good later is kept like any other."""
    memory = 8 * BLOCK
    source = Source()
    cache = make(tmp_path, source, memory=memory)
    kept = ObjectId(key="kept", etag="e", size=len(DATA))
    assert cache.read(kept, 0, 2 * BLOCK, deadline=later()) == DATA[: 2 * BLOCK]
    for n in range(5):  # 5 streams of 10 blocks each
        obj = ObjectId(key=f"stream{n}", etag="e", size=len(DATA))
        cache.ensure(obj, [(0, len(DATA))], deadline=later(), disk=False)
        assert cache.stats().memory_bytes <= 2 * BLOCK + memory // 4
    calls = len(source.calls)
    assert cache.peek(kept, 0, 2 * BLOCK) == DATA[: 2 * BLOCK]  # still in memory
    assert len(source.calls) == calls
    last = ObjectId(key="stream4", etag="e", size=len(DATA))
    end = len(DATA) - 123
    # the newest passing blocks stay (which of the last stream's: the order its blocks
    # arrived in, fetched in parallel, not their order in the object)
    starts = range(0, len(DATA), BLOCK)
    held = [a for a in starts if cache.peek(last, a, min(a + BLOCK, len(DATA))) is not None]
    assert held, "no passing block of the newest stream kept"
    assert cache.read(last, end - BLOCK, end, deadline=later()) == DATA[end - BLOCK : end]
