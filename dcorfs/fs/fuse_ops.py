"""The kernel-facing adapter: inodes, handles, lookup counts, attributes and errno mapping.

A thin layer over `tree`: resolve, delegate, reply. Blocking work (network, HDF5, decoding)
goes to worker threads under one `CapacityLimiter`, once per operation; answers at hand
(loaded listings, bytes in the memory cache or in the local disk cache: `FileContent.peek`
with `disk`, while that disk answers fast, `prefetch.DISK_INLINE_SLOW`) are served inline on
the trio thread. Every handler is
wrapped: `DcorfsError` becomes its errno, anything else is logged with its traceback and
becomes EIO, so no handler can end `pyfuse3.main()` and leave a dead mount.

Inode numbers are a hash of the node's canonical path, so they are the same on every mount
(a volatile file replaced by another has a number of its own: see `Operations._inode`).
"""

from __future__ import annotations

import collections
import errno
import functools
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, NewType, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from ..cache.prefetch import DISK_INLINE_PAUSE, DISK_INLINE_SLOW
from ..errors import DcorfsError, NotFound
from .activity import Activity
from .content import FileContent, StaticContent
from .pagepush import PagePusher
from .readahead import Prefetcher, ReadAhead
from .tree import Dir, File, Node

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT
BLOCK_SIZE = 1 << 20  # statfs' block size
# st_blksize: what buffered readers read at once (Python's `open` takes it as its buffer, so
# `numpy.load`'s header read is one such read): the kernel's default request size (128 KiB;
# 1 MiB with `--kernel-tuning`), not more — 1 MiB made the header of a large `image.npy` wait
# for its second decoded block too
IO_SIZE = 128 << 10

# The kernel's numbers, kept apart by type: an inode, a file's handle and a directory's handle
# are all ints to the kernel and to pyfuse3 (whose InodeT and FileHandleT are plain aliases of
# int); mypy keeps them from being mixed up here. Handlers receive ints and name them once.
Inode = NewType("Inode", int)
FileHandle = NewType("FileHandle", int)
DirHandle = NewType("DirHandle", int)
ROOT = Inode(pyfuse3.ROOT_INODE)


Handler = Callable[Concatenate["Operations", P], Coroutine[Any, Any, T]]


