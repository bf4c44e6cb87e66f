"""The disk store's object files (cache/slots.py): short reads check only their pages, space of
evicted blocks comes back, what a crash or an earlier layout leaves is cleaned up, and large
blocks are written past the page cache where the filesystem allows it."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dcorfs.cache import cachedir, diskstore, slots
from dcorfs.cache.derived import DerivedCache
from dcorfs.cache.diskstore import DiskStore
from dcorfs.cache.identity import ObjectId
from dcorfs.cache.slots import PAGE, Damaged, Layout

from ..mounts import resident

BLOCK = 4 * PAGE
DATA = os.urandom(5 * BLOCK + 3 * PAGE + 17)
OBJ = ObjectId(key="circle-x/resource/abc/def/ghi#rows/image", etag="d1", size=len(DATA))
LAYOUT = Layout.of(OBJ, BLOCK)


def blocks(data: bytes = DATA) -> dict[int, bytes]:
    return {i: data[i * BLOCK : (i + 1) * BLOCK] for i in range(-(-len(data) // BLOCK))}


def file_of(cache: Path, obj: ObjectId = OBJ) -> Path:
    return cache / cachedir.OBJECTS / Layout.of(obj, BLOCK).name


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(raw)


def test_layout_names_parse_back_and_others_do_not() -> None:
    assert Layout.parse(LAYOUT.name) == LAYOUT
    digest = OBJ.identity.hex()
    for name in (f"{digest[:2]}/{digest}-3", f"zz/{digest}.{BLOCK}.9", "ab/ab.1.2", "x"):
        assert Layout.parse(name) is None
    assert diskstore.split_name(f"{LAYOUT.name}-4") == (LAYOUT, 4)
    assert diskstore.split_name(f"{digest[:2]}/{digest}-4") is None  # the earlier layout
    assert LAYOUT.table % 4096 == 0 and LAYOUT.data_at(0) == LAYOUT.table
    assert LAYOUT.length(LAYOUT.blocks - 1) == len(DATA) - 5 * BLOCK


def test_a_layout_is_made_once_per_object_and_block_size() -> None:
    """Every read of a block asks for its object's layout: the same one, its name and offsets
    worked out once; another block size or another version of the object is another."""
    first = Layout.of(OBJ, BLOCK)
    again = ObjectId(key=OBJ.key, etag=OBJ.etag, size=OBJ.size)
    assert Layout.of(again, BLOCK) is first and first == LAYOUT
    assert Layout.of(OBJ, 2 * BLOCK) == Layout(OBJ.identity, 2 * BLOCK, OBJ.size)
    assert Layout.of(OBJ, 2 * BLOCK).name != LAYOUT.name
    other = ObjectId(key=OBJ.key, etag="d2", size=OBJ.size)
    assert Layout.of(other, BLOCK).identity == other.identity != OBJ.identity


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 5), st.integers(0, BLOCK), st.integers(0, BLOCK))
@example(5, BLOCK, BLOCK)  # nothing, past the end of the shorter last block
def test_any_part_of_a_block_reads_back(index: int, a: int, b: int) -> None:
    start, stop = min(a, b), max(a, b)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dcorfs-slots-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        slots.write(fd, LAYOUT, index, blocks()[index])
        part = slots.read(fd, LAYOUT, index, start, stop)
        assert part == blocks()[index][start:stop]
        assert slots.read(fd, LAYOUT, (index + 1) % 6) is None  # never written: a hole
    finally:
        os.close(fd)
        path.unlink()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3), st.integers(0, PAGE - 1), st.integers(1, 3))
def test_a_read_names_the_damaged_page_and_notices_pages_out_of_order(
    page: int, byte: int, other: int
) -> None:
    """A read checks all its pages in one CRC against their CRCs joined (`slots._joined`):
    a flipped bit in any page is still found and named, and so are two pages swapped (each
    page intact, so only their order is wrong)."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dcorfs-slots-damage-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        slots.write(fd, LAYOUT, 1, blocks()[1])
        at = LAYOUT.data_at(1) + page * PAGE
        good = os.pread(fd, BLOCK, LAYOUT.data_at(1))
        os.pwrite(fd, bytes([good[page * PAGE + byte] ^ 0x01]), at + byte)
        with pytest.raises(Damaged, match=f"page {page} fails its CRC"):
            slots.read(fd, LAYOUT, 1)
        swap = (page + other) % 4  # another page of the block
        os.pwrite(fd, good[swap * PAGE : (swap + 1) * PAGE], at)
        os.pwrite(fd, good[page * PAGE : (page + 1) * PAGE], LAYOUT.data_at(1) + swap * PAGE)
        with pytest.raises(Damaged, match="fails its CRC"):
            slots.read(fd, LAYOUT, 1)
        os.pwrite(fd, good, LAYOUT.data_at(1))
        assert slots.read(fd, LAYOUT, 1) == blocks()[1]
    finally:
        os.close(fd)
        path.unlink()


