"""Made read-ahead windows pushed into the kernel's page cache, ahead of a sequential reader.

A stream's windows (`fs.readahead`) are made before the reader asks for them; served through
FUSE, each 128 KiB of them is one request: the kernel wakes the daemon, Python answers, the
kernel copies the reply and wakes the reader. FUSE's notify_store (`pyfuse3.notify_store`)
puts bytes into the kernel's page cache of a file directly, about a block per write, without
the GIL held during the kernel's copy; the reader then finds those pages cached and reads
them without a request. This module does that in one thread of its own, for what a
`ReadAhead` hands it (`ReadAhead.pushable`): never on the trio thread, because the kernel
locks the pages of a request in flight until it is answered, and a push onto such a page
waits for that answer. So only bytes `PUSH_GAP` beyond the stream's last request are pushed
(the kernel's own read-ahead of that stream is before them), a push that meets a request in
flight anyway waits for whoever answers it, and the pusher is stopped while the FUSE loop
still answers requests (`close`).

Pushing never changes what a reader gets: the bytes pushed are the window's, which are the
file's (`fs.readahead`), in whole pages (`whole_pages`), never past the file's end (a push
beyond it would grow the file in the kernel). A push that fails (the kernel forgot the
inode, the mount is going away) is logged and counted, the handle stops pushing and its reads
go through FUSE again from where the push failed (`ReadAhead.push_failed`); ENOSYS (a kernel
without notify_store) stops pushing for the mount. A push of a stream that has since jumped
elsewhere or closed is stale (`ReadAhead.current`): it stops at its next piece; if the kernel
refused it while its handle is open, that is a failure all the same (it ends the handle's
pushing), but not once the handle closed.
Design and measured effects: doc/ARCHITECTURE.md, "Speed".
"""

from __future__ import annotations

import errno
import logging
import mmap
import queue
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Protocol

from .content import Buffer

log = logging.getLogger(__name__)
PAGE = mmap.PAGESIZE
SMALL = 64 << 10  # segments smaller than this are joined with their neighbours …
JOINED = 1 << 20  # … into pushes of about this size

Store = Callable[[int, int, Buffer], None]  # (inode, offset, bytes): pyfuse3.notify_store


@dataclass(frozen=True)
class Push:
    """Bytes of a stream to push: `pieces` from `start` on, handed out while the stream was
    in its `generation` (a jump elsewhere or a close begins another: an older push is stale)."""

    start: int
    pieces: list[Buffer]
    generation: int

    @property
    def stop(self) -> int:
        return self.start + sum(len(piece) for piece in self.pieces)


class Pushable(Protocol):
    def pushable(self) -> Push | None: ...

    def current(self, push: Push) -> bool: ...

    def pushed(self, push: Push) -> None: ...

    def push_failed(self, push: Push, offset: int) -> bool: ...


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
    return _coalesced(out)


def _coalesced(segments: list[tuple[int, Buffer]]) -> list[tuple[int, Buffer]]:
    """Runs of small segments (pieces of small blocks) joined into pushes of up to `JOINED`
    bytes: one system call each instead of one per page."""
    out: list[tuple[int, Buffer]] = []
    run: list[Buffer] = []
    run_at = run_bytes = 0

    def flush() -> None:
        nonlocal run, run_bytes
        if run:
            out.append((run_at, run[0] if len(run) == 1 else b"".join(run)))
            run, run_bytes = [], 0

    for at, data in segments:
        if len(data) >= SMALL:
            flush()
            out.append((at, data))
            continue
        if not run:
            run_at = at
        run.append(data)
        run_bytes += len(data)
        if run_bytes >= JOINED:
            flush()
    flush()
    return out


class PagePusher:
    """One thread pushing what `Pushable`s hand it, woken by `wake`."""

    def __init__(self, store: Store, counters: MutableMapping[str, int] | None = None) -> None:
        """`counters`: where pushes are counted (`pushes`, `pushed_bytes`, `push_failures`)."""
        self._store = store
        self._queue: queue.SimpleQueue[tuple[int, Pushable] | None] = queue.SimpleQueue()
        self._queued: set[int] = set()  # id() of the sources in the queue (each once)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._supported = True  # False once closed, or the kernel takes no pushes
        self.counters = counters if counters is not None else {}
        for name in ("pushes", "pushed_bytes", "push_failures"):
            self.counters.setdefault(name, 0)

    @property
    def active(self) -> bool:
        return self._supported

    def wake(self, inode: int, source: Pushable) -> None:
        """`source` may have bytes to push (called on any thread, with any lock held)."""
        with self._lock:
            if not self._supported or id(source) in self._queued:
                return
            self._queued.add(id(source))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="page-push", daemon=True)
                self._thread.start()
        self._queue.put((inode, source))

    def close(self, timeout: float = 5.0) -> None:
        """Stop pushing. Call it while the FUSE loop still answers requests (a push onto the
        pages of a request in flight waits for its answer) and before the FUSE session goes
        (a push needs it); the push under way is stopped at its next piece."""
        with self._lock:
            self._supported = False
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
            if thread.is_alive():
                log.error("a push into the page cache did not end within %.0f s", timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            inode, source = item
            with self._lock:
                self._queued.discard(id(source))
            try:
                self._drain(inode, source)
            except Exception:  # a bug: that handle is left alone, the thread goes on
                log.exception("pushing pages of inode %d", inode)

    def _drain(self, inode: int, source: Pushable) -> None:
        while self._supported and (push := source.pushable()) is not None:
            for at, piece in whole_pages(push.start, push.pieces):
                if not (self._supported and source.current(push)):
                    return  # closed, or the stream went elsewhere: the rest is not wanted
                try:
                    self._store(inode, at, piece)
                except Exception as exc:
                    self._failed(inode, source, push, at, exc)
                    return
                self.counters["pushed_bytes"] += len(piece)
            self.counters["pushes"] += 1
            source.pushed(push)

    def _failed(self, inode: int, source: Pushable, push: Push, at: int, exc: Exception) -> None:
        """The handle's reads go through FUSE from `at` on (from where its stream is, when a
        read made the push stale meanwhile), as without pushes: its pushing is stopped in one
        step with the check that it is open, so that such a read does not leave it pushing,
        to fail again."""
        if not source.push_failed(push, at):  # a closed handle's inode may be forgotten
            log.debug("push of inode %d at %d after its handle closed: %r", inode, at, exc)
            return
        self.counters["push_failures"] += 1
        if isinstance(exc, OSError) and exc.errno == errno.ENOSYS:
            self._supported = False
            log.info("the kernel does not take pushed pages (notify_store): not pushing")
        else:
            log.debug("push of inode %d at %d failed: %r", inode, at, exc)