def _handler(method: Handler[P, T]) -> Handler[P, T]:
    """Only FUSEError may leave a handler (else pyfuse3.main() ends and the mount is dead)."""

    @functools.wraps(method)
    async def wrapper(self: Operations, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except DcorfsError as exc:
            self.activity.note_error(method.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except trio.TooSlowError:
            self.activity.note_error(method.__name__, TimeoutError("no answer within the deadline"))
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:
            log.exception("unexpected error in %s", method.__name__)
            self.activity.note_error(method.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _volatile(node: Node | None) -> bool:
    return isinstance(node, File) and node.volatile


def _settle_all(nodes: list[Node]) -> None:
    for node in nodes:
        node.settle()


def _settle_each(nodes: list[Node]) -> list[Node]:
    """Settle every node; those whose settling failed (with dcorfs' own error)."""
    failed = []
    for node in nodes:
        try:
            node.settle()
        except DcorfsError as exc:
            log.info("%s left out of its directory's listing for now: %s", node.path, exc)
            failed.append(node)
    return failed


async def _refuse(*args: Any) -> Any:
    """Every call that would change the filesystem: it is read-only."""
    raise pyfuse3.FUSEError(errno.EROFS)


class Operations(pyfuse3.Operations):
    def __init__(
        self,
        *,
        root: Dir,
        timeout: float,
        attr_time: float,
        listing_time: float,
        negative_time: float,
        limiter: trio.CapacityLimiter,
        activity: Activity | None = None,
        prefetcher: Prefetcher | None = None,
        pusher: PagePusher | None = None,
    ) -> None:
        super().__init__()
        self.activity = activity or Activity()
        self._timeout = timeout
        self._attr_time = attr_time
        self._listing_time = listing_time
        self._negative_time = negative_time
        self._limiter = limiter
        self._prefetcher = prefetcher
        self._pusher = pusher  # made read-ahead windows into the page cache
        self._uid, self._gid = os.getuid(), os.getgid()
        self._nodes: dict[Inode, Node] = {ROOT: root}
        self._inodes: dict[str, Inode] = {root.path: ROOT}
        self._parents: dict[Inode, Inode] = {ROOT: ROOT}
        self._lookups: collections.Counter[Inode] = collections.Counter()
        self._volatile: dict[int, Inode] = {}  # id() of a volatile file node -> its inode
        self._generations: collections.Counter[str] = collections.Counter()  # per path
        self._files: dict[FileHandle, FileContent] = {}
        self._dirs: dict[DirHandle, list[tuple[str, Node]]] = {}
        self._dirs_parent: dict[DirHandle, Inode] = {}
        self._next_fh = 1  # one sequence for both kinds of handle
        self._disk_inline_from = 0.0  # reads from the disk cache inline from then on
        self.initialized = trio.Event()  # set once the kernel's INIT has been answered

    def init(self) -> None:
        """pyfuse3 calls this while answering INIT (the reply goes out when it returns)."""
        self.initialized.set()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _inode(self, node: Node, parent: Inode) -> Inode:
        """The node's inode number: its path's, shared by the nodes that replace one another
        at that path with the same bytes; a volatile file (whose replacement may have other
        bytes, see `tree.File.volatile`) and its replacement each have their own, so the
        kernel never mixes their pages, nor their sizes, and a handle open across the switch
        reads the bytes it opened."""
        own = self._volatile.get(id(node))
        if own is not None and self._nodes.get(own) is node:
            return own  # also when listed before it was replaced (a listing's entries)
        known = self._inodes.get(node.path)
        generation = 0
        if known is not None:
            current = self._nodes[known]
            if current is node:
                return known
            if not (_volatile(current) or _volatile(node)):
                self._nodes[known] = node
                return known
            self._generations[node.path] += 1
            generation = self._generations[node.path]
        name = node.path if generation == 0 else f"{node.path}\0{generation}"
        digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8)
        ino = Inode(max(int.from_bytes(digest.digest(), "little") >> 1, ROOT + 1))
        while ino in self._nodes and not self._same(self._nodes[ino], node, generation):
            ino = Inode(ino + 1)  # taken (another path, or a volatile file's other version)
        self._nodes[ino] = node
        self._inodes[node.path] = ino
        self._parents[ino] = parent
        if _volatile(node):
            self._volatile[id(node)] = ino
        return ino

    @staticmethod
    def _same(occupant: Node, node: Node, generation: int) -> bool:
        """Whether `node` may take the number `occupant` has: the same node, or one that
        replaces it at its path with the same bytes. Not a volatile file's other version, also
        when the replacement's own number was forgotten while the old one's file is still
        open (looked up again, the replacement would otherwise get the old number, and the
        kernel the old inode's pages and size for it)."""
        if occupant is node:
            return True
        if generation or occupant.path != node.path:
            return False
        return not (_volatile(occupant) or _volatile(node))

    def _handle(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _node(self, ino: Inode) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _dir(self, ino: Inode) -> Dir:
        node = self._node(ino)
        if not isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        with trio.fail_after(self._timeout + 10):
            return await trio.to_thread.run_sync(
                fn, *args, limiter=self._limiter, abandon_on_cancel=True
            )

    async def _settle(self, nodes: list[Node]) -> None:
        """Make the attributes of these nodes known (in a worker thread, if any must wait)."""
        waiting = [node for node in nodes if not node.settled]
        if waiting:
            await self._blocking(_settle_all, waiting)

    async def _settle_listed(self, nodes: list[Node]) -> set[int]:
        """As `_settle`, for the entries of a listing: one whose attributes cannot be known
        now is left out of it (its own lookup says why), the others are listed. The id()s
        of those left out."""
        waiting = [node for node in nodes if not node.settled]
        if not waiting:
            return set()
        failed = await self._blocking(_settle_each, waiting)
        return {id(node) for node in failed}

    def _attributes(self, node: Node, ino: Inode) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.st_uid, attr.st_gid = self._uid, self._gid
        mtime_ns = int(node.mtime * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime_ns
        attr.st_blksize = IO_SIZE
        timeout = self._attr_time
        if isinstance(node, Dir):
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
            if node.volatile:
                timeout = min(timeout, self._listing_time)
        else:
            assert isinstance(node, File)
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = node.size
            if node.dynamic:
                timeout = 1.0
            elif node.volatile:
                timeout = min(timeout, self._listing_time)
        attr.st_blocks = -(-attr.st_size // 512)
        attr.entry_timeout = attr.attr_timeout = timeout
        return attr

    # -- namespace -------------------------------------------------------------------------------

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent_ino = Inode(parent_inode)
        parent = self._dir(parent_ino)
        text = os.fsdecode(name)
        if text == ".":
            return self._attributes(parent, parent_ino)
        if text == "..":
            up = self._parents.get(parent_ino, ROOT)
            return self._attributes(self._node(up), up)
        node = parent.ready_child(text)
        if node is None:
            try:
                node = await self._blocking(parent.lookup, text)
            except NotFound as exc:
                log.debug("lookup: %s", exc)
                negative = pyfuse3.EntryAttributes()
                negative.st_ino = 0
                negative.entry_timeout = self._negative_time
                return negative
        await self._settle([node])
        ino = self._inode(node, parent_ino)
        self._lookups[ino] += 1
        return self._attributes(node, ino)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for number, count in inode_list:
            ino = Inode(number)
            left = self._lookups[ino] - count
            if left > 0:
                self._lookups[ino] = left
                continue
            self._lookups.pop(ino, None)
            if ino != ROOT:
                node = self._nodes.pop(ino, None)
                if node is not None:
                    if self._inodes.get(node.path) == ino:
                        self._inodes.pop(node.path)
                    if self._volatile.get(id(node)) == ino:
                        self._volatile.pop(id(node))
                self._parents.pop(ino, None)

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ino = Inode(inode)
        node = self._node(ino)
        await self._settle([node])
        return self._attributes(node, ino)

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        ino = Inode(inode)
        directory = self._dir(ino)
        children = directory.ready_children()
        if children is None:
            children = await self._blocking(directory.children)
        directory.listed(children)
        failed = await self._settle_listed(list(children.values()))
        fh = DirHandle(self._handle())
        self._dirs[fh] = sorted((n, c) for n, c in children.items() if id(c) not in failed)
        self._dirs_parent[fh] = ino
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = DirHandle(fh)
        entries = self._dirs.get(handle)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        parent = self._dirs_parent.get(handle, ROOT)
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            ino = self._inode(node, parent)
            if not pyfuse3.readdir_reply(
                token, os.fsencode(name), self._attributes(node, ino), index + 1
            ):
                break
            self._lookups[ino] += 1

    @_handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(DirHandle(fh), None)
        self._dirs_parent.pop(DirHandle(fh), None)

    # -- files -------------------------------------------------------------------------------------

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._node(Inode(inode))
        if not isinstance(node, File):
            raise pyfuse3.FUSEError(errno.EISDIR)
        content = await self._blocking(node.content) if node.blocking else node.content()
        if self._prefetcher is not None and not isinstance(content, StaticContent):
            # lazy bytes: read-ahead for streams, pushed into the kernel's page cache where
            # the kernel's size of the file is the content's (a push past it would grow the
            # file) and the reader reads through that cache (not O_DIRECT)
            push = None
            if self._pusher is not None and content.size == node.size and not flags & os.O_DIRECT:
                push = functools.partial(self._pusher.wake, inode)
            content = self._prefetcher.wrap(content, push=push)
        fh = FileHandle(self._handle())
        self._files[fh] = content
        self.activity.counters["opens"] += 1
        # a volatile file's bytes never change either: its replacement has its own inode
        keep = not node.dynamic
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=node.dynamic)

    def stop_pushing(self) -> None:
        """Stop pushing into the page cache (blocks until the push under way stops): while
        the loop still answers requests (a push may wait for one) and before the FUSE
        session is closed (a push needs it). Again: nothing."""
        if self._pusher is not None:
            self._pusher.close()

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        content = self._files.get(FileHandle(fh))
        if content is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        started = time.monotonic()
        disk = started >= self._disk_inline_from
        data = content.peek(off, size, disk=disk)
        if disk and (took := time.monotonic() - started) > DISK_INLINE_SLOW:
            log.debug("a read on the FUSE thread took %.3f s: the disk cache from threads", took)
            self._disk_inline_from = time.monotonic() + DISK_INLINE_PAUSE
        if data is None:
            deadline = started + self._timeout
            data = await self._blocking(lambda: content.read(off, size, deadline=deadline))
            self.activity.counters["reads_waited"] += 1
        else:
            self.activity.counters["reads_inline"] += 1
        self.activity.counters["bytes_served"] += len(data)
        self.activity.observe_read(time.monotonic() - started)
        # pyfuse3 replies with any buffer (it takes `data`'s buffer): a view is not copied here
        return cast(bytes, data)

    @_handler
    async def release(self, fh: int) -> None:
        content = self._files.pop(FileHandle(fh), None)
        if isinstance(content, ReadAhead):
            content.close()

    async def flush(self, fh: int) -> None:
        """Nothing to write back: ENOSYS tells the kernel never to send FLUSH again (it then
        treats every close as flushed), which saves a round trip into the daemon per close
        (numpy.load closes two descriptors per file)."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self._node(Inode(inode))
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_namemax = 255
        return data

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """No extended attributes: ENOSYS, after which the kernel answers every later
        getxattr itself (EOPNOTSUPP). `ls -l` asks twice per entry (ACLs, SELinux): each one
        a round trip through this daemon otherwise."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        """As `getxattr`: the kernel stops asking (and lists none)."""
        raise pyfuse3.FUSEError(errno.ENOSYS)


READ_ONLY = [
    "setattr",
    "write",
    "create",
    "mkdir",
    "mknod",
    "unlink",
    "rmdir",
    "rename",
    "symlink",
    "link",
    "setxattr",
    "removexattr",
]
for _name in READ_ONLY:  # the kernel refuses most of these on an `ro` mount already
    setattr(Operations, _name, _refuse)
