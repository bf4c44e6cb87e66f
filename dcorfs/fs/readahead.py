"""Adaptive read-ahead per open file: sequential readers find their bytes made in advance.

The policy (when a reader is a stream, window sizes, how far ahead) is `cache.prefetch`'s;
this module carries it out.

Each open handle of a lazy file gets a `ReadAhead` over its `FileContent`. It watches the
offsets the kernel asks for: a read that starts near where the last one ended (within
`BACK` behind or `FORWARD` ahead, because the kernel's own read-ahead arrives slightly out of
order) continues a sequential stream; anything else is random access and drops the stream.
While a stream continues, the window (bytes made per step) grows with what was read, from
`initial` up to `cap`, and windows are kept made `WINDOWS_AHEAD` windows ahead of the reader —
in a pool of worker threads, so the network requests and the decoding of window n+1 overlap
the reader consuming window n. A window is one `content.read` (for a feature: the events
those bytes cover, their HDF5 chunks fetched as parallel range requests, each chunk decoded
once per window).

Made windows are served without blocking (`peek`, inline on the trio thread). All windows of
all handles share one memory `Budget`: a window is only started when its bytes fit, and its
bytes are given back when it is consumed, dropped or its handle closed. Prefetch never
changes what a read returns: a window holds exactly `content.read` of its range, and a
window that failed is simply not used (the read asks the content itself, and fails or not
on its own).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

from ..cache.budget import Budget
from ..cache.prefetch import (
    BACK,
    FORWARD,
    PUSH_AHEAD,
    PUSH_GAP,
    SMALL_FILE,
    STREAM,
    WINDOW_CAP,
    WINDOW_INITIAL,
    WINDOWS_AHEAD,
)
from ..errors import DeadlineExceeded
from .content import Buffer, FileContent, read_pieces
from .pagepush import PAGE, Push, Pushable

log = logging.getLogger(__name__)


class _Window:
    """Bytes [start, stop) of the content, made as pieces (not joined: see `read_pieces`)."""

    def __init__(
        self,
        start: int,
        stop: int,
        future: concurrent.futures.Future[list[Buffer]],
        *,
        whole: bool = False,
    ) -> None:
        self.start = start
        self.stop = stop
        self.future = future
        self.whole = whole  # a small file's whole (`ReadAhead.read`): bytes of both budgets
        self._starts: list[int] = []

    @classmethod
    def of(cls, start: int, stop: int, pieces: list[Buffer], *, whole: bool = False) -> _Window:
        """A window made already (by a reader's own read)."""
        future: concurrent.futures.Future[list[Buffer]] = concurrent.futures.Future()
        future.set_result(pieces)
        window = cls(start, stop, future, whole=whole)
        window.made(0)
        return window

    def made(self, timeout: float) -> list[Buffer] | None:
        """The pieces once made (waiting up to `timeout` seconds); None if making them failed
        (the reader then reads on its own)."""
        try:
            pieces = self.future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise DeadlineExceeded(
                f"read-ahead of [{self.start}, {self.stop}) not done at the deadline"
            ) from None
        except concurrent.futures.CancelledError:
            return None
        except Exception as exc:
            log.debug("read-ahead window [%d, %d) failed: %s", self.start, self.stop, exc)
            return None
        if not self._starts:  # made whole, then published: readers may call this at once
            starts, at = [], self.start
            for piece in pieces:
                starts.append(at)
                at += len(piece)
            self._starts = starts
        return pieces

    def cut(self, pieces: list[Buffer], offset: int, stop: int) -> Buffer:
        """Bytes [offset, stop) of the window, from the pieces `made` returned: within one
        piece a view of it (no copy: the FUSE reply copies it into the kernel once, and a
        128 KiB copy per read on the trio thread was 6% of the daemon's CPU re-reading
        image.npy), across pieces those bytes joined."""
        views = self.views(pieces, offset, stop)
        if len(views) > 1:
            return b"".join(views)  # copied once, by the join
        view, piece = views[0], views[0].obj
        return piece if isinstance(piece, bytes) and len(piece) == len(view) else view

    def views(self, pieces: list[Buffer], offset: int, stop: int) -> list[memoryview]:
        """Bytes [offset, stop) of the window as views of its pieces, in order."""
        i = bisect.bisect_right(self._starts, offset) - 1
        out = []
        while offset < stop:
            piece, at = pieces[i], self._starts[i]
            end = min(stop, at + len(piece))
            out.append(memoryview(piece)[offset - at : end - at])
            offset, i = end, i + 1
        return out


class Prefetcher:
    """The shared parts: worker threads, the memory budget and the window sizes."""

    def __init__(
        self,
        *,
        budget_bytes: int = 64 << 20,
        workers: int = 4,
        initial: int = WINDOW_INITIAL,
        cap: int = WINDOW_CAP,
        stream: int = STREAM,
        back: int = BACK,
        forward: int = FORWARD,
        timeout: float = 60.0,
        small: int = SMALL_FILE,
        push_gap: int = PUSH_GAP,
        push_ahead: int = PUSH_AHEAD,
    ) -> None:
        self.back, self.forward = back, forward
        self.push_gap, self.push_ahead = push_gap, push_ahead
        self.small = small
        self.budget = Budget(budget_bytes)
        # small files made whole hold at most a quarter of it together (they are kept while
        # their file is open and not read to its end: a reader holding many open must not
        # leave streams without room)
        self.small_budget = Budget(budget_bytes // 4)
        self.initial = initial
        self.stream = stream
        self.cap = max(initial, min(cap, budget_bytes // 4))
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="prefetch"
        )
        self.counters = {"windows": 0, "window_bytes": 0, "hits": 0, "misses": 0}

    def wrap(
        self, content: FileContent, *, push: Callable[[Pushable], None] | None = None
    ) -> ReadAhead:
        """`push`: wakes a pusher of made windows into the kernel's page cache (FUSE)."""
        return ReadAhead(content, self, push=push)

    def submit(self, content: FileContent, start: int, stop: int) -> _Window:
        deadline = time.monotonic() + self.timeout
        future = self._pool.submit(read_pieces, content, start, stop - start, deadline=deadline)
        self.counters["windows"] += 1
        self.counters["window_bytes"] += stop - start
        return _Window(start, stop, future)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ReadAhead:
    """A `FileContent` for one open handle, with read-ahead for sequential readers."""

    def __init__(
        self,
        content: FileContent,
        prefetcher: Prefetcher,
        *,
        push: Callable[[Pushable], None] | None = None,
    ) -> None:
        self._content = content
        self._pf = prefetcher
        self._lock = threading.Lock()
        self._windows: list[_Window] = []  # sorted by start
        self._end = 0  # where the stream's last read ended
        self._streak = 0  # bytes read sequentially so far
        self._closed = False
        self._push = push
        self._pushed = 0  # the stream's bytes up to here were handed to the pusher (`pagepush`)
        self._pushing: int | None = None  # where the push under way starts
        self._generation = 0  # of the stream: a jump elsewhere or a close makes a new one

    @property
    def size(self) -> int:
        return self._content.size

    # -- reads -----------------------------------------------------------------------------------

    def _covering(self, offset: int, stop: int) -> _Window | None:
        i = bisect.bisect_right([w.start for w in self._windows], offset) - 1
        if i >= 0 and self._windows[i].stop >= stop:
            return self._windows[i]
        return None

    def peek(self, offset: int, length: int, *, disk: bool = False) -> Buffer | None:
        """A window's bytes when it is made, else the content's at hand. With `disk` (see
        `FileContent.peek`): a small file's first read makes it whole from the disk cache, as
        `read` would from anywhere, or is left to `read` (a file only partly on disk is made
        whole there, its missing blocks fetched in one go); within a stream, or under a window
        still being made, only memory counts as at hand (`read` makes the stream's next window
        in a thread, or waits for the one being made, rather than reading the bytes twice)."""
        stop = min(offset + length, self.size)
        if stop <= offset:
            return b""
        with self._lock:
            window = self._covering(offset, stop)
            self._asked_pushed(offset, stop)
            done = window is not None and window.future.done()
            pieces = window.made(0) if window is not None and done else None
            if pieces is not None and window is not None:
                self._pf.counters["hits"] += 1
                self._advance(offset, stop)
                return window.cut(pieces, offset, stop)
            first = self._first()
            stream = self._continues(offset) and self._streak >= self._pf.stream
        disk = disk and window is None and not stream
        if disk and first and self.size <= self._pf.small:
            whole = self._made_here(0, self.size, offset, stop, self._stored_whole, whole=True)
            if whole is not None:
                self._pf.counters["misses"] += 1
            return whole  # else `read` makes it whole, what is not on disk fetched at once
        data = self._content.peek(offset, length, disk=disk)
        if data is not None:
            with self._lock:
                self._advance(offset, stop)
        return data

    def _first(self) -> bool:
        """Whether nothing was read yet (call with the lock held)."""
        return self._end == 0 and self._streak == 0 and not self._windows

    def _stored_whole(self, start: int, n: int) -> list[Buffer] | None:
        data = self._content.peek(start, n, disk=True)
        if data is None:
            return None
        return [data if isinstance(data, bytes) else bytes(data)]

    def read(self, offset: int, length: int, *, deadline: float) -> Buffer:
        stop = min(offset + length, self.size)
        if stop <= offset:
            return b""
        with self._lock:
            window = self._covering(offset, stop)
            self._asked_pushed(offset, stop)
            sequential = self._continues(offset)
            ahead = self._window_size() if sequential and self._streak >= self._pf.stream else 0
            first = self._first()
        if window is not None:
            made = window.made(max(0.0, deadline - time.monotonic()))
            if made is not None:
                with self._lock:
                    self._pf.counters["hits"] += 1
                    self._advance(offset, stop)
                return bytes(window.cut(made, offset, stop))
        self._pf.counters["misses"] += 1
        data: Buffer | None = None

        def fetched(start: int, n: int) -> list[Buffer]:
            return read_pieces(self._content, start, n, deadline=deadline)

        if first and self.size <= self._pf.small:  # a small file's first read: all of it
            data = self._made_here(0, self.size, offset, stop, fetched, whole=True)
        elif ahead > stop - offset:
            # a stream: read a whole window now and keep what the reader has not asked yet
            big = min(self.size, offset + ahead)
            data = self._made_here(offset, big, offset, stop, fetched)
        if data is None:
            data = self._content.read(offset, stop - offset, deadline=deadline)
            with self._lock:
                self._advance(offset, stop)
        return data

    def _made_here(
        self,
        start: int,
        end: int,
        offset: int,
        stop: int,
        make: Callable[[int, int], list[Buffer] | None],
        *,
        whole: bool = False,
    ) -> bytes | None:
        """Bytes [start, end) made by the reader's own read of [offset, stop) (`make(start,
        n)`: their pieces, or None where they are not at hand) and kept as a window: the
        reader's bytes cut from them. None when the budget has no room for them now, or
        making them failed (the reader then reads its own bytes alone: bytes it did not ask
        for never fail its read)."""
        n = end - start
        if not self._take(n, whole):
            return None
        try:
            pieces = make(start, n)
        except Exception as exc:
            pieces = None
            log.debug("read-ahead of [%d, %d) failed: %s", start, end, exc)
        if pieces is None:
            self._give(n, whole)
            return None
        window = _Window.of(start, end, pieces, whole=whole)
        with self._lock:
            if self._closed or self._covering(start, end) is not None:
                self._give(n, whole)
            else:
                self._insert(window)
            self._advance(offset, stop)
        return bytes(window.cut(pieces, offset, stop))

    def _take(self, n: int, whole: bool) -> bool:
        """Room for a window of `n` bytes (a small file's `whole`: in both budgets)."""
        if whole and not self._pf.small_budget.try_take(n):
            return False
        if self._pf.budget.try_take(n):
            return True
        if whole:
            self._pf.small_budget.give(n)
        return False

    def _give(self, n: int, whole: bool) -> None:
        self._pf.budget.give(n)
        if whole:
            self._pf.small_budget.give(n)

    # -- the stream (called with the lock held) ----------------------------------------------------

    def _continues(self, offset: int) -> bool:
        ahead = max(self._end, self._pushed)  # pushed bytes are read without requests
        return self._end - self._pf.back <= offset <= ahead + self._pf.forward

    def _window_size(self) -> int:
        return min(self._pf.cap, max(self._pf.initial, self._streak))

    def _insert(self, window: _Window) -> None:
        starts = [w.start for w in self._windows]
        self._windows.insert(bisect.bisect_left(starts, window.start), window)

    def _advance(self, offset: int, stop: int) -> None:
        if self._continues(offset):
            if self._pushing is not None and self._pushing < stop and offset < self._pushed:
                # the reader caught up with the push under way (it reads pushed pages faster
                # than they are pushed): the rest of that push would copy pages it now asks
                # for anyway, after waiting for their requests; pushing goes on beyond
                self._new_pushes(stop)
            self._streak += stop - offset
            self._end = max(self._end, stop)
        else:  # random access: the stream ends here (a small file made whole stays made)
            self._drop(lambda w: not w.whole)
            self._streak = 0
            self._end = stop
            self._new_pushes(0)
        if stop >= self.size:  # read to its end: a small file made whole has been read
            self._drop(lambda w: w.whole)
        self._drop(lambda w: w.stop <= offset - self._pf.back)  # consumed
        if self._streak >= self._pf.stream:
            self._schedule()
            if self._push is not None and self._push_from() is not None:
                self._push(self)

    def _schedule(self) -> None:
        size = self._window_size()
        # windows are made ahead of what was pushed too, while that is not too far ahead
        base = min(max(self._end, self._pushed), self._end + self._pf.push_ahead)
        horizon = min(self.size, base + WINDOWS_AHEAD * size)
        made = max([self._end, self._pushed] + [w.stop for w in self._windows])
        while made < horizon and not self._closed:
            stop = min(self.size, made + size)
            if not self._pf.budget.try_take(stop - made):
                break
            window = self._pf.submit(self._content, made, stop)
            self._insert(window)
            if self._push is not None:
                window.future.add_done_callback(self._window_made)
            made = stop

    def _window_made(self, future: concurrent.futures.Future[list[Buffer]]) -> None:
        """(Any thread, maybe holding the lock: the pusher takes it, not this.)"""
        push = self._push
        if push is not None:
            push(self)

    # -- pushing made windows into the kernel (`fs.pagepush`) ------------------------------------

    def _push_from(self) -> int | None:
        """Where the next push would start, if the window there is made (lock held)."""
        if self._push is None or self._closed or self._streak < self._pf.stream:
            return None
        start = -(-max(self._pushed, self._end + self._pf.push_gap) // PAGE) * PAGE  # whole pages
        if start >= min(self.size, self._end + self._pf.push_ahead):
            return None
        window = self._covering(start, start + 1)
        made = window is not None and window.future.done() and window.made(0) is not None
        return start if made else None

    def pushable(self) -> Push | None:
        """The made bytes of the stream to push now, from where they start, in whole pages
        but at the file's end (called by the pusher's thread)."""
        with self._lock:
            start = self._push_from()
            if start is None:
                return None
            stop, limit = start, min(self.size, self._end + self._pf.push_ahead)
            if limit < self.size:
                limit -= limit % PAGE  # a push ends at a page boundary, or at the file's end
            spans: list[tuple[_Window, list[Buffer], int]] = []
            while stop < limit and (window := self._covering(stop, stop + 1)) is not None:
                pieces = window.made(0) if window.future.done() else None
                if pieces is None:
                    break
                spans.append((window, pieces, stop))
                stop = min(window.stop, limit)
            if stop < self.size:
                stop -= stop % PAGE  # a part of a page waits for the window after it
            if stop <= start:
                return None
            views: list[Buffer] = []
            for window, pieces, at in spans:
                if at < stop:
                    views += window.views(pieces, at, min(window.stop, stop))
            self._pushed, self._pushing = stop, start
            self._schedule()
            return Push(start, views, self._generation)

    def _new_pushes(self, pushed: int) -> None:
        """Pushes begin anew (lock held): the one under way is stale (it stops at its next
        piece), the next starts at `pushed` or `push_gap` beyond the last read."""
        self._generation += 1
        self._pushed = pushed
        self._pushing = None

    def current(self, push: Push) -> bool:
        """Whether `push` is still of this stream (no jump elsewhere, no close since)."""
        return push.generation == self._generation

    def pushed(self, push: Push) -> None:
        """Its bytes are in the kernel now: the windows within them are let go (kept until
        then: a reader that catches up with the pusher is served from them)."""
        start, stop = push.start, push.stop
        with self._lock:
            if self.current(push):
                self._pushing = None
                self._drop(lambda w: w.start >= start and w.stop <= stop)

    def push_failed(self, push: Push, offset: int) -> bool:
        """Bytes from `offset` on did not reach the kernel: no more pushes for this handle
        (whatever made `push` stale since: a push of the stream's next part would meet the
        same kernel), the reader's requests from there on are served as without pushes.
        False for a closed handle (its inode may be forgotten: not a failure)."""
        with self._lock:
            if self._closed:
                return False
            # (a stale push's `offset` is of the stream before: the one pusher thread handed
            # this stream no push yet, so where its pushes end stays)
            self._stop_pushing(offset if self.current(push) else self._pushed)
            return True

    def _asked_pushed(self, offset: int, stop: int) -> None:
        """A read of pushed bytes whose window was let go (lock held): the kernel dropped the
        pages, or the reader reads past them (O_DIRECT): pushing does not serve this reader,
        it is served as without pushes from here on. (While a push is under way its windows
        are kept, and a request in flight holds its pages from the push until answered.)"""
        last = min(stop, self._pushed) - 1
        if self._push is not None and offset <= last and self._covering(last, last + 1) is None:
            self._stop_pushing(offset)

    def _stop_pushing(self, offset: int) -> None:
        self._push = None
        self._pushed = min(self._pushed, offset)
        self._pushing = None

    def _drop(self, which: Callable[[_Window], bool]) -> None:
        keep: list[_Window] = []
        for window in self._windows:
            if which(window):
                self._release(window)
            else:
                keep.append(window)
        self._windows = keep

    def _release(self, window: _Window) -> None:
        n, whole = window.stop - window.start, window.whole
        if window.future.cancel() or window.future.done():
            self._give(n, whole)
        else:  # still being made: its bytes are held until it finishes
            window.future.add_done_callback(lambda _: self._give(n, whole))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._new_pushes(0)
            self._drop(lambda w: True)
