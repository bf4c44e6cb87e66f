"""cache/writebehind.py over a real disk store: small puts queued and served until written,
large or unfitting ones written by their caller, everything written at close, a failed
write lost to the cache only; and the block cache's waiters served before its maker's write."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dcorfs.cache import diskstore, writebehind
from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.diskstore import DiskStore
from dcorfs.cache.identity import ObjectId
from dcorfs.cache.slots import Layout
from dcorfs.cache.writebehind import BEHIND_UP_TO, WriteBehind

from ..cachefiles import StoredBlock, flip, index_rows, stored_blocks

BLOCK = 4096
DATA = os.urandom(8 * BLOCK)
OBJ = ObjectId(key="circle-x/resource/abc/def/ghi", etag="e1", size=len(DATA))
WRITER = "disk-writer"


class GatedStore(DiskStore):
    """A disk store whose writes made in `thread` wait for `gate` (or fail with `error`)."""

    def __init__(self, path: Path, *, thread: str = WRITER) -> None:
        super().__init__(path, limit_bytes=4 << 20, block_size=BLOCK)
        self.thread = thread
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.error: OSError | None = None

    def put_many(
        self,
        obj: ObjectId,
        blocks: dict[int, bytes],
        *,
        block_size: int | None = None,
        behind: bool = False,
    ) -> int:
        if threading.current_thread().name == self.thread:
            self.entered.set()
            assert self.gate.wait(10), "the test never opened the gate"
            if self.error is not None:
                raise self.error
        return super().put_many(obj, blocks, block_size=block_size)


def block(index: int) -> bytes:
    return DATA[index * BLOCK : (index + 1) * BLOCK]


def test_a_small_put_is_served_from_the_queue_until_it_is_written(tmp_path: Path) -> None:
    store = GatedStore(tmp_path / "cache")
    writer = WriteBehind(store, limit=1 << 20)
    try:
        assert writer.put_many(OBJ, {0: block(0), 1: block(1)}) == 2
        assert store.entered.wait(5)  # the writer is at it, held at the gate
        assert store.get(OBJ, 0) is None  # not on disk yet …
        assert writer.get(OBJ, 0) == block(0)  # … but never absent from both
        assert writer.get(OBJ, 1, start=10, stop=20) == block(1)[10:20]
        assert writer.stats()["queued"] == 2 * BLOCK
        store.gate.set()
        writer.flush()
        assert store.get(OBJ, 0) == block(0) and store.get(OBJ, 1) == block(1)
        assert writer.stats() == {"queued": 0, "peak": 2 * BLOCK, "limit": 1 << 20}
    finally:
        store.gate.set()
        writer.close()


def test_a_run_takes_queued_blocks_from_the_queue_and_the_rest_from_disk(tmp_path: Path) -> None:
    """`get_run`: blocks still queued come from the queue (their file is not read for them:
    its entries may be half written), the stretches between them from the disk store."""
    store = GatedStore(tmp_path / "cache")
    writer = WriteBehind(store, limit=1 << 20)
    asked: list[tuple[int, int]] = []
    real = store.get_run

    def get_run(obj: ObjectId, first: int, count: int, **kw: Any) -> Any:
        asked.append((first, count))
        return real(obj, first, count, **kw)

    store.get_run = get_run  # type: ignore[method-assign]
    try:
        assert DiskStore.put_many(store, OBJ, {1: block(1), 2: block(2), 5: block(5)}) == 3
        assert writer.put_many(OBJ, {3: block(3)}) == 1
        assert store.entered.wait(5)  # block 3 queued, its writer held at the gate
        got = writer.get_run(OBJ, 0, 7)
        assert got == [None, block(1), block(2), block(3), None, block(5), None]
        assert asked == [(0, 3), (4, 3)]
    finally:
        store.gate.set()
        writer.close()


def test_small_puts_wait_for_a_pause_unless_the_queue_is_half_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writebehind, "QUIET", 30.0)  # no pause comes during this test
    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 20, block_size=BLOCK)
    writer = WriteBehind(store, limit=4 * BLOCK)
    try:
        writer.put_many(OBJ, {0: block(0)})
        time.sleep(0.3)
        assert store.get(OBJ, 0) is None  # waiting for the pause
        writer.put_many(OBJ, {1: block(1)})  # half full: written now
        until = time.monotonic() + 10
        while store.get(OBJ, 1) is None and time.monotonic() < until:
            time.sleep(0.05)
        assert store.get(OBJ, 0) == block(0) and store.get(OBJ, 1) == block(1)
    finally:
        writer.close()


def test_a_queued_put_waits_for_a_pause_at_most_max_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writebehind, "QUIET", 30.0)
    monkeypatch.setattr(writebehind, "MAX_AGE", 0.3)
    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 20, block_size=BLOCK)
    writer = WriteBehind(store, limit=1 << 20)
    try:
        writer.put_many(OBJ, {0: block(0)})
        until = time.monotonic() + 10
        while store.get(OBJ, 0) is None and time.monotonic() < until:
            writer.put_many(OBJ, {1: block(1)})  # a steady trickle: never a pause
            time.sleep(0.02)
        assert store.get(OBJ, 0) == block(0)
    finally:
        writer.close()


def test_large_puts_and_those_that_do_not_fit_are_written_by_their_caller(
    tmp_path: Path,
) -> None:
    store = GatedStore(tmp_path / "cache")  # the writer thread stays at the gate
    writer = WriteBehind(store, limit=3 * BLOCK)
    big = ObjectId(key="circle-x/resource/big", etag="e", size=BEHIND_UP_TO + BLOCK)
    try:
        assert writer.put_many(OBJ, {0: block(0), 1: block(1)}) == 2  # queued
        assert store.entered.wait(5)
        assert writer.put_many(OBJ, {2: block(2), 3: block(3)}) == 2  # 4 > 3 blocks: now
        assert store.get(OBJ, 2) == block(2) and store.get(OBJ, 0) is None
        whole = os.urandom(BEHIND_UP_TO + BLOCK)
        pieces = {i: whole[i * BLOCK : (i + 1) * BLOCK] for i in range(len(whole) // BLOCK)}
        assert writer.put_many(big, pieces) == len(pieces)  # larger than BEHIND_UP_TO: now
        assert store.get(big, len(pieces) - 1) == pieces[len(pieces) - 1]
    finally:
        store.gate.set()
        writer.close()
    assert store.get(OBJ, 0) == block(0)


def test_a_large_put_told_to_go_behind_is_queued_as_a_probes_first_bytes_are(
    tmp_path: Path,
) -> None:
    store = GatedStore(tmp_path / "cache")  # the writer thread stays at the gate
    writer = WriteBehind(store, limit=3 * BEHIND_UP_TO)
    whole = os.urandom(2 * BEHIND_UP_TO)
    big = ObjectId(key="circle-x/condensed/big", etag="e", size=len(whole))
    pieces = {i: whole[i * BLOCK : (i + 1) * BLOCK] for i in range(len(whole) // BLOCK)}
    cache = BlockCache(fetch=lambda *_: b"", store=writer, block_size=BLOCK, parallel=1)
    try:
        cache.admit(big, whole)  # (a probe that fetched the whole object)
        assert store.entered.wait(5)  # queued: the writer has it, at its gate
        assert store.get(big, 0) is None and writer.get(big, 0) == pieces[0]
        assert writer.put_many(OBJ, {0: block(0)}, behind=True) == 1  # fits: queued too
        assert store.get(OBJ, 0) is None
        other = ObjectId(key="circle-x/condensed/other", etag="e", size=3 * BEHIND_UP_TO // 2)
        too_big = {i: bytes(BLOCK) for i in range(other.size // BLOCK)}
        assert writer.put_many(other, too_big, behind=True) == len(too_big)  # no room: now
        assert store.get(other, 1) == bytes(BLOCK)
        assert writer.stats()["queued"] <= writer.queue_limit
    finally:
        store.gate.set()
        writer.close()
    assert store.get(big, len(pieces) - 1) == pieces[len(pieces) - 1]
    assert store.get(OBJ, 0) == block(0)


def test_a_put_told_to_go_behind_that_does_not_fit_an_empty_queue_is_written_now(
    tmp_path: Path,
) -> None:
    store = GatedStore(tmp_path / "cache")
    writer = WriteBehind(store, limit=BEHIND_UP_TO)
    obj = ObjectId(key="circle-x/condensed/big", etag="e", size=2 * BEHIND_UP_TO)
    pieces = {i: os.urandom(BLOCK) for i in range(obj.size // BLOCK)}
    try:
        assert writer.put_many(obj, pieces, behind=True) == len(pieces)
        assert store.get(obj, 0) == pieces[0] and not store.entered.is_set()
    finally:
        store.gate.set()
        writer.close()


def test_close_writes_everything_queued(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 20, block_size=BLOCK)
    writer = WriteBehind(store, limit=1 << 20)
    for index in range(8):
        writer.put_many(OBJ, {index: block(index)})
    writer.close()
    assert [store.get(OBJ, i) for i in range(8)] == [block(i) for i in range(8)]
    other = ObjectId(key="circle-x/resource/other", etag="e", size=BLOCK)
    assert writer.put_many(other, {0: block(0)}) == 1  # after close: written by its caller
    assert store.get(other, 0) == block(0)


def test_a_failed_write_is_lost_to_the_cache_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = GatedStore(tmp_path / "cache")
    store.error = OSError(errno.EIO, "I/O error")
    writer = WriteBehind(store, limit=1 << 20)
    try:
        with caplog.at_level(logging.WARNING, logger="dcorfs.cache.writebehind"):
            writer.put_many(OBJ, {0: block(0)})
            store.gate.set()
            writer.flush()
        assert "1 blocks of circle-x/resource/abc/def/ghi not stored" in caplog.text
        assert writer.get(OBJ, 0) is None and writer.stats()["queued"] == 0
        # written by its caller (too large to queue), it fails the same way: not raised
        store.thread = threading.current_thread().name
        whole = os.urandom(BEHIND_UP_TO + BLOCK)
        pieces = {i: whole[i * BLOCK : (i + 1) * BLOCK] for i in range(len(whole) // BLOCK)}
        assert writer.put_many(OBJ, pieces) == 0
        assert writer.errors == 2 and writer.get(OBJ, 1) is None
    finally:
        writer.close()


def test_a_waiter_has_its_block_before_the_maker_has_written_it(tmp_path: Path) -> None:
    """The block cache gives a block to those waiting for it as soon as it is made; the
    maker writes it to disk after that."""
    store = GatedStore(tmp_path / "cache", thread="maker")
    fetching, go_on = threading.Event(), threading.Event()

    def fetch(obj: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        fetching.set()
        assert go_on.wait(10)
        return DATA[start:stop]

    cache = BlockCache(fetch=fetch, store=store, block_size=BLOCK, memory_bytes=1 << 20)
    deadline = time.monotonic() + 30
    got: dict[str, bytes] = {}

    def read(name: str) -> None:
        got[name] = cache.read(OBJ, 0, BLOCK, deadline=deadline)

    maker = threading.Thread(target=read, args=("maker",), name="maker")
    waiter = threading.Thread(target=read, args=("waiter",))
    try:
        maker.start()
        assert fetching.wait(5)
        waiter.start()
        time.sleep(0.2)  # the waiter joins the maker's flight
        go_on.set()
        waiter.join(5)
        assert got.get("waiter") == block(0)
        assert store.entered.wait(5) and maker.is_alive()  # still writing it
        assert cache.stats().memory_hits == 0  # the waiter had it from the flight
    finally:
        go_on.set()
        store.gate.set()
        maker.join(10)
        waiter.join(10)
        cache.close()
    assert got["maker"] == block(0) and store.get(OBJ, 0) == block(0)


def damaged_store(tmp_path: Path, *, blocks: int, bad: int) -> tuple[DiskStore, Layout]:
    """A disk store holding the first `blocks` blocks of OBJ, block `bad` with a byte flipped."""
    store = DiskStore(tmp_path / "cache", limit_bytes=4 << 20, block_size=BLOCK)
    assert store.put_many(OBJ, {i: block(i) for i in range(blocks)}) == blocks
    layout = Layout.of(OBJ, BLOCK)
    flip(StoredBlock(tmp_path / "cache" / "objects" / layout.name, layout, bad))
    return store, layout


def test_the_writer_settles_what_reads_left_without_any_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount that only reads (a warm one) has its marks of use written, and a damaged
    block it found erased, by the writer thread, woken by the store: a damaged block at
    once (even while the writer waits for the marks), a full batch of marks at once, the
    marks of a batch not full once the oldest is TOUCH_EVERY old; not only at a next put
    or at close."""
    monkeypatch.setattr(diskstore, "TOUCH_EVERY", 1.5)
    monkeypatch.setattr(diskstore, "TOUCH_BATCH", 3)
    store, layout = damaged_store(tmp_path, blocks=8, bad=2)
    before = index_rows(tmp_path / "cache")
    name = f"{layout.name}-"

    def wait_for(done: Callable[[dict[str, float]], bool], within: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < within:
            if done(index_rows(tmp_path / "cache")):
                return time.monotonic() - started
            time.sleep(0.02)
        raise AssertionError(f"not settled within {within} s: {index_rows(tmp_path / 'cache')}")

    def marked(*indices: int) -> Callable[[dict[str, float]], bool]:
        return lambda rows: all(rows[name + str(i)] > before[name + str(i)] for i in indices)

    writer = WriteBehind(store, limit=1 << 20)
    try:
        time.sleep(0.01)
        assert writer.get(OBJ, 0) == block(0)  # a mark: the writer waits 1.5 s for it
        time.sleep(0.2)
        assert writer.get(OBJ, 2) is None and store.errors == 1
        wait_for(lambda rows: name + "2" not in rows, within=0.8)  # erased at once …
        assert marked(0)(index_rows(tmp_path / "cache"))  # … the mark written with it
        assert [b.index for b in stored_blocks(tmp_path / "cache")] == [0, 1, *range(3, 8)]
        assert writer.get(OBJ, 2) is None and store.errors == 1  # a miss, no longer damaged
        assert writer.get(OBJ, 6) == block(6)
        time.sleep(0.8)
        assert not marked(6)(index_rows(tmp_path / "cache"))  # not before it is due …
        wait_for(marked(6), within=3.0)  # … but then
        assert index_rows(tmp_path / "cache")[name + "1"] == before[name + "1"]  # not read
        time.sleep(0.01)
        for i in (3, 4, 5):  # a full batch: at once
            assert writer.get(OBJ, i) == block(i)
        wait_for(marked(3, 4, 5), within=0.8)
    finally:
        writer.close()
        store.close()


def test_a_failed_settling_is_not_tried_again_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index failing at every try (busy beyond its timeout, damaged) never makes the
    writer spin: a failed `settle` waits SETTLE_RETRY before the next one."""
    monkeypatch.setattr(diskstore, "SETTLE_RETRY", 0.5)
    store, layout = damaged_store(tmp_path, blocks=3, bad=1)
    tries = []

    def busy() -> None:
        tries.append(time.monotonic())
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "_transaction", busy)
    writer = WriteBehind(store, limit=1 << 20)
    try:
        assert writer.get(OBJ, 1) is None  # damaged: due at once, failing every time
        time.sleep(1.2)
        assert 2 <= len(tries) <= 4, tries  # at once, then every 0.5 s
        assert writer.get(OBJ, 1) is None and store.errors == 1
    finally:
        writer.close()
        monkeypatch.undo()
        store.close()
    assert f"{layout.name}-1" not in index_rows(tmp_path / "cache")  # erased at close
