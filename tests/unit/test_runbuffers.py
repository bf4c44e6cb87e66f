"""Reused buffers for runs of blocks read past the page cache (cache/runbuffers.py): a buffer
is never handed out while any view of it lives, runs read into them give the blocks written,
leave no page of the cache file behind, and are not kept in the memory tier."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dcorfs.cache import cachedir, diskstore, slots
from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.diskstore import DiskStore
from dcorfs.cache.identity import ObjectId
from dcorfs.cache.runbuffers import ALIGN, RunBuffers, pooled
from dcorfs.cache.slots import Layout

from ..mounts import resident
from .test_slots import direct_writes_skip_the_page_cache, disk_dir  # noqa: F401


def address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def stored(
    directory: Path, name: str, blocks: int, size: int = 1 << 20, **store: Any
) -> tuple[DiskStore, ObjectId, bytes]:
    """A disk store in `directory` holding an object of `blocks` blocks of `size` random bytes
    (the last `store.pop("short", 0)` bytes short), and those bytes."""
    data = os.urandom(blocks * size - store.pop("short", 0))
    obj = ObjectId(key=f"circle-x/resource/abc/def/{name}#rows/image", etag="e", size=len(data))
    disk = DiskStore(directory / "cache", limit_bytes=1 << 30, block_size=size, **store)
    disk.put_many(obj, {i: data[i * size : (i + 1) * size] for i in range(blocks)})
    return disk, obj, data


def on_disk_only(store: DiskStore, size: int = 1 << 20) -> BlockCache:
    """A block cache over `store` that must not fetch."""

    def fetch(*args: object) -> bytes:
        raise AssertionError("all on disk")

    return BlockCache(fetch=fetch, store=store, block_size=size, parallel=1)


def test_a_buffer_is_taken_again_only_once_no_view_of_it_lives() -> None:
    buffers = RunBuffers(64 << 10, most=2, spare=0)
    first = buffers.take(10_000)
    assert first is not None and address(first) % ALIGN == 0 and len(first) == 10_000
    first[:] = 1
    block = first[4096:8192]
    block.flags.writeable = False
    view = block.data  # (as `read_run` hands blocks on)
    part = view[100:200]  # (as a reply or a window cuts them)
    where = address(first)
    del first, block, view
    gc.collect()
    second = buffers.take(ALIGN)
    assert second is not None and address(second) != where  # the part holds the first one
    assert buffers.take(ALIGN) is None  # both in use, no third (`most`)
    second[:] = 2
    assert bytes(part) == b"\x01" * 100  # never written while a view of it lives
    del part
    again = buffers.take(ALIGN)
    assert again is not None and address(again) == where  # now unused: the same memory
    assert buffers.take((64 << 10) + 1) is None  # larger than a buffer


def test_at_most_spare_unused_buffers_are_kept() -> None:
    buffers = RunBuffers(ALIGN, most=5, spare=1)
    taken = [buffers.take(ALIGN) for _ in range(5)]
    assert all(t is not None for t in taken) and len(buffers) == 5
    del taken
    assert buffers.take(ALIGN) is not None and len(buffers) == 2  # the one taken, one spare


def test_trim_lets_every_unused_buffer_go() -> None:
    buffers = RunBuffers(ALIGN, most=4, spare=4)
    taken = [buffers.take(ALIGN) for _ in range(4)]
    kept = taken[1]
    del taken
    buffers.trim()
    assert len(buffers) == 1  # the one still referred to
    del kept
    buffers.trim()
    assert len(buffers) == 0


def test_a_run_read_past_the_page_cache_gives_the_blocks_in_a_reused_buffer(
    disk_dir: Path,  # noqa: F811
) -> None:
    """Blocks written past the page cache and read in runs (`DiskStore.get_run`): the blocks
    written, each a read-only view of the store's buffers, and no page of the file left in
    the page cache; a buffer still held by blocks is not used for the next run."""
    direct_writes_skip_the_page_cache(disk_dir)
    size = 3 * 100_000 + 5  # (slots off the 4 KiB grid, as decoded chunks make them)
    store, obj, data = stored(disk_dir, "run", 8, size, direct_from=size // 2, short=77)
    path = disk_dir / "cache" / cachedir.OBJECTS / Layout.of(obj, size).name
    first = store.get_run(obj, 0, 4, pooled=True)
    assert all(pooled(b) and isinstance(b, memoryview) and b.readonly for b in first)
    assert b"".join(b for b in first if b is not None) == data[: 4 * size]
    assert resident(path) <= Layout.of(obj, size).table  # the entries only
    rest = store.get_run(obj, 4, 4, pooled=True)  # (another buffer: the first run's blocks live)
    assert b"".join(b for b in rest if b is not None) == data[4 * size :]
    assert b"".join(b for b in first if b is not None) == data[: 4 * size]
    store.close()


def test_without_a_free_buffer_a_run_is_read_into_buffers_of_its_own(
    disk_dir: Path,  # noqa: F811
) -> None:
    direct_writes_skip_the_page_cache(disk_dir)
    size = 1 << 20
    store, obj, data = stored(disk_dir, "busy", 4)
    held = [store.get_run(obj, 0, 2, pooled=True) for _ in range(4)]  # all (`most`, 4) in use
    assert all(pooled(b) for run in held for b in run)
    more = store.get_run(obj, 2, 2, pooled=True)
    assert not any(pooled(b) for b in more) and b"".join(more) == data[2 * size :]  # type: ignore[arg-type]
    assert all(b"".join(run) == data[: 2 * size] for run in held)  # type: ignore[arg-type]
    store.close()


def test_blocks_of_a_run_read_past_the_page_cache_are_not_kept_in_memory(
    disk_dir: Path,  # noqa: F811
) -> None:
    """They would hold their whole buffer from being used again (the memory tier counts a
    block, not its buffer): a read of them finds them on disk again; `ensure`, which wants
    them in memory, reads them into buffers of their own."""
    direct_writes_skip_the_page_cache(disk_dir)
    store, obj, data = stored(disk_dir, "kept", 3)
    cache = on_disk_only(store)
    pieces = cache.read_pieces(obj, 0, len(data), deadline=1e12)
    assert any(pooled(p) for p in pieces) and b"".join(pieces) == data
    assert cache.stats().memory_bytes == 0
    cache.ensure(obj, [(0, len(data))], deadline=1e12)
    assert cache.stats().memory_bytes == len(data)
    assert store.run_buffers.stats()["runs"] == 1  # the first read's alone
    kept = cache.read_pieces(obj, 0, len(data), deadline=1e12)
    assert not any(pooled(p) for p in kept) and b"".join(kept) == data
    store.close()


def test_recall_stored_reads_runs_into_buffers_of_their_own(disk_dir: Path) -> None:  # noqa: F811
    store, obj, data = stored(disk_dir, "recall", 3)
    cache = on_disk_only(store)
    assert cache.recall_stored([obj]) == []
    assert cache.stats().memory_bytes == len(data)
    assert store.run_buffers.stats()["runs"] == 0
    store.close()


def test_unused_buffers_go_at_a_settling_due_after_runs(
    disk_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A settling is due `TOUCH_EVERY` seconds after the first run read into the buffers (the
    disk writer sleeps until then, woken by the read), lets the unused ones go, is due again
    while some are in use, and not at all once none is left."""
    direct_writes_skip_the_page_cache(disk_dir)
    monkeypatch.setattr(diskstore, "TOUCH_EVERY", 0.2)
    store, obj, _ = stored(disk_dir, "settle", 4)
    store.settle()  # (what the writes left)
    assert store.settle_in() is None
    woken: list[int] = []
    store.on_unsettled = lambda: woken.append(1)
    held = store.get_run(obj, 0, 2, pooled=True)
    dropped = store.get_run(obj, 2, 2, pooled=True)
    assert all(pooled(b) for b in held + dropped) and woken
    due = store.settle_in()
    assert due is not None and 0.0 < due <= 0.2
    del dropped
    time.sleep(0.25)
    assert store.settle_in() == 0.0
    store.settle()
    assert len(store.run_buffers) == 1  # the one still held
    due = store.settle_in()
    assert due is not None and due > 0.1
    del held
    time.sleep(0.25)
    store.settle()
    assert len(store.run_buffers) == 0 and store.settle_in() is None
    store.close()


