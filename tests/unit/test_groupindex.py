"""Groups' links read ahead (hdf5/groupindex.py): every byte h5py reads to list a group was
fetched before, a level of its B-tree per batch; groups stored otherwise are left to h5py;
damaged files end the walk, never loop."""

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
from dcorfs.hdf5.chunkindex import UNDEFINED, NotFollowed
from dcorfs.hdf5.groupindex import root_header, symbol_tables
from dcorfs.hdf5.rtdc import RemoteFile, RtdcSource

from .test_chunkindex import Recording, covered


def write(libver: str = "earliest", members: int = 60) -> bytes:
    """An .rtdc-like file whose `events` group grows while data is written (its symbol table
    nodes then lie all over the file, as in a file written during acquisition)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver=libver) as h5:  # type: ignore[arg-type]
        events = h5.create_group("events")
        h5.create_group("logs")
        trace = events.create_group("trace")
        for n in range(members):
            events.create_dataset(f"feature_{n:02d}", data=np.arange(2000, dtype="f8") * n)
            if n % 10 == 0:
                trace.create_dataset(f"fl{n}", data=np.zeros((3, 100)))
                h5["logs"].create_dataset(f"log{n}", data=np.array([b"a line"] * 50))
    return buffer.getvalue()


def header_of(data: bytes, path: str) -> int:
    with h5py.File(io.BytesIO(data), "r") as h5:
        if path == "/":
            return int(h5py.h5o.get_info(h5["/"].id).addr)
        parent, _, name = path.rpartition("/")
        group = h5[parent or "/"]  # (held: its links need its id open)
        return int(group.id.links.get_info(name.encode()).u)


def prefetch(data: bytes, headers: Sequence[int]) -> tuple[list[list[tuple[int, int]]], int]:
    batches: list[list[tuple[int, int]]] = []

    def read(offset: int, size: int) -> bytes:
        return data[offset : offset + size]

    return batches, symbol_tables(read, lambda ranges: batches.append(list(ranges)), headers)


def listed(data: bytes, paths: Sequence[str]) -> list[tuple[int, int]]:
    """The byte ranges h5py reads to list these groups and learn where their members are (their
    own object headers read before, as the mount's walk does)."""
    recording = Recording(data)
    with h5py.File(recording, "r") as h5:
        groups = [h5[path] for path in paths]
        recording.reads.clear()
        for group in groups:
            names: list[bytes] = []
            group.id.links.iterate(names.append)
            assert len(names) > 1
            for name in names:
                group.id.links.get_info(name)
        return list(recording.reads)


def test_the_root_header_is_where_h5py_finds_it() -> None:
    data = write()
    assert root_header(lambda offset, size: data[offset : offset + size]) == header_of(data, "/")


@pytest.mark.parametrize("paths", [["/"], ["events", "logs"], ["events/trace", "events"]])
def test_what_h5py_reads_to_list_groups_was_fetched_in_two_batches(paths: list[str]) -> None:
    data = write()
    batches, nodes = prefetch(data, [header_of(data, path) for path in paths])
    assert nodes == len(paths)  # each a B-tree of one node here (60 members, K = 16)
    assert len(batches) == 2  # the roots and heaps' prefixes; the symbol table nodes and names
    reads = listed(data, paths)
    fetched = [r for batch in batches for r in batch]
    assert reads and covered(reads, fetched), [r for r in reads if not covered([r], fetched)]
    if "events" in paths:  # its symbol table nodes lie far apart: misses one by one, else
        leaves = {start // 65536 for start, _ in batches[1]}
        assert len(leaves) > 2, leaves


def test_deeper_trees_are_fetched_a_level_at_a_time() -> None:
    data = write(members=400)  # more symbol table nodes than one B-tree node holds
    batches, nodes = prefetch(data, [header_of(data, "events")])
    assert nodes > 1 and len(batches) == 3
    assert covered(listed(data, ["events"]), [r for batch in batches for r in batch])


def test_groups_stored_otherwise_are_left_to_h5py() -> None:
    data = write(libver="latest")  # a superblock of version 3, links in the groups' headers
    read = lambda offset, size: data[offset : offset + size]  # noqa: E731
    with pytest.raises(NotFollowed, match="superblock"):
        root_header(read)
    fetched: list[object] = []
    assert symbol_tables(read, fetched.append, [header_of(data, "events")]) == 0
    assert fetched == []


SUPERBLOCK = (  # version 0, 8-byte sizes, leaf K 4, internal K 16
    b"\x89HDF\r\n\x1a\n" + bytes(5) + b"\x08\x08\x00" + struct.pack("<HH", 4, 16)
)


def header_v1(messages: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HHB3x", kind, len(data), 0) + data for kind, data in messages)
    return struct.pack("<BxHII4x", 1, len(messages), 1, len(body)) + body


def group_node(level: int, children: list[int]) -> bytes:
    entries = b"".join(bytes(8) + struct.pack("<Q", child) for child in children)
    head = struct.pack("<BBHQQ", 0, level, len(children), UNDEFINED, UNDEFINED)
    return b"TREE" + head + entries + bytes(8)


def heap(data_at: int, size: int) -> bytes:
    return b"HEAP" + bytes(4) + struct.pack("<QQQ", size, UNDEFINED, data_at)


def image(nodes: dict[int, bytes], *, heap_size: int = 64) -> bytes:
    """A file of one group (header at 128: its B-tree at 1024, its heap at 512)."""
    data = bytearray(SUPERBLOCK.ljust(128, b"\0"))
    data += header_v1([(0x0011, struct.pack("<QQ", 1024, 512))])
    data = data.ljust(1 << 16, b"\0")
    data[512 : 512 + 32] = heap(600, heap_size)
    for address, content in nodes.items():
        data[address : address + len(content)] = content
    return bytes(data)


def walk(data: bytes) -> int:
    return symbol_tables(lambda offset, size: data[offset : offset + size], lambda r: None, [128])


def test_a_damaged_file_is_refused_not_followed_without_end() -> None:
    assert walk(image({1024: group_node(1, [2048]), 2048: group_node(0, [4096])})) == 2
    with pytest.raises(NotFollowed, match="twice"):  # a node that is its own child
        walk(image({1024: group_node(1, [1024, 2048])}))
    with pytest.raises(NotFollowed, match="levels"):  # a child not one level below
        walk(image({1024: group_node(2, [2048]), 2048: group_node(0, [4096])}))
    with pytest.raises(NotFollowed, match="type 0"):  # a chunk node where a group's should be
        walk(image({1024: b"TREE\x01" + group_node(0, [4096])[5:]}))
    with pytest.raises(NotFollowed, match="local heap of"):  # names of 1 TiB
        walk(image({1024: group_node(0, [4096])}, heap_size=1 << 40))
    many = {1024: group_node(1, list(range(2048, 2048 + 17 * 560, 560)))}
    many |= {a: group_node(0, [40000] * 4000) for a in range(2048, 2048 + 17 * 560, 560)}
    with pytest.raises(NotFollowed, match="symbol table nodes"):  # 68,000 of them
        walk(image(many))
    crowded = bytearray(group_node(0, [4096]))
    crowded[6:8] = struct.pack("<H", 65535)
    with pytest.raises(NotFollowed, match="entries"):
        walk(image({1024: bytes(crowded)}))


def misses_of_h5py(data: bytes, monkeypatch: pytest.MonkeyPatch) -> int:
    """Opening through the mount's reader (`RtdcSource.open`, 4 KiB blocks): how many fetches
    h5py's own reads made (each a miss it waited for), not the batches fetched ahead."""
    misses = 0
    ahead = False

    def fetch(obj: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        nonlocal misses
        misses += not ahead
        return data[start:stop]

    obj = ObjectId(key="local/groups", etag="e", size=len(data))
    cache = BlockCache(fetch=fetch, store=None, block_size=4096, memory_bytes=64 << 20, parallel=1)
    ensure = cache.ensure

    def batch(*args: Any, **kwargs: Any) -> None:
        nonlocal ahead
        ahead = True
        try:
            ensure(*args, **kwargs)
        finally:
            ahead = False

    monkeypatch.setattr(cache, "ensure", batch)
    source = RtdcSource(RemoteFile(cache, obj, timeout=60), kind="resource")
    try:
        source.open(deadline=time.monotonic() + 60)
    finally:
        source.close()
    return misses


def test_opening_lists_the_groups_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """When h5py lists the groups the mount walks (root; events, logs, tables; events/trace),
    their links are in the cache already: h5py's own reads miss only where it opens the file
    (superblock, root) and the groups' headers. Without the walk, its listing misses node
    after node."""
    data = write(members=200)
    walked = misses_of_h5py(data, monkeypatch)
    monkeypatch.setattr(rtdc, "symbol_tables", lambda read, fetch, headers: 0)
    unwalked = misses_of_h5py(data, monkeypatch)
    assert walked <= 8 and unwalked > 3 * walked, (walked, unwalked)


def test_members_whose_names_are_not_utf8_do_not_stop_the_opening(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buffer = io.BytesIO(write(members=5))
    with h5py.File(buffer, "a") as h5:
        h5.create_group(b"\xffnot utf-8")
        h5["events"].create_dataset(b"\xfe\xff", data=np.zeros(3))
    assert misses_of_h5py(buffer.getvalue(), monkeypatch) <= 8
