"""The disk store's file format: one sparse file per cached object (and block size), its blocks
in slots at fixed offsets, each described by an entry in a table at the file's start.

File `objects/<2 hex>/<identity hex>.<block size>.<object size>` (`Layout.name`):

    [entry table: one entry per block, padded to 4 KiB][block 0][block 1]…[last block]

Each block's slot starts on a 4 KiB boundary (`Layout.stride`: a block size that is no
multiple of 4 KiB, such as whole HDF5 chunks of decoded values, leaves a gap after each).

Blocks never stored are holes (the file is sparse), so an object's blocks cost only what is
stored, and a reader of many blocks of one object reads one file (the filesystem's read-ahead
works across blocks). An entry holds MAGIC, the first 8 bytes of the object's identity, the
block's index and length and the CRC32 of each `PAGE` of its data (zlib's CRC, computed with
zlib-ng's vectorised code: 16 GB/s per 32 KiB page here against zlib's 3.7, the same values).
A block's data are written before its entry. A reader checks the entry (all zero: not
stored) and the CRC of every page it reads, and of no other: a read of a few KiB of a 1 MiB
block reads and checks 32 KiB, not the block. So a torn, truncated, flipped or misplaced
block is damage (`Damaged`), never data.

A block's data may be written past the page cache (`write` with `direct`, where the file's
filesystem is a local disk's that takes O_DIRECT, `can_direct`): the file's descriptor is
switched to O_DIRECT for that write, the data copied into an aligned buffer (one per thread)
and padded with zeros to whole 4 KiB filesystem blocks of its slot, as O_DIRECT wants memory,
offsets and lengths aligned; the entry is then written through the page cache as ever. Every
byte reads the same either way (the padding is zeros, as a hole's are), but a last block so
written ends the file on a 4 KiB boundary. The kernel drops what it has cached of the range
written so, but only as far as it can: a cached page that another writer dirties meanwhile
(an entry or an erasure in the same large folio) may keep stale bytes, which a reader's CRC
check then takes for damage (a miss, refetched), never for data.

Consecutive blocks are also read together (`read_run`: their entries in one read, the slots
of each stretch of stored blocks in one more, scattered into a buffer per block), each checked
as a read of the whole block is; a block that fails a check is named, not returned, and read
alone (`read`) to say why.

Erasing a block zeroes its entry and punches its data out of the file (fallocate
PUNCH_HOLE), which gives the disk space back; where the filesystem cannot punch holes
(`can_punch`), the disk store evicts whole files instead (doc/ARCHITECTURE.md, "Cache").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from zlib_ng.zlib_ng import crc32, crc32_combine

from .identity import ObjectId
from .runbuffers import ALIGN, RunBuffers

PAGE = 32 << 10  # bytes under one CRC: the least a read of a block reads and checks
# (ALIGN, 4096: the entry table is padded to it, so that blocks start on filesystem blocks)
MAGIC = b"DCS1"
ENTRY = struct.Struct("<4s8sQI")  # magic, identity prefix, index, length; then one CRC per page
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


Block = bytes | memoryview  # a block's bytes: as read, or a read-only view of a buffer of its own


class Damaged(Exception):
    """A stored block that fails its checks (its entry, its length or a page's CRC)."""


@dataclass(frozen=True)
class Layout:
    """Where the blocks of one object, split into blocks of `block_size`, lie in its file."""

    identity: bytes
    block_size: int
    size: int

    @classmethod
    def of(cls, obj: ObjectId, block_size: int) -> Layout:
        """The layout of `obj` in blocks of `block_size`: the same object for the 1024
        (object, block size) pairs asked most recently (`_layout_of`), so that its name and
        offsets, and the object's identity digest, are worked out once, not at every read of
        a block (a warm random read made all of them anew: ~13 µs of its ~0.1 ms of Python);
        one evicted is made again, equal."""
        return _layout_of(obj, block_size)

    @cached_property
    def name(self) -> str:
        """The file's path under the store's directory."""
        digest = self.identity.hex()
        return f"{digest[:2]}/{digest}.{self.block_size}.{self.size}"

    @classmethod
    def parse(cls, name: str) -> Layout | None:
        """The layout a file name (`name`) stands for, None for any other name."""
        sub, _, rest = name.partition("/")
        parts = rest.split(".")
        if len(parts) != 3 or sub != parts[0][:2]:
            return None
        try:
            identity, block_size, size = bytes.fromhex(parts[0]), int(parts[1]), int(parts[2])
        except ValueError:
            return None
        if len(identity) != 32 or block_size <= 0 or size < 0:
            return None
        return cls(identity, block_size, size)

    @cached_property
    def pages(self) -> int:
        return -(-self.block_size // PAGE)

    @cached_property
    def entry_size(self) -> int:
        return ENTRY.size + 4 * self.pages

    @cached_property
    def blocks(self) -> int:
        return -(-self.size // self.block_size)

    @cached_property
    def table(self) -> int:
        return -(-self.blocks * self.entry_size // ALIGN) * ALIGN

    def length(self, index: int) -> int:
        return max(0, min(self.block_size, self.size - index * self.block_size))

    def entry_at(self, index: int) -> int:
        return index * self.entry_size

    @cached_property
    def stride(self) -> int:
        """The distance of one block's slot from the next: its size, rounded up to `ALIGN`."""
        return -(-self.block_size // ALIGN) * ALIGN

    def data_at(self, index: int) -> int:
        return self.table + index * self.stride


@functools.lru_cache(maxsize=1024)
def _layout_of(obj: ObjectId, block_size: int) -> Layout:
    return Layout(obj.identity, block_size, obj.size)


def footprint(length: int) -> int:
    """The disk space a block's data of `length` bytes take in its slot: whole pages."""
    return -(-length // ALIGN) * ALIGN


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def entry(layout: Layout, index: int, data: bytes) -> bytes:
    """The table entry of block `index` holding `data`."""
    view = memoryview(data)
    crcs = [crc32(view[at : at + PAGE]) for at in range(0, len(data), PAGE)]
    packed = ENTRY.pack(MAGIC, layout.identity[:8], index, len(data))
    packed += struct.pack(f"<{len(crcs)}I", *crcs)
    return packed.ljust(layout.entry_size, b"\0")


def write(fd: int, layout: Layout, index: int, data: bytes, *, direct: bool = False) -> None:
    """Store block `index` (its data, then its entry); its data past the page cache if
    `direct` (`fd`, opened for writing, switched to O_DIRECT meanwhile). OSError with EINVAL
    where the filesystem refuses that (nothing of the block's entry written then)."""
    if len(data) != layout.length(index):
        wanted = layout.length(index)
        raise ValueError(f"block {index} of {layout.name}: {len(data)} bytes, not {wanted}")
    if direct and data:
        _write_direct(fd, data, layout.data_at(index))
    else:
        _pwrite_all(fd, data, layout.data_at(index))
    _pwrite_all(fd, entry(layout, index, data), layout.entry_at(index))


O_DIRECT = getattr(os, "O_DIRECT", 0)  # (0: a system without it, such as macOS)
_BUFFERS = threading.local()  # each writing thread's aligned buffer, as large as it needed


def _aligned(size: int) -> mmap.mmap:
    """This thread's page-aligned buffer (an anonymous map) of at least `size` bytes."""
    buffer: mmap.mmap | None = getattr(_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _BUFFERS.buffer = mmap.mmap(-1, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
    return buffer


@contextlib.contextmanager
def _direct_io(fd: int) -> Iterator[None]:
    """`fd` switched to O_DIRECT meanwhile."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | O_DIRECT)
    try:
        yield
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _write_direct(fd: int, data: bytes, offset: int) -> None:
    """Write `data` (not empty) at `offset` (a slot's start) past the page cache: padded with
    zeros to whole 4 KiB filesystem blocks of its slot (`footprint`)."""
    length, padded = len(data), footprint(len(data))
    with memoryview(_aligned(padded)) as whole, whole[:padded] as view, _direct_io(fd):
        view[:length] = data
        view[length:] = bytes(padded - length)
        _pwrite_all(fd, view, offset)


def read(
    fd: int, layout: Layout, index: int, start: int = 0, stop: int | None = None
) -> Block | None:
    """Bytes [start, stop) of block `index` (offsets within the block; all of it by default),
    None if the block is not stored; `Damaged` if its entry or a page read fails its check."""
    length = layout.length(index)
    stop = length if stop is None else min(stop, length)
    raw = os.pread(fd, layout.entry_size, layout.entry_at(index))
    if _empty(raw):
        return None
    if len(raw) != layout.entry_size:
        raise Damaged(f"block {index}: entry cut short")
    if not _names(raw, layout, index):
        raise Damaged(f"block {index}: entry names another block")
    if start >= stop:  # nothing of the block asked (a range at or past its end)
        return b""
    first, last = start // PAGE, -(-stop // PAGE)
    begin, end = first * PAGE, min(last * PAGE, length)
    data = os.pread(fd, end - begin, layout.data_at(index) + begin)
    if len(data) != end - begin:
        raise Damaged(f"block {index}: {len(data)} of {end - begin} bytes (truncated)")
    if not _pages_match(raw, first, data):
        crcs = struct.unpack_from(f"<{last - first}I", raw, ENTRY.size + 4 * first)
        view = memoryview(data)
        for n, crc in enumerate(crcs):
            if crc32(view[n * PAGE : (n + 1) * PAGE]) != crc:
                raise Damaged(f"block {index}: page {first + n} fails its CRC")
    if (begin, end) == (start, stop):
        return data  # the block's bytes themselves: no copy
    return memoryview(data)[start - begin : stop - begin]  # (a view: no copy of the part)


Direct = tuple[int, RunBuffers]  # a file's descriptor opened with O_DIRECT, and the buffers


def read_run(
    fd: int, layout: Layout, first: int, count: int, *, direct: Direct | None = None
) -> tuple[list[Block | None], list[int]]:
    """Whole blocks `first` … `first + count - 1`: their entries in one read, then the slots
    of each stretch of blocks with entries in one more (each block's bytes into a buffer of
    its own, read-only; the gaps between slots into a scratch buffer): (each block's bytes,
    None where it is not stored or failed a check; the indices that failed one: an entry
    naming another block or cut short, a CRC that does not match, a slot past the file's
    end). Nothing is raised for damage: the caller reads those blocks alone (`read`), which
    says what is wrong. Blocks never stored cost no read of their slots (a cold stream asks
    for blocks its file does not hold yet). With `direct`, a stretch's slots are read past
    the page cache into one of its buffers where one is free (`runbuffers`): the blocks are
    then views of it."""
    size = layout.entry_size
    table = os.pread(fd, count * size, layout.entry_at(first))
    entries = [table[n * size : (n + 1) * size] for n in range(count)]
    found: list[Block | None] = [None] * count
    failed: list[int] = []
    for n, end in stretches([not _empty(entry) for entry in entries]):  # (the others: holes)
        stretch = _read_stretch(fd, layout, first + n, end - n, direct)
        for m, data in enumerate(stretch, start=n):
            index = first + m
            if data is not None and _holds(entries[m], layout, index, data):
                data.flags.writeable = False
                found[m] = data.data
            else:
                failed.append(index)
    return found, failed


def stretches(marked: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each longest stretch of consecutive True in `marked`."""
    found: list[tuple[int, int]] = []
    for n, mark in enumerate(marked):
        if mark and found and found[-1][1] == n:
            found[-1] = (found[-1][0], n + 1)
        elif mark:
            found.append((n, n + 1))
    return found


def _empty(entry: bytes) -> bool:
    """Whether a block's entry says it is not stored (all zeros, or past the file's end)."""
    return entry.count(0) == len(entry)


def _read_stretch(
    fd: int, layout: Layout, first: int, count: int, direct: Direct | None = None
) -> list[np.ndarray | None]:
    """The slots of blocks `first` … in one read, each block's bytes a buffer of its own, or
    with `direct` views of one pooled buffer where one is free (None for a block the file
    ends within)."""
    lengths = [layout.length(first + n) for n in range(count)]
    if direct is not None:
        found = _read_direct(*direct, layout, first, lengths)
        if found is not None:
            return found
    buffers = [np.empty(length, dtype=np.uint8) for length in lengths]
    scratch = np.empty(ALIGN, dtype=np.uint8)  # (a gap is less than a filesystem block)
    into: list[np.ndarray] = []
    for n, buffer in enumerate(buffers):
        into.append(buffer)
        gap = layout.stride - lengths[n]
        if gap and n < count - 1:
            assert gap < ALIGN  # (only an object's last block is short, and it is last here)
            into.append(scratch[:gap])
    got = _preadv_all(fd, into, layout.data_at(first))
    return [
        buffer if n * layout.stride + lengths[n] <= got else None
        for n, buffer in enumerate(buffers)
    ]


def _read_direct(
    fd: int, buffers: RunBuffers, layout: Layout, first: int, lengths: list[int]
) -> list[np.ndarray | None] | None:
    """`_read_stretch` past the page cache (`fd` opened with O_DIRECT) into a free buffer of
    `buffers`; None where none is free or the read is refused (the caller reads as without)."""
    stride = layout.stride
    total = footprint((len(lengths) - 1) * stride + lengths[-1])  # (whole filesystem blocks)
    read = buffers.read(fd, layout.data_at(first), total)
    if read is None:
        return None
    buffer, got = read
    return [
        buffer[n * stride : n * stride + length] if n * stride + length <= got else None
        for n, length in enumerate(lengths)
    ]


def _holds(raw: bytes, layout: Layout, index: int, data: np.ndarray) -> bool:
    """Whether `raw`, the whole entry of block `index`, describes it and its pages match
    `data` (the checks `read` makes, without naming what fails)."""
    return (
        len(raw) == layout.entry_size and _names(raw, layout, index) and _pages_match(raw, 0, data)
    )


def _names(raw: bytes, layout: Layout, index: int) -> bool:
    """Whether an entry names block `index` of this object, and its length."""
    magic, prefix, stored_index, stored_length = ENTRY.unpack_from(raw)
    return (magic, prefix, stored_index, stored_length) == (
        MAGIC,
        layout.identity[:8],
        index,
        layout.length(index),
    )


def _pages_match(raw: bytes, first: int, data: bytes | np.ndarray) -> bool:
    """Whether `data`, the pages of a block from page `first` on, match their CRCs in the
    block's entry `raw`: one pass over the bytes against the CRCs joined (`_joined`)."""
    if not len(data):
        return True
    crcs = struct.unpack_from(f"<{-(-len(data) // PAGE)}I", raw, ENTRY.size + 4 * first)
    return bool(crc32(data) == _joined(crcs, len(data)))


def _preadv_all(fd: int, buffers: list[np.ndarray], offset: int) -> int:
    """Read into `buffers` in order from `offset` on (`preadv`, again where the kernel read
    less than asked, until the file ends); the bytes read."""
    views = [buffer.data for buffer in buffers]  # (writable, C-contiguous)
    total, at = 0, 0  # bytes read; the first view not yet filled
    while at < len(views):
        got = os.preadv(fd, views[at : at + _IOV_MAX], offset + total)
        if got == 0:
            break  # the file ends here
        total += got
        while at < len(views) and got >= len(views[at]):
            got -= len(views[at])
            at += 1
        if got:
            views[at] = views[at][got:]
    return total


_IOV_MAX = 1024  # buffers one preadv takes at most (Linux's UIO_MAXIOV)


def _joined(crcs: tuple[int, ...], length: int) -> int:
    """The CRC of `length` bytes whose pages (`PAGE` each, the last one the rest) have the
    CRCs `crcs`, from those alone (zlib's crc32_combine, no pass over the bytes). A read
    checks its pages with one CRC of all of them against this: one call that releases the
    GIL per read instead of one per page, each a hand-over of the GIL to the FUSE thread and
    back (32 per MiB; re-reading image.npy from the disk cache they were a sixth of the
    daemon's CPU in thread switches). Only when they differ is each page checked, to name it."""
    joined = crcs[0]
    for n, crc in enumerate(crcs[1:], start=1):
        joined = crc32_combine(joined, crc, min(PAGE, length - n * PAGE))
    return joined


def stored(fd: int, layout: Layout, index: int) -> bool:
    """Whether block `index` has an entry now (erasing zeroes it: a block evicted while a
    reader read it reads as damaged, but is merely gone)."""
    raw = os.pread(fd, layout.entry_size, layout.entry_at(index))
    return raw.count(0) != len(raw)


def present(fd: int, layout: Layout) -> list[int]:
    """The indices whose entries are not empty (stored, or damaged)."""
    table = os.pread(fd, layout.blocks * layout.entry_size, 0)
    size = layout.entry_size
    return [
        index
        for index in range(len(table) // size)
        if table[index * size : index * size + 4] != b"\0\0\0\0"
    ]


def erase(fd: int, layout: Layout, index: int, *, punch: bool) -> None:
    """Forget block `index`: its entry zeroed, its data punched out of the file (`punch`)."""
    _pwrite_all(fd, bytes(layout.entry_size), layout.entry_at(index))
    if punch:  # its whole slot: the last partial page of a block stays allocated otherwise
        punch_hole(fd, layout.data_at(index), footprint(layout.length(index)))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give back the disk space of [offset, offset + length) of a file (reads as zeros)."""
    fallocate = _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@functools.cache
def _libc(name: str, *argtypes: Any) -> Any:
    """A function of the C library that Python's os module lacks (fallocate with PUNCH_HOLE,
    statfs's f_type), its errors in `ctypes.get_errno`; None where the library has none."""
    function = getattr(ctypes.CDLL(None, use_errno=True), name, None)
    if function is not None:
        function.argtypes = argtypes
    return function


# local disks' filesystems (statfs's f_type): where O_DIRECT writes go to the disk itself (not
# tmpfs, whose files are memory, nor a network filesystem, where each would wait for a server)
LOCAL_DISK = {0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0xF2F52010: "f2fs"}


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]


def filesystem_type(directory: Path) -> int | None:
    """The f_type statfs(2) gives for `directory` (None where it cannot be asked)."""
    statfs = _libc("statfs", ctypes.c_char_p, ctypes.POINTER(_StatFs))
    found = _StatFs()
    if statfs is None or statfs(os.fsencode(directory), ctypes.byref(found)) != 0:
        return None
    return int(found.f_type) & 0xFFFFFFFF


def can_direct(directory: Path) -> bool:
    """Whether blocks of files in `directory` are written past the page cache (`write`'s
    `direct`): on a local disk's filesystem that takes an O_DIRECT write."""
    if not O_DIRECT or filesystem_type(directory) not in LOCAL_DISK:
        return False
    with contextlib.suppress(OSError), tempfile.TemporaryFile(dir=directory) as handle:
        _write_direct(handle.fileno(), bytes(ALIGN + 1), 0)
        return True
    return False


def can_punch(directory: Path) -> bool:
    """Whether files in `directory` can have holes punched (what fallocate answers there)."""
    with contextlib.suppress(OSError), tempfile.TemporaryFile(dir=directory) as handle:
        handle.write(bytes(4 * ALIGN))
        handle.flush()
        punch_hole(handle.fileno(), ALIGN, 2 * ALIGN)
        return True
    return False