def test_a_refused_direct_read_is_read_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that takes O_DIRECT writes but refuses a read (EINVAL): the run is read as
    without, the same blocks."""
    size = 1 << 20
    data = os.urandom(3 * size)
    obj = ObjectId(key="circle-x/resource/abc/def/refused#rows/image", etag="e", size=len(data))
    layout = Layout.of(obj, size)
    fd = os.open(tmp_path / "refused", os.O_RDWR | os.O_CREAT, 0o600)
    real_preadv = os.preadv

    def refuse(fd: int, buffers: object, offset: int) -> int:
        if fd == refused:
            raise OSError(22, "Invalid argument")
        return real_preadv(fd, buffers, offset)  # type: ignore[arg-type]

    try:
        for index in range(3):
            slots.write(fd, layout, index, data[index * size : (index + 1) * size])
        refused = os.dup(fd)
        monkeypatch.setattr(os, "preadv", refuse)
        buffers = RunBuffers(4 << 20)
        found, failed = slots.read_run(fd, layout, 0, 3, direct=(refused, buffers))
        assert failed == [] and not any(pooled(b) for b in found)
        assert b"".join(b for b in found if b is not None) == data
        assert buffers.refused  # (the store reads no more runs past the page cache)
        os.close(refused)
    finally:
        os.close(fd)
