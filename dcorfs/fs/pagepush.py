"""Made read-ahead windows pushed into the kernel's page cache, ahead of a sequential reader.

A stream's windows (`fs.readahead`) are made before the reader asks for them; served through
FUSE, each 128 KiB of them is one request: the kernel wakes the daemon, Python answers, the
kernel copies the reply and wakes the reader. FUSE's notify_store (`pyfuse3.notify_store`)
puts bytes into the kernel's page cache of a file directly, a whole window in one write,
without the GIL held during the kernel's copy; the reader then finds those pages cached and
reads them without a request. This module does that in one thread of its own, for the
windows a `ReadAhead` hands it (`ReadAhead.pushable`): never on the trio thread, because the
kernel locks the pages of a request in flight until the daemon answers it, and a push onto
such a page waits for that answer. So only bytes `PUSH_GAP` beyond the stream's last request
are pushed (the kernel's own read-ahead of that stream is before them), and a push that meets
a page in flight anyway merely waits for the trio thread to answer it.

Pushing never changes what a reader gets: the bytes pushed are the window's, which are the
file's (`fs.readahead`), clipped to the file's size (a push beyond it would extend the file
in the kernel). A push that fails (the kernel forgot the inode, the mount is going away, a
kernel without notify_store) is logged, the handle stops pushing and its reads go through
FUSE again from where the push failed (`ReadAhead.push_failed`); a page the kernel dropped
before the reader came is simply asked for again. Measured effects: doc/ARCHITECTURE.md,
"Speed".
"""

from __future__ import annotations

import errno
import logging
import mmap
import queue
import threading
from collections.abc import Callable, MutableMapping
from typing import Protocol

from .content import Buffer

log = logging.getLogger(__name__)
PAGE = mmap.PAGESIZE

Store = Callable[[int, int, Buffer], None]  # (inode, offset, bytes): pyfuse3.notify_store


class Pushable(Protocol):
    def pushable(self) -> tuple[int, list[Buffer]] | None: ...

    def pushed(self, start: int, stop: int) -> None: ...

    def push_failed(self, offset: int) -> None: ...


def whole_pages(offset: int, pieces: list[Buffer]) -> list[tuple[int, Buffer]]:
    """`pieces` (bytes from `offset` on, `offset` at a page boundary) as (offset, bytes) that
    each start at a page boundary and, but for the last, hold whole pages: the kernel marks a
    pushed page as read only when one push fills it from its start (fs/fuse/dev.c,
    fuse_notify_store), so a page that two pieces share is joined into one push (a copy of
    at most a page) instead of being left for the reader to ask for."""
    assert offset % PAGE == 0
    out: list[tuple[int, Buffer]] = []
    carry: list[Buffer] = []  # the start of a page begun by the previous piece
    carried = 0
    at = offset
    for piece in pieces:
        view = memoryview(piece)
        if carried:
            take = min(PAGE - carried, len(view))
            carry.append(view[:take])
            carried += take
            view = view[take:]
            if carried < PAGE:
                continue
            out.append((at, b"".join(carry)))
            at += PAGE
            carry, carried = [], 0
        body = len(view) - len(view) % PAGE
        if body:
            out.append((at, view[:body]))
            at += body
        if body < len(view):
            carry, carried = [view[body:]], len(view) - body
    if carried:
        out.append((at, b"".join(carry)))
    return out


class PagePusher:
    """One thread pushing what `Pushable`s hand it, woken by `wake`."""

    def __init__(self, store: Store, counters: MutableMapping[str, int] | None = None) -> None:
        """`counters`: where pushes are counted (`pushes`, `pushed_bytes`, `push_failures`)."""
        self._store = store
        self._queue: queue.SimpleQueue[tuple[int, Pushable] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._supported = True
        self.counters = counters if counters is not None else {}
        for name in ("pushes", "pushed_bytes", "push_failures"):
            self.counters.setdefault(name, 0)

    @property
    def active(self) -> bool:
        return self._supported

    def wake(self, inode: int, source: Pushable) -> None:
        """`source` may have bytes to push (called on any thread, with any lock held)."""
        if not self._supported:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="page-push", daemon=True)
                self._thread.start()
        self._queue.put((inode, source))

    def close(self, timeout: float = 5.0) -> None:
        """Stop pushing (before the FUSE session goes: a push needs it)."""
        self._supported = False
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            inode, source = item
            try:
                self._drain(inode, source)
            except Exception:  # a bug: that handle is left alone, the thread goes on
                log.exception("pushing pages of inode %d", inode)

    def _drain(self, inode: int, source: Pushable) -> None:
        while self._supported and (found := source.pushable()) is not None:
            offset, pieces = found
            at = self._push(inode, offset, pieces)
            if at is not None:
                source.push_failed(at)
                return
            source.pushed(offset, offset + sum(len(piece) for piece in pieces))

    def _push(self, inode: int, offset: int, pieces: list[Buffer]) -> int | None:
        """Push `pieces` at `offset`; None when all went, else where the failure was."""
        for at, piece in whole_pages(offset, pieces):
            try:
                self._store(inode, at, piece)
            except Exception as exc:  # the reader is then served as without pushes
                self.counters["push_failures"] += 1
                if isinstance(exc, OSError) and exc.errno == errno.ENOSYS:
                    self._supported = False
                    log.info("the kernel does not take pushed pages (notify_store): not pushing")
                else:
                    log.debug("push of inode %d at %d failed: %r", inode, at, exc)
                return at
            self.counters["pushed_bytes"] += len(piece)
        self.counters["pushes"] += 1
        return None
