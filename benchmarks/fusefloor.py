"""The floor of any pyfuse3 filesystem on this machine: the least a FUSE daemon in Python can do.

    .venv/bin/python benchmarks/fusefloor.py SOURCE MOUNTPOINT [--memory | --thread]

Mounts SOURCE (a directory of plain files, read once at start for its names and sizes)
read-only at MOUNTPOINT and serves every read with one `os.pread` on the trio thread, nothing
else: no cache, no threads, no bookkeeping beyond a dict of inodes. With --memory, every file
is read into memory at start and reads are slices of it (no disk at all). With --thread,
each `os.pread` runs in a worker thread (`trio.to_thread`), as a filesystem must for reads
that may take long: a slow read on the trio thread stalls every other request (dcorfs reads
what its disk cache holds on the trio thread while that disk answers fast, and what it must
fetch or decode in worker threads).

It is mounted with the options dcorfs uses and answers the kernel as dcorfs does (long
entry/attr timeouts, kept page cache, FLUSH and xattrs ENOSYS), so a row of
benchmarks/run.py measured through it is what the same reads cost through pyfuse3 and this
kernel alone: dcorfs' time over it is what dcorfs itself adds. Prints "ready" once mounted;
unmount with `fusermount3 -u`.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

from dcorfs.fs.fuse_ops import IO_SIZE

TIMEOUT = 86400.0  # a benchmark's files never change
IN_MEMORY = 1 << 40  # file handles from here: files served from memory (--memory)


class Floor(pyfuse3.Operations):
    def __init__(self, source: Path, *, memory: bool, thread: bool) -> None:
        super().__init__()
        self._thread = thread
        self._paths: dict[int, Path] = {pyfuse3.ROOT_INODE: source}
        self._children: dict[int, dict[bytes, int]] = {}
        self._fds: dict[int, int] = {}
        self._scan(pyfuse3.ROOT_INODE, source)
        self._bytes = {
            ino: path.read_bytes() for ino, path in self._paths.items() if memory and path.is_file()
        }

    def _scan(self, ino: int, directory: Path) -> None:
        children = self._children.setdefault(ino, {})
        for entry in sorted(directory.iterdir()):
            child = len(self._paths) + pyfuse3.ROOT_INODE
            self._paths[child] = entry
            children[os.fsencode(entry.name)] = child
            if entry.is_dir():
                self._scan(child, entry)

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        st = self._paths[ino].stat()
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.st_mode = (stat.S_IFDIR | 0o555) if stat.S_ISDIR(st.st_mode) else stat.S_IFREG | 0o444
        attr.st_nlink = 1
        attr.st_size = st.st_size
        attr.st_blksize = IO_SIZE  # as dcorfs: what buffered readers read at once
        attr.st_blocks = -(-st.st_size // 512)
        attr.st_mtime_ns = attr.st_atime_ns = attr.st_ctime_ns = st.st_mtime_ns
        attr.entry_timeout = attr.attr_timeout = TIMEOUT
        return attr

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        child = self._children.get(parent_inode, {}).get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(child)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = list(self._children.get(fh, {}).items())
        for index in range(start_id, len(entries)):
            name, child = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attr(child), index + 1):
                break

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode in self._bytes:
            return pyfuse3.FileInfo(fh=IN_MEMORY + inode, keep_cache=True)
        fd = os.open(self._paths[inode], os.O_RDONLY)
        self._fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh >= IN_MEMORY:
            return self._bytes[fh - IN_MEMORY][off : off + size]
        if self._thread:
            return await trio.to_thread.run_sync(os.pread, fh, size, off)
        return os.pread(fh, size, off)

    async def release(self, fh: int) -> None:
        if fh < IN_MEMORY:
            os.close(self._fds.pop(fh))

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        raise pyfuse3.FUSEError(errno.ENOSYS)


def main() -> int:
    source, mountpoint = Path(sys.argv[1]), sys.argv[2]
    options = set(pyfuse3.default_options) | {"fsname=fusefloor", "ro"}
    flags = sys.argv[3:]
    floor = Floor(source, memory="--memory" in flags, thread="--thread" in flags)
    pyfuse3.init(floor, mountpoint, options)
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
