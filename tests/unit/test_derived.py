"""The cache of decoded values (derived objects) over the shared disk store: bytes always
equal what the maker makes, warm reads make nothing, damaged files are made again."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcorfs.cache import slots
from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.derived import DerivedCache, derived_id, is_derived, source_key
from dcorfs.cache.diskstore import DiskStore, read_inventory
from dcorfs.cache.identity import ObjectId
from dcorfs.cache.prefetch import (
    CHUNK_ALIGNED_UP_TO,
    DECODED_BLOCK,
    DISK_PARTS_FROM,
    decoded_block,
)
from dcorfs.cache.slots import Layout

SOURCE = ObjectId(key="circle-c/resource/abc/def/ghi", etag="e1", size=1000)
TRUTH = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
BLOCK = 4096  # of the derived cache; the store's own blocks are 1024
# an object's own block sizes (`ObjectId.block_size`): the cache's, and whole chunks of decoded
# values, which need not be multiples of 4 KiB (their slots on disk are)
OWN_SIZES = [BLOCK, 3000, 6000]


class Maker:
    """Makes bytes [start, stop) of TRUTH, counting what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, stop: int, deadline: float) -> bytes:
        self.calls.append((start, stop))
        return TRUTH[start:stop]


def deadline() -> float:
    return time.monotonic() + 10


def values_id(source: ObjectId = SOURCE, **changes: object) -> ObjectId:
    args: dict[str, object] = {
        "what": "rows/deform",
        "size": len(TRUTH),
        "facts": ("<f4", (12500,)),
        "block_size": BLOCK,
    }
    args.update(changes)
    return derived_id(
        source,
        str(args["what"]),
        int(args["size"]),  # type: ignore[call-overload]
        facts=args["facts"],  # type: ignore[arg-type]
        block_size=int(args["block_size"]),  # type: ignore[call-overload]
    )


def store(directory: Path, limit: int = 10 << 20) -> DiskStore:
    return DiskStore(directory, limit_bytes=limit, block_size=1024)


def derived(disk: DiskStore | None, maker: Maker, obj: ObjectId) -> DerivedCache:
    cache = DerivedCache(store=disk, block_size=BLOCK, memory_bytes=4 * BLOCK, parallel=3)
    cache.register(obj, maker)
    return cache


def test_identity_names_everything_the_bytes_depend_on() -> None:
    base = values_id()
    assert is_derived(base.key) and source_key(base.key) == SOURCE.key
    assert not is_derived(SOURCE.key) and source_key(SOURCE.key) == SOURCE.key
    assert values_id() == base
    others = [
        values_id(ObjectId(SOURCE.key, "e2", SOURCE.size)),  # a new version of the source
        values_id(ObjectId(SOURCE.key, SOURCE.etag, 1001)),
        values_id(ObjectId(SOURCE.key + "x", SOURCE.etag, SOURCE.size)),
        values_id(what="rows/area_um"),
        values_id(facts=("<f8", (12500,))),
        values_id(facts=("<f4", (12500, 2))),
        values_id(block_size=2 * BLOCK),
        values_id(size=len(TRUTH) - 1),
    ]
    assert len({o.identity for o in [base, *others]}) == len(others) + 1


@pytest.mark.parametrize("size", OWN_SIZES)
@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(TRUTH) + 100), st.integers(0, 3 * BLOCK)),
        min_size=1,
        max_size=12,
    )
)
def test_reads_equal_the_truth_cold_and_warm(size: int, reads: list[tuple[int, int]]) -> None:
    import tempfile

    obj = values_id(block_size=size)
    assert obj.block_size == size
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in ("cold", "warm after a restart"):
            disk, maker = store(Path(tmp)), Maker()
            cache = derived(disk, maker, obj)
            try:
                for offset, length in reads:
                    got = cache.read(obj, offset, offset + length, deadline=deadline())
                    assert got == TRUTH[offset : offset + length], round_
                    peeked = cache.peek(obj, offset, offset + length)
                    assert peeked is None or peeked == TRUTH[offset : offset + length]
            finally:
                cache.close()
                disk.close()
            # made in whole blocks of the object's own size
            assert all(a % size == 0 and (b % size == 0 or b == len(TRUTH)) for a, b in maker.calls)
            if round_ != "cold":
                assert maker.calls == []  # everything read before came from the disk store


