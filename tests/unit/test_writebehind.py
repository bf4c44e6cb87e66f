"""The disk store written behind the readers (cache/writebehind.py), over a real DiskStore."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from dcorfs.cache.diskstore import DiskStore, Put
from dcorfs.cache.identity import ObjectId
from dcorfs.cache.writebehind import WriteBehind

SIZE = 4096


def obj(n: int) -> ObjectId:
    return ObjectId(key=f"bucket/object-{n}", etag=f"e{n}", size=4 * SIZE)


def block(n: int, index: int) -> bytes:
    return bytes([n, index]) * (SIZE // 2)


class GatedStore(DiskStore):
    """A DiskStore whose batches wait at a gate, counted; failing on demand."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, limit_bytes=1 << 20, block_size=SIZE)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[Put]] = []
        self.fail: BaseException | None = None

    def put_objects(self, batch: Sequence[Put]) -> int:
        self.entered.set()
        assert self.gate.wait(10)
        self.batches.append(list(batch))
        if self.fail is not None:
            fail, self.fail = self.fail, None
            raise fail
        return super().put_objects(batch)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GatedStore]:
    store = GatedStore(tmp_path / "cache")
    yield store
    store.gate.set()
    store.close()


def test_queued_blocks_are_served_before_they_are_on_disk(store: GatedStore) -> None:
    writer = WriteBehind(store)
    try:
        writer.put_many(obj(1), {0: block(1, 0), 1: block(1, 1)}, block_size=SIZE)
        assert store.entered.wait(10)
        assert store.get(obj(1), 0) is None  # not on disk yet
        assert writer.get(obj(1), 1) == block(1, 1)
        assert writer.get(obj(1), 1, start=10, stop=20) == block(1, 1)[10:20]
        assert writer.get(obj(1), 2) is None
        store.gate.set()
        writer.flush()
        assert store.get(obj(1), 0) == block(1, 0)  # from the disk now
        assert writer.get(obj(1), 1, start=10, stop=20) == block(1, 1)[10:20]
    finally:
        writer.close()


def test_what_waits_is_stored_in_one_batch(store: GatedStore) -> None:
    writer = WriteBehind(store)
    try:
        writer.put_many(obj(0), {0: block(0, 0)})
        assert store.entered.wait(10)  # the writer holds the first batch at the gate
        for n in range(1, 6):
            writer.put_many(obj(n), {0: block(n, 0), 3: block(n, 3)})
        store.gate.set()
        writer.flush()
        assert [len(batch) for batch in store.batches] == [1, 5]
        assert store.usage() == (11 * SIZE, 11)
        assert all(store.get(obj(n), 3) == block(n, 3) for n in range(1, 6))
    finally:
        writer.close()


def test_a_full_queue_makes_the_next_put_wait(store: GatedStore) -> None:
    writer = WriteBehind(store, limit_bytes=2 * SIZE)
    try:
        writer.put_many(obj(1), {0: block(1, 0), 1: block(1, 1)})
        assert store.entered.wait(10)
        done = threading.Event()
        thread = threading.Thread(
            target=lambda: (writer.put_many(obj(2), {0: block(2, 0)}), done.set())
        )
        thread.start()
        assert not done.wait(0.3)  # the queue holds its limit
        store.gate.set()
        assert done.wait(10)
        thread.join()
        writer.flush()
        assert store.get(obj(2), 0) == block(2, 0)
    finally:
        writer.close()


def test_close_stores_what_is_queued(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 20, block_size=SIZE)
    writer = WriteBehind(store)
    for n in range(20):
        writer.put_many(obj(n), {1: block(n, 1)})
    writer.close()
    assert writer.put_many(obj(99), {0: block(99, 0)}) == 0  # closed: nothing queued
    store.close()
    again = DiskStore(tmp_path / "cache", limit_bytes=1 << 20, block_size=SIZE)
    try:
        assert [again.get(obj(n), 1) for n in range(20)] == [block(n, 1) for n in range(20)]
        assert again.get(obj(99), 0) is None
    finally:
        again.close()


@pytest.mark.parametrize(
    "failure", [OSError(5, "Input/output error"), sqlite3.OperationalError("disk I/O error")]
)
def test_a_failed_batch_is_not_cached_and_the_writer_goes_on(
    store: GatedStore, failure: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    writer = WriteBehind(store)
    try:
        store.fail = failure
        store.gate.set()
        writer.put_many(obj(1), {0: block(1, 0)})
        writer.flush()
        assert "1 blocks not stored" in caplog.text
        assert writer.get(obj(1), 0) is None  # neither queued nor stored: a miss
        writer.put_many(obj(2), {0: block(2, 0)})
        writer.flush()
        assert writer.get(obj(2), 0) == block(2, 0) == store.get(obj(2), 0)
    finally:
        writer.close()


def test_a_block_queued_again_is_stored_once(store: GatedStore) -> None:
    writer = WriteBehind(store)
    try:
        writer.put_many(obj(0), {0: block(0, 0)})
        assert store.entered.wait(10)
        writer.put_many(obj(1), {2: block(1, 2)})
        writer.put_many(obj(1), {2: block(1, 2), 3: block(1, 3)})
        store.gate.set()
        writer.flush()
        assert store.usage() == (3 * SIZE, 3)
    finally:
        writer.close()


def test_one_batch_of_several_objects_admits_each(tmp_path: Path) -> None:
    """DiskStore.put_objects: one transaction, every object's rows; a block named twice once."""
    store = DiskStore(tmp_path / "cache", limit_bytes=3 * SIZE, block_size=SIZE)
    try:
        batch: list[Put] = [
            (obj(1), {0: block(1, 0)}, None),
            (obj(2), {0: block(2, 0), 1: block(2, 1)}, SIZE),
            (obj(1), {0: block(1, 0)}, None),
        ]
        assert store.put_objects(batch) == 3
        assert store.usage() == (3 * SIZE, 3)
        assert store.put_objects([(obj(3), {0: block(3, 0)}, None)]) == 1  # evicts the oldest
        assert store.usage() == (3 * SIZE, 3)
        assert store.get(obj(3), 0) == block(3, 0)
    finally:
        store.close()