ODD = 3 * PAGE + 1000  # a block size off the filesystem's blocks: slots with gaps between
ODD_LAYOUT = Layout.of(OBJ, ODD)  # (OBJ's data in 8 such blocks, the last one short)


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from([LAYOUT, ODD_LAYOUT]),
    st.sets(st.integers(0, 7)),
    st.integers(0, 7),
    st.integers(1, 8),
    st.sampled_from([None, 1000, PAGE]),
)
@example(LAYOUT, {0, 1, 2, 3, 4, 5}, 0, 6, None)  # all of them, the short last block too
@example(ODD_LAYOUT, set(range(8)), 0, 8, 1000)  # every gap, reads cut short
@example(LAYOUT, set(), 0, 6, None)  # none stored: nothing but the entries read
def test_a_run_of_blocks_reads_as_each_block_alone(
    layout: Layout, stored: set[int], first: int, count: int, most: int | None
) -> None:
    """`read_run` gives every block `read` gives, each a read-only buffer of its own, reads the
    slots of stored blocks only (one read per stretch of them, more where the kernel reads
    less than asked: `most` bytes a call) and names no failure."""
    first = min(first, layout.blocks - 1)
    count = min(count, layout.blocks - first)
    size = layout.block_size
    data = [DATA[i * size : (i + 1) * size] for i in range(layout.blocks)]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dcorfs-slots-run-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    reads: list[int] = []
    real_preadv = os.preadv

    def counted(fd: int, buffers: Any, offset: int) -> int:
        reads.append(offset)
        if most is None:
            return real_preadv(fd, buffers, offset)
        part = os.pread(fd, min(most, sum(len(b) for b in buffers)), offset)
        at = 0
        for buffer in buffers:
            n = min(len(buffer), len(part) - at)
            buffer[:n] = part[at : at + n]
            at += n
        return len(part)

    try:
        for index in sorted(stored):
            if index < layout.blocks:
                slots.write(fd, layout, index, data[index])
        os.preadv = counted
        try:
            found, failed = slots.read_run(fd, layout, first, count)
        finally:
            os.preadv = real_preadv
        indices = range(first, first + count)
        assert found == [slots.read(fd, layout, index) for index in indices]
        assert found == [data[i] if i in stored else None for i in indices]
        assert failed == []
        assert all(isinstance(b, memoryview) and b.readonly for b in found if b is not None)
        if most is None:
            starts = [i for i in indices if i in stored and (i - 1 not in stored or i == first)]
            assert len(reads) == len(starts)
    finally:
        os.close(fd)
        path.unlink()


