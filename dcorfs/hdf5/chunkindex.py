"""Where the index of a chunked dataset's chunks lies, read level by level in parallel batches.

h5py lists a dataset's chunks (`chunk_iter`) by walking its index, a version 1 B-tree, node
by node: over the network each node is a miss of its own, one after another under h5py's
lock (an image feature of 100,000 events in chunks of 52: 1,924 chunks in ~31 leaves, ~31
round trips). Its nodes' addresses are in the nodes above them, so `index_nodes` reads the
tree itself, a level at a time, each level's nodes fetched together (`fetch`): as many
batches as the tree has levels (2 here). h5py's walk then finds every node in the cache.

Only what this needs of the HDF5 file format (spec: "HDF5 File Format Specification
Version 3.0", sections III.A (B-tree v1), IV.A.1 (object headers), IV.A.2.i (data layout
message)) is read: object headers of version 1 and 2 with their continuation blocks, a data
layout message of version 3 for chunked storage, and B-tree nodes of type 1 (chunks).
Anything else (a layout of version 4, whose chunks are indexed otherwise; another size of
offsets than 8 bytes) is left to h5py's own walk, and so is anything a damaged file could
make it read without end: a length or count beyond what a real header or node has, a node
met twice, a child not one level below its parent (`NotFollowed`). This is a prefetch hint:
it never changes what a read returns; it fetches the bytes h5py's walk reads next, so its
network errors are the ones that walk would meet. A file it cannot follow only loses the
speed-up.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence

Read = Callable[[int, int], bytes]  # (offset, size) -> bytes, fewer at the end of the file
Fetch = Callable[[Sequence[tuple[int, int]]], None]  # have these byte ranges in the cache

UNDEFINED = 0xFFFFFFFFFFFFFFFF  # the undefined address
LAYOUT = 0x0008  # data layout message
CONTINUATION = 0x0010  # object header continuation message
CHUNKED = 2  # layout class
CHUNK_NODES = 1  # B-tree node type of chunks
NODE_PREFIX = 24  # "TREE", type, level, entries used, left and right sibling addresses
NODE_GUESS = 65  # keys and children fetched with a node: 2K + 1 keys at HDF5's default K = 32
HEADER_READ = 4096  # bytes read at an object header (or continuation block) at first
MAX_LEVELS = 16  # deeper than any tree of 2**64 chunks: a loop in a damaged file
MAX_ENTRIES = 1 << 12  # children of one node: 2K, K being 32 unless a file sets it larger
MAX_NODES = 1 << 16  # nodes of one index (4 million chunks at K = 32)
MAX_HEADER = 1 << 20  # bytes of one object header block: they hold a few hundred at most
MAX_BLOCKS = 64  # blocks of one object header (the first and its continuations)


class NotFollowed(Exception):
    """What the file holds here is not what `index_nodes` reads."""


def index_nodes(read: Read, fetch: Fetch, header: int) -> int:
    """Fetch the B-tree nodes indexing the chunks of the dataset whose object header is at
    `header`: level by level, each level's nodes in one `fetch`. Returns the number of nodes
    found; `NotFollowed` when the dataset's layout is not one this reads."""
    offsets_of_8_bytes(read)
    btree, dimensions = _chunked_layout(read, header)
    if btree == UNDEFINED:
        return 0  # no chunk written yet
    key = 8 + 8 * dimensions  # chunk size, filter mask, an offset per dimension (rank + 1)
    level_nodes, seen = [btree], {btree}
    parent_level: int | None = None
    for _ in range(MAX_LEVELS):
        fetch([(a, a + NODE_PREFIX + NODE_GUESS * (key + 8)) for a in level_nodes])
        children: list[int] = []
        levels = set()
        for address in level_nodes:
            level, entries = node(read, address, key)
            levels.add(level)
            if level > 0:  # (the children of a leaf are chunks, which are data)
                children += entries
        if len(levels) != 1 or (parent_level is not None and levels != {parent_level - 1}):
            raise NotFollowed(f"B-tree nodes of levels {sorted(levels)} below {parent_level}")
        if not children:
            return len(seen)
        if seen.intersection(children) or len(children) != len(set(children)):
            raise NotFollowed("a B-tree node is a child twice")
        seen.update(children)
        if len(seen) > MAX_NODES:
            raise NotFollowed(f"more than {MAX_NODES} B-tree nodes")
        (parent_level,) = levels
        level_nodes = children
    raise NotFollowed("the chunk index is deeper than any B-tree can be")


def offsets_of_8_bytes(read: Read) -> None:
    """That the file's addresses and lengths are 8 bytes (its superblock, at its start)."""
    superblock = read(0, 16)
    if superblock[:8] != b"\x89HDF\r\n\x1a\n" or len(superblock) < 16:
        raise NotFollowed("no superblock at the file's start")
    at = 13 if superblock[8] in (0, 1) else 9
    if superblock[at : at + 2] != b"\x08\x08":
        raise NotFollowed(f"addresses and lengths of {superblock[at]}, {superblock[at + 1]} bytes")


