"""Where the links of groups lie, read a level at a time in parallel batches.

To list a group of a file written the classic way (h5py's default: a symbol table, as dclab's
files have), h5py walks the group's B-tree from its root node to the symbol table nodes that
hold its members, and reads the group's local heap for their names: over the network a miss
each, one after another under h5py's lock. The `events` group of a 100,000-event file written
by dclab has its symbol table nodes scattered over the file's last 11 MB: eleven round trips
in a row before the headers of its features could be fetched. `symbol_tables` reads those
structures itself, for several groups at once: the B-tree roots and the heaps' prefixes in one
batch, then each level of nodes (the last level's children being the symbol table nodes)
together with the heaps' data. h5py's walk then finds them in the cache.

Only what this needs of the format is read (spec: "HDF5 File Format Specification Version
3.0", II.A (superblock versions 0 and 1), III.A.1 (B-tree v1 nodes of type 0), III.C (symbol
table nodes), III.D (local heaps), IV.A.2.r (symbol table message)); a group stored otherwise
(link messages, dense storage: files written with newer library versions) is skipped, left
to h5py. Like `chunkindex`, this is a prefetch hint, bounded against damaged files
(`NotFollowed`): it never changes what a read returns.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .chunkindex import (
    MAX_ENTRIES,
    MAX_LEVELS,
    MAX_NODES,
    NODE_PREFIX,
    Fetch,
    NotFollowed,
    Read,
    messages,
    node,
    offsets_of_8_bytes,
)

SYMBOL_TABLE = 0x0011  # symbol table message: the group's B-tree and local heap
GROUP_NODES = 0  # B-tree node type of groups
KEY = 8  # a group node's key: an offset into the local heap
NODE_BYTES = NODE_PREFIX + (2 * 16 + 1) * (KEY + 8)  # keys and children at the default K = 16
HEAP_PREFIX = 32  # "HEAP", version, reserved, data size, free list, data address
HEAP_READ = 512  # what HDF5 reads at a local heap at first (H5HL_SPEC_READ_SIZE)
MAX_HEAP = 1 << 24  # bytes of one local heap's data: names of a group's members
SNOD_ENTRY = 40  # a symbol table entry with 8-byte offsets
LEAF_K_AT = 16  # where a superblock of version 0 or 1 holds the group leaf node K
ROOT_AT = {0: 64, 1: 68}  # … and its root group's object header address, by its version
SUPERBLOCK_READ = 76  # bytes of such a superblock read: up to that address


def root_header(read: Read) -> int:
    """The object header address of the root group, from a superblock of version 0 or 1 (its
    root group's symbol table entry)."""
    superblock = _superblock(read)
    return int(struct.unpack_from("<Q", superblock, ROOT_AT[superblock[8]])[0])


def _superblock(read: Read) -> bytes:
    """The superblock's first bytes, where it is of version 0 or 1 (the groups of a file of a
    later version are stored otherwise)."""
    superblock = read(0, SUPERBLOCK_READ)
    if len(superblock) < SUPERBLOCK_READ or superblock[8] not in ROOT_AT:
        raise NotFollowed("no superblock of version 0 or 1: groups stored otherwise")
    return superblock


def symbol_tables(read: Read, fetch: Fetch, headers: Sequence[int]) -> int:
    """Fetch the link storage of the groups whose object headers are at `headers`: nodes
    level by level, each level in one `fetch`, the local heaps' data with the first level
    below the roots. Returns the number of nodes found (0 where no group has a symbol
    table); `NotFollowed` when the structures found are not what they should be."""
    offsets_of_8_bytes(read)
    tables = [table for header in headers if (table := _symbol_table(read, header)) is not None]
    if not tables:
        return 0
    leaf_bytes = 8 + 2 * _leaf_k(read) * SNOD_ENTRY  # "SNOD", version, reserved, count
    roots = [btree for btree, _ in tables]
    fetch([(a, a + NODE_BYTES) for a in roots] + [(h, h + HEAP_READ) for _, h in tables])
    pending = [_heap_data(read, heap) for _, heap in tables]
    level_nodes, seen = list(dict.fromkeys(roots)), set(roots)
    parent_levels: set[int] | None = None
    for _ in range(MAX_LEVELS):
        inner: list[int] = []
        leaves: list[int] = []
        levels = set()
        for address in level_nodes:
            level, children = node(read, address, KEY, GROUP_NODES)
            levels.add(level)
            (inner if level > 0 else leaves).extend(children)
        if parent_levels is not None and not levels <= {level - 1 for level in parent_levels}:
            raise NotFollowed(f"B-tree nodes of levels {sorted(levels)} below {parent_levels}")
        if seen.intersection(inner) or len(inner) != len(set(inner)):
            raise NotFollowed("a B-tree node of a group is a child twice")
        seen.update(inner)
        if len(seen) > MAX_NODES or len(leaves) > MAX_NODES:
            raise NotFollowed(f"more than {MAX_NODES} B-tree or symbol table nodes")
        batch = [(a, a + NODE_BYTES) for a in inner] + [(a, a + leaf_bytes) for a in leaves]
        fetch(batch + pending)
        pending = []
        if not inner:
            return len(seen)
        parent_levels = levels - {0}  # (several groups' roots may stand at different levels)
        level_nodes = inner
    raise NotFollowed("a group's B-tree is deeper than any B-tree can be")


def _symbol_table(read: Read, header: int) -> tuple[int, int] | None:
    """The (B-tree, local heap) addresses of the group whose object header is at `header`,
    or None for a group without a symbol table (its links stored otherwise)."""
    for kind, data in messages(read, header):
        if kind == SYMBOL_TABLE:
            if len(data) < 16:
                raise NotFollowed(f"a symbol table message of {len(data)} bytes")
            btree, heap = struct.unpack_from("<QQ", data)
            return int(btree), int(heap)
    return None


def _heap_data(read: Read, heap: int) -> tuple[int, int]:
    """The byte range of a local heap's data (its names), from the heap's prefix."""
    prefix = read(heap, HEAP_PREFIX)
    if len(prefix) < HEAP_PREFIX or prefix[:4] != b"HEAP":
        raise NotFollowed(f"no local heap at {heap}")
    size, _, address = struct.unpack_from("<QQQ", prefix, 8)
    if size > MAX_HEAP:
        raise NotFollowed(f"a local heap of {size} bytes at {heap}")
    return int(address), int(address + size)


def _leaf_k(read: Read) -> int:
    """The group leaf node K of the file (4 by default)."""
    k = int(struct.unpack_from("<H", _superblock(read), LEAF_K_AT)[0])
    if not 0 < k <= MAX_ENTRIES:
        raise NotFollowed(f"a group leaf node K of {k}")
    return k