def test_a_run_of_more_blocks_than_one_read_takes_buffers_reads_them_all(tmp_path: Path) -> None:
    """A stretch of more buffers (blocks and the gaps between their slots) than one `preadv`
    takes (1024) is read in several."""
    size = 1000  # (gaps of 3096 bytes: two buffers a block)
    data = os.urandom(700 * size)
    obj = ObjectId(key="circle-x/resource/abc/def/ghi#many", etag="d1", size=len(data))
    layout = Layout.of(obj, size)
    fd = os.open(tmp_path / "many", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for index in range(700):
            slots.write(fd, layout, index, data[index * size : (index + 1) * size])
        found, failed = slots.read_run(fd, layout, 0, 700)
        assert failed == [] and b"".join(b for b in found if b is not None) == data
    finally:
        os.close(fd)


def test_a_short_read_reads_and_checks_only_its_pages(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 30, block_size=BLOCK)
    assert store.put_many(OBJ, blocks()) == 6
    flip(file_of(tmp_path / "cache"), LAYOUT.data_at(2) + 2 * PAGE + 100)  # page 2 of block 2
    one = blocks()[2]
    assert store.get(OBJ, 2, start=10, stop=PAGE + 10) == one[10 : PAGE + 10]  # pages 0-1
    assert store.get(OBJ, 2, start=3 * PAGE, stop=BLOCK) == one[3 * PAGE :]  # page 3
    assert store.errors == 0
    assert store.get(OBJ, 2, start=2 * PAGE + 99, stop=2 * PAGE + 101) is None  # page 2
    assert store.errors == 1
    assert store.get(OBJ, 2, start=0, stop=10) is None  # a miss from then on
    assert store.errors == 1
    store.settle()  # erased
    # (accounted as the disk space blocks take: the last, short one in whole pages)
    assert store.usage() == (4 * BLOCK + slots.footprint(len(DATA) - 5 * BLOCK), 5)
    assert store.get(OBJ, 5) == blocks()[5]  # its neighbours are whole
    store.close()


@pytest.mark.parametrize("own", [0, 1_040_000], ids=["1 MiB", "whole chunks of 1,040,000"])
def test_a_short_read_of_a_large_block_on_disk_keeps_nothing_in_memory(
    tmp_path: Path, own: int
) -> None:
    """DerivedCache over a disk store: a short read of a stored block reads its pages only (a
    damaged page elsewhere in the block does not stop it), and is not kept in memory; also
    where the object's own blocks are no multiple of a page (slots start on 4 KiB)."""
    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 30, block_size=1024)
    size = own or 1 << 20
    large = ObjectId(key=OBJ.key, etag="d2", size=4 * size, block_size=own)
    truth = os.urandom(large.size)
    made: list[tuple[int, int]] = []

    def make(start: int, stop: int, deadline: float) -> bytes:
        made.append((start, stop))
        return truth[start:stop]

    first = DerivedCache(store=store, block_size=1 << 20)
    first.register(large, make)
    assert first.read(large, 0, large.size, deadline=time.monotonic() + 10) == truth
    first.close()
    layout = Layout.of(large, size)
    flip(tmp_path / "cache" / cachedir.OBJECTS / layout.name, layout.data_at(1) + 5 * PAGE)
    second = DerivedCache(store=store, block_size=1 << 20)
    second.register(large, make)
    made.clear()
    at = size + 9 * PAGE - 50  # 128 KiB over pages 8-13 of block 1 (page 5 is damaged)
    assert (
        second.read(large, at, at + (128 << 10), deadline=time.monotonic() + 10)
        == (truth[at : at + (128 << 10)])
    )
    assert made == [] and store.errors == 0
    assert second.stats().memory_bytes == 0 and second.stats().disk_hits == 1
    at = 3 * size - 1000  # over blocks 2 and 3: parts of both
    assert (
        second.read(large, at, at + 2000, deadline=time.monotonic() + 10) == truth[at : at + 2000]
    )
    assert made == [] and second.stats().disk_hits == 3
    whole = second.read(large, size, 2 * size, deadline=time.monotonic() + 10)
    assert whole == truth[size : 2 * size]  # a whole read finds the damage, and remakes
    assert made == [(size, 2 * size)] and store.errors == 1
    second.close()
    store.close()


