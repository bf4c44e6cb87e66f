"""The chunk index read ahead (hdf5/chunkindex.py): every byte h5py reads to list a dataset's
chunks was fetched before, a level of the B-tree per batch; layouts it does not read are
said so, never guessed."""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
import pytest

from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.identity import ObjectId
from dcorfs.hdf5 import rtdc
from dcorfs.hdf5.chunkindex import UNDEFINED, NotFollowed, index_nodes, messages
from dcorfs.hdf5.rtdc import RemoteFile, RtdcSource


class Recording(io.BytesIO):
    """A file object that remembers the byte ranges read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[tuple[int, int]] = []

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        start = self.tell()
        n = super().readinto(buffer)
        self.reads.append((start, start + n))
        return n


def write(**kwargs: object) -> bytes:
    """An HDF5 file of chunked datasets (written in steps, as acquisition software does)."""
    buffer = io.BytesIO()
    libver = kwargs.pop("libver", "earliest")
    with h5py.File(buffer, "w", libver=libver) as h5:  # type: ignore[arg-type]
        events = h5.create_group("events")
        deep = events.create_dataset(
            "deep", shape=(0,), maxshape=(None,), chunks=(10,), dtype="f4", **kwargs
        )
        image = events.create_dataset(
            "image", shape=(0, 8, 5), maxshape=(None, 8, 5), chunks=(3, 8, 5), dtype="u1"
        )
        rng = np.random.default_rng(0)
        for n in range(40):  # attributes added later: the object header continues elsewhere
            deep.attrs[f"note {n}"] = f"a remark of some length, number {n}"
        for _ in range(50):  # 50,000 values in 5,000 chunks: a B-tree of three levels
            deep.resize(deep.shape[0] + 1000, axis=0)
            deep[-1000:] = rng.random(1000)
            image.resize(image.shape[0] + 20, axis=0)
            image[-20:] = rng.integers(0, 255, (20, 8, 5))
        events.create_dataset("plain", data=np.arange(10))
        events.create_dataset("unwritten", shape=(100,), chunks=(10,), dtype="f8")
    return buffer.getvalue()


def prefetch(data: bytes, name: str) -> tuple[list[list[tuple[int, int]]], int]:
    """The batches of ranges `index_nodes` fetches for dataset `events/<name>`, and the
    number of nodes it found."""
    with h5py.File(io.BytesIO(data), "r") as h5:
        events = h5["events"]
        header = events.id.links.get_info(name.encode()).u
    batches: list[list[tuple[int, int]]] = []

    def read(offset: int, size: int) -> bytes:
        return data[offset : offset + size]

    def fetch(ranges: Sequence[tuple[int, int]]) -> None:
        batches.append(list(ranges))

    return batches, index_nodes(read, fetch, header)


def walked(data: bytes, name: str) -> list[tuple[int, int]]:
    """The byte ranges h5py reads to list the chunks of `events/<name>` (file already open)."""
    recording = Recording(data)
    with h5py.File(recording, "r") as h5:
        dataset = h5["events"][name]
        recording.reads.clear()
        dataset.id.chunk_iter(lambda info: None)
        return list(recording.reads)


def covered(ranges: list[tuple[int, int]], by: list[tuple[int, int]]) -> bool:
    return all(any(a <= start and stop <= b for a, b in by) for start, stop in ranges)


@pytest.mark.parametrize(
    ("kwargs", "levels"),
    [({}, 3), ({"track_order": True}, 3)],  # object headers of version 1, and of version 2
    ids=["header v1", "header v2"],
)
def test_what_h5py_reads_to_list_the_chunks_was_fetched_a_level_at_a_time(
    kwargs: dict[str, object], levels: int
) -> None:
    data = write(**kwargs)
    with h5py.File(io.BytesIO(data), "r") as h5:
        events = h5["events"]
        header = events.id.links.get_info(b"deep").u
    assert data[header : header + 4] == b"OHDR" if kwargs else data[header] == 1
    if not kwargs:  # its attributes went on in a continuation block
        found = messages(lambda offset, size: data[offset : offset + size], header)
        assert any(kind == 0x0010 for kind, _ in found)
    for name, depth in (("deep", levels), ("image", 2)):
        batches, nodes = prefetch(data, name)
        assert len(batches) == depth, (name, [len(b) for b in batches])
        assert [len(b) for b in batches][0] == 1  # the root
        assert nodes == sum(len(b) for b in batches) > 1
        reads = walked(data, name)
        assert reads and covered(reads, [r for batch in batches for r in batch]), name


def test_layouts_it_does_not_read_are_said_so() -> None:
    data = write()
    with pytest.raises(NotFollowed, match="chunked"):
        prefetch(data, "plain")  # contiguous
    assert prefetch(data, "unwritten") == ([], 0)  # chunked, no chunk written: no index yet
    with pytest.raises(NotFollowed, match="version 3"):
        prefetch(write(libver="latest"), "deep")  # version 4: chunks indexed otherwise
    broken = bytearray(data)
    batches, _ = prefetch(data, "deep")
    root = batches[0][0][0]
    broken[root : root + 4] = b"XXXX"
    with pytest.raises(NotFollowed, match="no B-tree node"):
        prefetch(bytes(broken), "deep")
    with pytest.raises(NotFollowed, match="superblock"):
        index_nodes(lambda offset, size: bytes(size), lambda ranges: None, 0)


SUPERBLOCK = b"\x89HDF\r\n\x1a\n" + bytes(5) + b"\x08\x08" + bytes(1)  # version 0, 8-byte sizes


def header_v1(at: int, messages: list[tuple[int, bytes]]) -> bytes:
    """An object header of version 1 (to be placed at `at`) holding these messages."""
    body = b"".join(
        struct.pack("<HHB3x", kind, -(-len(data) // 8) * 8, 0)
        + data.ljust(-(-len(data) // 8) * 8, b"\0")
        for kind, data in messages
    )
    return struct.pack("<BxHII4x", 1, len(messages), 1, len(body)) + body


def layout_v3(btree: int) -> bytes:
    return struct.pack("<BBBQ", 3, 2, 2, btree) + struct.pack("<II", 10, 4)


def node(level: int, children: list[int]) -> bytes:
    key = bytes(8 + 8 * 2)
    entries = b"".join(key + struct.pack("<Q", child) for child in children)
    return (
        b"TREE"
        + struct.pack("<BBHQQ", 1, level, len(children), UNDEFINED, UNDEFINED)
        + entries
        + key
    )


def follow(image: bytes, header: int) -> int:
    return index_nodes(lambda offset, size: image[offset : offset + size], lambda r: None, header)


def test_a_damaged_file_is_refused_not_followed_without_end() -> None:
    """Loops and sizes a damaged file could hold end in NotFollowed, quickly."""
    at = 64
    # a continuation block that continues into itself
    cycle = header_v1(at, [(0x0010, struct.pack("<QQ", at + 16, 24))])
    with pytest.raises(NotFollowed, match="repeat"):
        follow((SUPERBLOCK + bytes(at - 16) + cycle).ljust(4096, b"\0"), at)
    # an object header claiming a block of 4 GiB
    huge = bytearray(header_v1(at, [(0x0008, layout_v3(1024))]))
    huge[8:12] = struct.pack("<I", 0xFFFFFFF0)
    with pytest.raises(NotFollowed, match="bytes at"):
        follow((SUPERBLOCK + bytes(at - 16) + bytes(huge)).ljust(4096, b"\0"), at)

    def tree(nodes: dict[int, bytes]) -> bytes:
        image = bytearray(SUPERBLOCK + bytes(at - 16) + header_v1(at, [(0x0008, layout_v3(1024))]))
        image = image.ljust(1 << 16, b"\0")
        for address, data in nodes.items():
            image[address : address + len(data)] = data
        return bytes(image)

    assert follow(tree({1024: node(1, [2048]), 2048: node(0, [8192])}), at) == 2
    with pytest.raises(NotFollowed, match="twice"):  # a node that is its own child
        follow(tree({1024: node(1, [1024, 2048])}), at)
    with pytest.raises(NotFollowed, match="levels"):  # a child not one level below
        follow(tree({1024: node(2, [2048]), 2048: node(0, [8192])}), at)
    crowded = bytearray(node(0, [8192]))
    crowded[6:8] = struct.pack("<H", 65535)
    with pytest.raises(NotFollowed, match="entries"):
        follow(tree({1024: bytes(crowded)}), at)


def test_a_version_2_header_continued_in_a_block_of_its_own() -> None:
    """ "OHDR" whose layout message lies in an "OCHK" continuation block (as a header that
    grew after it was written has it); a block without its signature is refused."""
    at, more = 64, 512
    layout = layout_v3(1024)
    block = b"OCHK" + struct.pack("<BHB", 0x08, len(layout), 0) + layout + bytes(4)
    continuation = struct.pack("<QQ", more, len(block))
    message = struct.pack("<BHB", 0x10, len(continuation), 0) + continuation
    ohdr = b"OHDR" + bytes([2, 0x02]) + struct.pack("<I", len(message)) + message + bytes(4)
    image = bytearray((SUPERBLOCK + bytes(at - 16) + ohdr).ljust(1 << 16, b"\0"))
    image[more : more + len(block)] = block
    for address, data in {
        1024: node(1, [2048, 3072]),
        2048: node(0, [8192]),
        3072: node(0, [9000]),
    }.items():
        image[address : address + len(data)] = data
    assert follow(bytes(image), at) == 3
    image[more : more + 4] = b"XXXX"
    with pytest.raises(NotFollowed, match="continuation"):
        follow(bytes(image), at)


def test_a_features_chunks_are_listed_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the mount's reader (`RtdcSource`): by the time h5py walks a feature's chunk
    index, every node of it is in the cache (fetched a level at a time): the walk fetches
    nothing."""
    data = write()
    fetched: list[tuple[int, int]] = []

    def fetch(obj: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        fetched.append((start, stop))
        return data[start:stop]

    obj = ObjectId(key="local/deep", etag="e", size=len(data))
    cache = BlockCache(fetch=fetch, store=None, block_size=4096, memory_bytes=64 << 20)
    source = RtdcSource(RemoteFile(cache, obj, timeout=60), kind="resource")
    during: list[int] = []
    layout_of = rtdc._layout_of

    def walked(*args: Any) -> Any:
        before = len(fetched)
        try:
            return layout_of(*args)
        finally:
            during.append(len(fetched) - before)

    monkeypatch.setattr(rtdc, "_layout_of", walked)
    try:
        ranges = source.raw_ranges("deep", 0, 50_000, deadline=time.monotonic() + 60)
    finally:
        source.close()
    assert len(ranges) == 5000 and during == [0], during