@pytest.mark.parametrize("size", OWN_SIZES)
def test_damaged_files_are_made_again(tmp_path: Path, size: int) -> None:
    obj = values_id(block_size=size)
    disk, maker = store(tmp_path / "cache"), Maker()
    cache = derived(disk, maker, obj)
    assert cache.read(obj, 0, len(TRUTH), deadline=deadline()) == TRUTH
    cache.close()
    disk.close()
    layout = Layout.of(obj, size)
    path = tmp_path / "cache" / "objects" / layout.name
    assert path.exists() and all(layout.data_at(i) % 4096 == 0 for i in range(layout.blocks))
    last = layout.blocks - 1
    raw = bytearray(path.read_bytes())
    fd = os.open(path, os.O_RDONLY)
    assert slots.present(fd, layout) == list(range(last + 1))
    os.close(fd)
    raw[layout.data_at(0) + 7] ^= 0x40  # block 0: flipped
    raw[layout.entry_at(3) : layout.entry_at(4)] = bytes(layout.entry_size)  # 3: missing
    raw[layout.entry_at(5) : layout.entry_at(6)] = raw[layout.entry_at(6) : layout.entry_at(7)]
    path.write_bytes(raw[: layout.data_at(last) + 10])  # 5: misplaced; the last: truncated
    disk, maker = store(tmp_path / "cache"), Maker()
    cache = derived(disk, maker, obj)
    try:
        assert cache.read(obj, 0, len(TRUTH), deadline=deadline()) == TRUTH
        remade = {start // size for start, _ in maker.calls}
        assert remade == {0, 3, 5, last}  # exactly the damaged blocks, nothing else
        assert cache.stats().errors == 3  # the missing one is no damage
    finally:
        cache.close()
        disk.close()


def test_one_size_bound_for_remote_and_decoded_blocks(tmp_path: Path) -> None:
    limit = 45_000
    disk = store(tmp_path / "cache", limit=limit)
    remote = BlockCache(
        fetch=lambda obj, a, b, d: bytes(b - a), store=disk, block_size=1024, parallel=1
    )
    source = ObjectId(key=SOURCE.key, etag=SOURCE.etag, size=8 * 1024)
    obj = values_id(source)
    cache = derived(disk, Maker(), obj)
    try:
        remote.read(source, 0, source.size, deadline=deadline())
        assert cache.read(obj, 0, len(TRUTH), deadline=deadline()) == TRUTH
        assert disk.usage()[0] <= limit
        blocks = {bool(is_derived(o.key or "")): o.blocks for o in read_inventory(disk.directory)}
        assert blocks[True] > 0 and blocks.get(False, 0) < 8  # the older remote blocks went first
    finally:
        cache.close()
        remote.close()
        disk.close()


def test_recalling_stored_values_reads_the_disk_and_makes_nothing(tmp_path: Path) -> None:
    obj, other = values_id(), values_id(what="rows/area_um")
    disk, maker = store(tmp_path / "cache"), Maker()
    cache = derived(disk, maker, obj)
    cache.read(obj, 0, 3 * BLOCK, deadline=deadline())  # 3 of 13 blocks on disk
    cache.close()
    disk.close()
    disk, maker = store(tmp_path / "cache"), Maker()
    cache = DerivedCache(store=disk, block_size=BLOCK, memory_bytes=len(TRUTH), parallel=3)
    cache.register(obj, maker)
    try:
        assert cache.recall_stored([other, obj, obj]) == [other, obj]  # not all stored
        assert maker.calls == []
        assert cache.peek(obj, 0, 3 * BLOCK) == TRUTH[: 3 * BLOCK]  # now in memory
        assert cache.peek(obj, 0, 4 * BLOCK) is None
        cache.read(obj, 0, len(TRUTH), deadline=deadline())
        assert cache.recall_stored([obj]) == [] and cache.peek(obj, 0, len(TRUTH)) == TRUTH
    finally:
        cache.close()
        disk.close()


def test_unregistered_objects_are_an_error_not_bytes(tmp_path: Path) -> None:
    cache = DerivedCache(store=None, block_size=BLOCK)
    try:
        with pytest.raises(Exception, match="not registered"):
            cache.read(values_id(), 0, 10, deadline=deadline())
    finally:
        cache.close()


def test_a_renewed_index_adopts_the_decoded_values(tmp_path: Path) -> None:
    """Decoded values live in block files of their own block size, named like any block: a
    damaged index is renewed with them kept, and a warm read makes nothing."""
    from dcorfs.cache import cachedir

    from .test_blockcache import garbage

    obj = values_id()
    disk = store(tmp_path / "cache")
    cache = derived(disk, Maker(), obj)
    try:
        assert cache.read(obj, 0, len(TRUTH), deadline=deadline()) == TRUTH
    finally:
        cache.close()
        disk.close()
    garbage(tmp_path / "cache" / cachedir.INDEX)
    disk, maker = store(tmp_path / "cache"), Maker()
    cache = derived(disk, maker, obj)
    try:
        assert disk.usage()[1] == -(-len(TRUTH) // BLOCK)
        assert cache.read(obj, 0, len(TRUTH), deadline=deadline()) == TRUTH
        assert maker.calls == [] and cache.stats().errors == 0
    finally:
        cache.close()
        disk.close()


@given(st.integers(0, 3 * CHUNK_ALIGNED_UP_TO))
def test_decoded_blocks_hold_whole_chunks_near_the_usual_size(chunk: int) -> None:
    block = decoded_block(chunk)
    if chunk == 0 or chunk > CHUNK_ALIGNED_UP_TO:  # not chunked, or chunks too large to hold
        assert block == DECODED_BLOCK
    elif chunk >= DECODED_BLOCK:
        assert block == chunk
    else:
        assert block % chunk == 0 and DECODED_BLOCK / 2 <= block <= DECODED_BLOCK * 3 / 2
    assert block >= DISK_PARTS_FROM  # short reads of it on disk read only their pages