def on_disk(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_evicted_blocks_give_their_space_back_and_empty_files_go(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = DiskStore(cache, limit_bytes=3 * BLOCK, block_size=BLOCK)
    path = file_of(cache)
    store.put_many(OBJ, {i: blocks()[i] for i in range(3)})
    full = on_disk(path)
    assert full >= 3 * BLOCK
    store.put_many(OBJ, {i: blocks()[i] for i in range(3, 5)})  # evicts blocks 0 and 1
    assert [store.get(OBJ, i) is not None for i in range(5)] == [False, False, True, True, True]
    assert on_disk(path) <= full + 4096  # three blocks' space (the entry table's page apart)
    other = ObjectId(key="other", etag="e", size=3 * BLOCK)
    store.put_many(other, {i: DATA[i * BLOCK : (i + 1) * BLOCK] for i in range(3)})
    assert not path.exists()  # all its blocks evicted: the file went
    assert store.usage() == (3 * BLOCK, 3)
    store.close()


def test_evicted_blocks_of_a_size_off_the_page_give_all_their_pages_back(tmp_path: Path) -> None:
    """Blocks whose size is no multiple of 4 KiB (whole HDF5 chunks of decoded values): an
    evicted one leaves no page behind (its last page is part of its slot)."""
    odd = 3 * PAGE + 1000
    obj = ObjectId(key="odd", etag="e", size=4 * odd)
    layout = Layout.of(obj, odd)
    data = os.urandom(obj.size)
    cache = tmp_path / "cache"
    store = DiskStore(cache, limit_bytes=4 * slots.footprint(odd), block_size=odd)
    store.put_many(obj, {i: data[i * odd : (i + 1) * odd] for i in range(4)})
    other = ObjectId(key="other", etag="e", size=3 * odd)
    store.put_many(other, {i: os.urandom(odd) for i in range(3)})  # evicts 3 of the 4
    assert [store.get(obj, i) is not None for i in range(4)] == [False, False, False, True]
    path = cache / cachedir.OBJECTS / layout.name
    assert on_disk(path) <= layout.table + layout.stride, on_disk(path)
    store.close()


def test_without_holes_eviction_takes_whole_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slots, "can_punch", lambda directory: False)
    cache = tmp_path / "cache"
    store = DiskStore(cache, limit_bytes=4 * BLOCK, block_size=BLOCK)
    store.put_many(OBJ, {i: blocks()[i] for i in range(3)})
    other = ObjectId(key="other", etag="e", size=2 * BLOCK)
    store.put_many(other, {i: DATA[i * BLOCK : (i + 1) * BLOCK] for i in range(2)})
    assert not file_of(cache).exists()  # one block had to go: its file went, all of it
    assert store.usage() == (2 * BLOCK, 2)
    assert sum(on_disk(p) for p in (cache / cachedir.OBJECTS).rglob("*.*")) <= 2 * BLOCK + 4096
    store.close()


def test_opening_cleans_up_after_a_crash_and_an_earlier_layout(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = DiskStore(cache, limit_bytes=1 << 30, block_size=BLOCK)
    store.put_many(OBJ, blocks())
    store.close()
    path = file_of(cache)
    long_ago = time.time() - 3600
    with sqlite3.connect(cache / cachedir.INDEX) as db:
        db.execute("UPDATE blocks SET used=?", (long_ago,))
        # a block stored whose row is gone (evicted while it was written, then a crash) …
        db.execute("DELETE FROM blocks WHERE name=?", (f"{LAYOUT.name}-1",))
        # … and a row of the earlier layout, with its block file
        db.execute("INSERT INTO blocks VALUES (?, ?, ?)", ("ab/" + "ab" * 32 + "-0", 9, long_ago))
    fd = os.open(path, os.O_RDWR)
    slots.erase(fd, LAYOUT, 4, punch=True)  # a row whose block is not stored (crash)
    os.close(fd)
    os.utime(path, (long_ago, long_ago))
    (cache / cachedir.LEGACY_BLOCKS / "ab").mkdir(parents=True)
    (cache / cachedir.LEGACY_BLOCKS / "ab" / ("ab" * 32 + "-0")).write_bytes(b"x" * 9)
    orphan = ObjectId(key="orphan", etag="e", size=BLOCK)
    orphan_file = file_of(cache, orphan)
    orphan_file.parent.mkdir(exist_ok=True)
    orphan_file.write_bytes(b"")
    os.utime(orphan_file, (long_ago, long_ago))
    store = DiskStore(cache, limit_bytes=1 << 30, block_size=BLOCK)
    try:
        stored = [store.get(OBJ, i) is not None for i in range(6)]
        assert stored == [True, False, True, True, False, True]
        assert store.usage() == (3 * BLOCK + slots.footprint(len(DATA) - 5 * BLOCK), 4)
        fd = os.open(path, os.O_RDONLY)
        assert slots.present(fd, LAYOUT) == [0, 2, 3, 5]  # the block without a row: erased
        os.close(fd)
        assert not (cache / cachedir.LEGACY_BLOCKS).exists() and not orphan_file.exists()
    finally:
        store.close()


def test_a_damaged_entry_is_damage_and_an_empty_one_is_not() -> None:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dcorfs-entry-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        slots.write(fd, LAYOUT, 0, blocks()[0])
        assert slots.read(fd, LAYOUT, 1) is None
        os.pwrite(fd, b"\1", LAYOUT.entry_at(0) + 4)  # the identity prefix
        with pytest.raises(Damaged, match="another block"):
            slots.read(fd, LAYOUT, 0)
        with pytest.raises(ValueError):
            slots.write(fd, LAYOUT, 0, b"short")
    finally:
        os.close(fd)
        path.unlink()


def test_without_holes_one_object_larger_than_the_cache_stays_within_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming one object larger than the cache evicts its own older blocks: without
    holes, only a new file gives their space back (the file is not kept growing)."""
    monkeypatch.setattr(slots, "can_punch", lambda directory: False)
    cache = tmp_path / "cache"
    store = DiskStore(cache, limit_bytes=2 * BLOCK, block_size=BLOCK)
    big = ObjectId(key="big", etag="e", size=12 * BLOCK)
    for index in range(12):
        store.put_many(big, {index: DATA[:BLOCK]})
        allocated = sum(on_disk(p) for p in (cache / cachedir.OBJECTS).rglob("*.*"))
        assert allocated <= 2 * BLOCK + 2 * 4096, (index, allocated)
    assert store.get(big, 11) == DATA[:BLOCK] and store.usage()[0] <= 2 * BLOCK
    store.close()


def test_a_block_evicted_while_it_is_read_is_a_miss_not_damage(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 30, block_size=BLOCK)
    store.put_many(OBJ, blocks())
    real_read = slots.read

    def evicted_meanwhile(fd: int, layout: Layout, index: int, *args: int | None) -> bytes | None:
        """Another process evicts the block between the reader's entry and data reads: the
        data read back are a hole, then the entry is zeroed too."""
        other = os.open(file_of(tmp_path / "cache"), os.O_RDWR)
        try:
            slots.punch_hole(other, layout.data_at(index), layout.length(index))
            try:
                return real_read(fd, layout, index, *args)
            except Damaged:
                slots.erase(other, layout, index, punch=True)
                raise
        finally:
            os.close(other)

    slots.read = evicted_meanwhile  # type: ignore[assignment]
    try:
        assert store.get(OBJ, 1) is None
    finally:
        slots.read = real_read
    assert store.errors == 0
    assert store.get(OBJ, 2) == blocks()[2]
    store.close()


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a local disk: the test's own, or where that is tmpfs (as /tmp is on
    some systems) one under /var/tmp."""
    if slots.can_direct(tmp_path) or not Path("/var/tmp").is_dir():
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="dcorfs-test-") as made:
        yield Path(made)


def direct_writes_skip_the_page_cache(directory: Path) -> None:
    """Skip (saying why) unless a block written past the page cache in `directory` really
    leaves no page of it there, measured."""
    if not slots.can_direct(directory):
        kind = slots.LOCAL_DISK.get(slots.filesystem_type(directory) or 0, "not a local disk's")
        pytest.skip(f"the filesystem of {directory} ({kind}) is not written with O_DIRECT")
    if shutil.which("fincore") is None:
        pytest.skip("util-linux's fincore is not installed")
    probe = directory / "probe"
    with probe.open("wb") as handle:
        slots._write_direct(handle.fileno(), bytes(1 << 20), 0)
    if resident(probe):
        pytest.skip(f"the filesystem of {directory} keeps O_DIRECT writes in the page cache")
    probe.unlink()


class Counted:
    """`slots._write_direct`, counting its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._real = slots._write_direct
        monkeypatch.setattr(slots, "_write_direct", self)

    def __call__(self, fd: int, data: bytes, offset: int) -> None:
        self.calls += 1
        self._real(fd, data, offset)


@pytest.mark.parametrize("size", [1 << 20, 1_000_000], ids=["1 MiB", "1,000,000 bytes"])
def test_large_blocks_are_written_past_the_page_cache_small_ones_through_it(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Blocks of a size off the 4 KiB grid too (whole chunks of decoded values)."""
    tmp_path = disk_dir
    direct_writes_skip_the_page_cache(tmp_path)
    data = os.urandom(3 * size - 1000)  # the last block ends within a filesystem block
    large = ObjectId(key="large", etag="e", size=len(data))
    small = ObjectId(key="small", etag="e", size=len(DATA))
    cache = tmp_path / "cache"
    store = DiskStore(cache, limit_bytes=1 << 30, block_size=size, direct_from=size // 2)
    written = Counted(monkeypatch)  # (after the store's own probe)
    store.put_many(large, {i: data[i * size : (i + 1) * size] for i in [1, 2, 0]})
    store.put_many(small, blocks(), block_size=BLOCK)
    assert written.calls == 3
    layout = Layout.of(large, size)
    path = cache / cachedir.OBJECTS / layout.name
    assert resident(path) <= layout.table  # its entries only: written through the page cache
    assert resident(file_of(cache, small)) >= len(DATA)
    assert b"".join(store.get(large, i) or b"" for i in range(3)) == data
    assert [store.get(small, i, block_size=BLOCK) for i in range(6)] == list(blocks().values())
    end = layout.data_at(2) + layout.length(2)
    with path.open("rb") as handle:  # the padding: the same zeros as a hole's
        assert os.pread(handle.fileno(), 8192, end) == bytes(slots.footprint(end) - end)
    store.close()


@pytest.mark.parametrize("together", [False, True], ids=["read alone", "read in one run"])
@pytest.mark.parametrize("direct_from", [None, 1], ids=["through", "past the page cache"])
def test_damage_is_found_however_blocks_were_written(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch, direct_from: int | None, together: bool
) -> None:
    """Flipped, truncated, misplaced and missing blocks written either way, read one by one
    or all in one run (`DiskStore.get_run`: the same blocks, the same damage counted)."""
    tmp_path = disk_dir
    if direct_from is not None:
        direct_writes_skip_the_page_cache(tmp_path)
    cache = tmp_path / "cache"
    store = DiskStore(cache, limit_bytes=1 << 30, block_size=BLOCK, direct_from=direct_from)
    written = Counted(monkeypatch)  # (after the store's own probe)
    assert store.put_many(OBJ, blocks()) == 6
    assert written.calls == (0 if direct_from is None else 6)
    store.close()
    path = file_of(cache)
    raw = bytearray(path.read_bytes())
    raw[LAYOUT.data_at(0) + PAGE + 7] ^= 0x01  # block 0: a bit of its second page
    raw[LAYOUT.entry_at(1) : LAYOUT.entry_at(2)] = bytes(LAYOUT.entry_size)  # 1: not stored
    raw[LAYOUT.data_at(2) : LAYOUT.data_at(3)] = raw[LAYOUT.data_at(3) : LAYOUT.data_at(4)]
    path.write_bytes(raw[: LAYOUT.data_at(5) + 100])  # 5 (the last): truncated
    store = DiskStore(cache, limit_bytes=1 << 30, block_size=BLOCK, direct_from=direct_from)
    got = store.get_run(OBJ, 0, 6) if together else [store.get(OBJ, i) for i in range(6)]
    assert got == [None, None, None, blocks()[3], blocks()[4], None]
    assert store.errors == 3  # damage, not the block never stored
    assert store.get_run(OBJ, 0, 6) == got  # (found damaged: misses, not counted again)
    assert store.errors == 3
    raw[LAYOUT.data_at(0) + PAGE + 7] ^= 0x01  # block 0 mended before its erasure: …
    path.write_bytes(raw[: LAYOUT.data_at(5) + 100])
    assert store.get_run(OBJ, 0, 1) == [None]  # … a miss until erased, however it reads
    assert store.get(OBJ, 0) is None and store.errors == 3
    store.close()


def open_object_files(cache: Path) -> list[str]:
    """The object files of the cache at `cache` this process holds open."""
    held = []
    for link in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # (one closed meanwhile)
            target = str(link.readlink())
            if target.startswith(str(cache / cachedir.OBJECTS)):
                held.append(target)
    return held


@pytest.mark.parametrize("where", ["switch", "write"])
def test_a_refused_write_past_the_page_cache_is_written_through_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """The probe passed, the file's filesystem refuses (EINVAL) the switch to O_DIRECT or the
    write itself (after part of the block was written): the block is stored all the same,
    and the store writes through the page cache from then on, saying so once."""
    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 30, block_size=BLOCK, direct_from=1)
    store._direct_from = 1  # as if the probe passed (it may not, where the tests run)
    caplog.clear()
    tried: list[int] = []
    real_pwrite = os.pwrite

    def refused(fd: int, *args: Any) -> Any:
        tried.append(fd)
        if where == "write":
            real_pwrite(fd, b"\xff" * 100, LAYOUT.data_at(0))  # a part written, then refused
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(slots, "_direct_io" if where == "switch" else "_write_direct", refused)
    with caplog.at_level(logging.WARNING, logger="dcorfs.cache.diskstore"):
        assert store.put_many(OBJ, blocks()) == 6
        other = ObjectId(key="other", etag="e", size=BLOCK)
        assert store.put_many(other, {0: DATA[:BLOCK]}) == 1
    assert open_object_files(tmp_path / "cache") == []
    assert len(tried) == 1 and [r.getMessage() for r in caplog.records] == [
        "cache writes past the page cache refused (Invalid argument): written through it"
    ]
    assert [store.get(OBJ, i) for i in range(6)] == list(blocks().values())
    assert store.get(other, 0) == DATA[:BLOCK]
    store.close()


def test_a_failed_write_past_the_page_cache_is_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any other error (a full disk) is the store's as for any write: nothing stored, the
    cache off for a while, and writes past the page cache not turned off."""
    store = DiskStore(tmp_path / "cache", limit_bytes=1 << 30, block_size=BLOCK, direct_from=1)
    store._direct_from = 1

    def full(fd: int, data: bytes, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(slots, "_write_direct", full)
    assert store.put_many(OBJ, blocks()) == 0
    assert open_object_files(tmp_path / "cache") == []
    assert store._direct_from == 1 and store.usage() == (0, 0)
    assert [store.get(OBJ, i) for i in range(6)] == [None] * 6
    store.close()