def node(read: Read, address: int, key: int, kind: int = CHUNK_NODES) -> tuple[int, list[int]]:
    """A B-tree node of `kind` (chunks; groups: `groupindex`) with keys of `key` bytes: its
    level and its children's addresses."""
    prefix = read(address, NODE_PREFIX)
    if len(prefix) < NODE_PREFIX or prefix[:4] != b"TREE" or prefix[4] != kind:
        raise NotFollowed(f"no B-tree node of type {kind} at {address}")
    level, used = prefix[5], struct.unpack_from("<H", prefix, 6)[0]
    if used > MAX_ENTRIES:
        raise NotFollowed(f"a B-tree node of {used} entries at {address}")
    size = used * (key + 8) + key
    body = read(address + NODE_PREFIX, size)
    if len(body) < size:
        raise NotFollowed(f"the B-tree node at {address} is cut short")
    children = [struct.unpack_from("<Q", body, i * (key + 8) + key)[0] for i in range(used)]
    return level, children


def _chunked_layout(read: Read, header: int) -> tuple[int, int]:
    """The B-tree address and the dimensionality (rank + 1) of a chunked dataset's layout
    message (version 3: class, dimensionality, address, ...) in the object header at
    `header`."""
    for kind, data in messages(read, header):
        if kind != LAYOUT:
            continue
        if len(data) < 11 or data[0] != 3 or data[1] != CHUNKED:
            raise NotFollowed(f"a data layout other than chunked, version 3 ({data[:2].hex()})")
        return struct.unpack_from("<Q", data, 3)[0], data[2]
    raise NotFollowed("no data layout message")


def messages(read: Read, header: int) -> list[tuple[int, bytes]]:
    """The messages of the object header at `header` (version 1 or 2), continuation blocks
    followed (each once, at most `MAX_BLOCKS` of them)."""
    start = read(header, HEADER_READ)
    version = 2 if start[:4] == b"OHDR" else 1
    first = _first_block_v2(start, header) if version == 2 else _first_block_v1(start, header)
    # a message's own header: type and size (2 + 2 bytes, then flags and 3 reserved; version
    # 2: 1 + 2 bytes, then flags and, where creation order is tracked, 2 more)
    step = 8 if version == 1 else 4 + (2 if start[5] & 0x04 else 0)
    blocks = [first]
    found: list[tuple[int, bytes]] = []
    for address, length in _blocks(blocks):
        block = read(address, length)
        at = 0
        while at + step <= len(block):
            if version == 1:
                kind, size = struct.unpack_from("<HH", block, at)
            else:
                kind, size = block[at], struct.unpack_from("<H", block, at + 1)[0]
            data = block[at + step : at + step + size]
            found.append((kind, data))
            if kind == CONTINUATION and len(data) >= 16:
                offset, continued = struct.unpack_from("<QQ", data)
                if version == 2:  # a block of its own: "OCHK", messages, a checksum
                    if read(offset, 4) != b"OCHK":
                        raise NotFollowed(f"no continuation block at {offset}")
                    offset, continued = offset + 4, continued - 8
                blocks.append((offset, continued))
            at += step + size
    return found


def _first_block_v1(start: bytes, header: int) -> tuple[int, int]:
    """Where a version 1 header's messages start, and their length: after a prefix of
    version, reserved byte, message count, reference count and size, padded to 16 bytes."""
    if len(start) < 16 or start[0] != 1:
        raise NotFollowed(f"no object header at {header}")
    return header + 16, struct.unpack_from("<I", start, 8)[0]


def _first_block_v2(start: bytes, header: int) -> tuple[int, int]:
    """Where a version 2 header's ("OHDR") messages start, and their length: after the
    signature, version, flags, the times and attribute limits its flags say it has, and the
    size of its first block (1, 2, 4 or 8 bytes, as its flags say)."""
    if len(start) < 6 or start[4] != 2:
        raise NotFollowed(f"an object header of unknown version at {header}")
    flags = start[5]
    at = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
    width = 1 << (flags & 0x03)
    return header + at + width, int.from_bytes(start[at : at + width], "little")


def _blocks(blocks: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The (address, length) of an object header's blocks, taken from `blocks` as the caller
    appends the continuations it finds: each address once, lengths and count bounded."""
    seen: set[int] = set()
    while blocks:
        address, length = blocks.pop(0)
        if address in seen or len(seen) >= MAX_BLOCKS:
            raise NotFollowed(f"an object header's blocks repeat or exceed {MAX_BLOCKS}")
        if not 0 <= length <= MAX_HEADER:
            raise NotFollowed(f"an object header block of {length} bytes at {address}")
        seen.add(address)
        yield address, length
