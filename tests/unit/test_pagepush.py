"""Made read-ahead windows pushed into the kernel's page cache (`fs.pagepush`): what reaches
the kernel is the file's bytes, in whole pages, never past its end; a failed push leaves the
reader served as without pushes. The kernel is a fake here (the transport boundary: FUSE's
notify_store); a real mount pushes in tests/mount/test_mount.py."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcorfs.fs.content import Buffer
from dcorfs.fs.pagepush import PAGE, PagePusher, Push, whole_pages
from dcorfs.fs.readahead import Prefetcher, ReadAhead

from .test_readahead import KIB, Rows, content, expected
from .test_readahead import small_prefetcher as readahead_prefetcher

INODE = 7


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3 * PAGE + 5), max_size=12), st.integers(0, 3))
def test_whole_pages_cut_any_pieces_at_page_boundaries(lengths: list[int], page: int) -> None:
    pieces = [bytes([i % 251]) * n for i, n in enumerate(lengths)]
    out = whole_pages(page * PAGE, pieces)
    assert b"".join(bytes(data) for _, data in out) == b"".join(pieces)
    at = page * PAGE
    for i, (offset, data) in enumerate(out):
        assert offset == at and offset % PAGE == 0
        assert len(data) > 0
        assert len(data) % PAGE == 0 or i == len(out) - 1
        at += len(data)


class Kernel:
    """The page cache of one file, as FUSE keeps it: pushed pages (notify_store marks a page
    read only when one push fills it from its start, or up to the file's end) and pages a
    read request filled. `fail`: (errno, from which push) the store raises."""

    def __init__(
        self, size: int, fail: tuple[int, int] | None = None, *, keep: bool = True
    ) -> None:
        """`keep` False: pushed pages are dropped at once (as under memory pressure)."""
        self.size = size
        self.keep = keep
        self.pages: dict[int, bytes] = {}
        self.lock = threading.Lock()
        self.stores = 0
        self.pushed_pages = 0
        self.requests = 0
        self.fail = fail

    def store(self, inode: int, offset: int, data: Buffer) -> None:
        assert inode == INODE
        assert offset % PAGE == 0, offset
        assert offset + len(data) <= self.size, (offset, len(data))  # would grow the file
        assert len(data) % PAGE == 0 or offset + len(data) == self.size, (offset, len(data))
        with self.lock:
            self.stores += 1
            if self.fail is not None and self.stores > self.fail[1]:
                raise OSError(self.fail[0], "injected")
            for at in range(0, len(data), PAGE):
                if self.keep:
                    self.pages[(offset + at) // PAGE] = bytes(data[at : at + PAGE])
                self.pushed_pages += 1

    def read_all(self, reader: ReadAhead, *, pause: int | None = None, stores: int = 1) -> bytes:
        """A sequential reader: cached pages from the page cache, the rest asked for in
        requests of up to 128 KiB (each up to the next cached page), as the kernel does.
        `pause`: having read that many bytes, wait (up to 10 s) for `stores` pushes."""
        out = bytearray()
        while len(out) < self.size:
            if pause is not None and len(out) >= pause:
                pause, deadline = None, time.monotonic() + 10
                while self.stores < stores and time.monotonic() < deadline:
                    time.sleep(0.001)
            page = len(out) // PAGE
            with self.lock:
                cached = self.pages.get(page)
            if cached is not None:
                out += cached
                continue
            stop = min(self.size, len(out) + 128 * KIB)
            with self.lock:
                for later in range(page + 1, -(-stop // PAGE)):
                    if later in self.pages:
                        stop = later * PAGE
                        break
            offset, length = len(out), stop - len(out)
            self.requests += 1
            data = reader.peek(offset, length)
            if data is None:
                data = reader.read(offset, length, deadline=time.monotonic() + 30)
            assert len(data) == length
            out += data
            time.sleep(0.0002)  # the reader's own work: the pusher gets ahead now and then
        return bytes(out)


def small_prefetcher() -> Prefetcher:
    """test_readahead's sizes, with pushes from 64 to 256 KiB beyond the last read."""
    return readahead_prefetcher(512 * KIB, push_gap=64 * KIB, push_ahead=256 * KIB)


@contextmanager
def pushing(kernel: Kernel) -> Iterator[tuple[Prefetcher, PagePusher, ReadAhead]]:
    pf = small_prefetcher()
    pusher = PagePusher(kernel.store)
    reader = pf.wrap(content(Rows(), pieced=True), push=lambda source: pusher.wake(INODE, source))
    try:
        yield pf, pusher, reader
    finally:
        reader.close()
        pusher.close()
        pf.close()


def first_push(reader: ReadAhead, at: int) -> Push:
    """Read on in 16 KiB from `at` until the reader has bytes to push (no pusher thread)."""
    while at < reader.size:
        reader.read(at, 16 * KIB, deadline=time.monotonic() + 30)
        at += 16 * KIB
        for _ in range(50):  # the windows ahead being made
            if (push := reader.pushable()) is not None:
                return push
            time.sleep(0.001)
    raise AssertionError("nothing to push")


def settled(pf: Prefetcher) -> None:
    deadline = time.monotonic() + 10
    while pf.budget.used and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_stream_is_pushed_and_reads_the_truth() -> None:
    probe = content(Rows(), pieced=True)
    kernel = Kernel(probe.size)
    with pushing(kernel) as (pf, pusher, reader):
        assert kernel.read_all(reader, pause=256 * KIB) == expected(0, probe.size, probe.size)
        assert pusher.counters["pushes"] > 0 and pusher.counters["push_failures"] == 0
        assert kernel.pushed_pages > 0  # and those pages were not asked for (`read_all`)
        truth = expected(0, probe.size, probe.size)
        for page, data in kernel.pages.items():  # pushed behind the reader too: all right
            assert data == truth[page * PAGE : page * PAGE + PAGE], page
        assert pusher.counters["pushed_bytes"] == kernel.pushed_pages * PAGE - (
            -probe.size % PAGE if (probe.size - 1) // PAGE in kernel.pages else 0
        )
        reader.close()
        settled(pf)
        assert pf.budget.used == 0  # windows pushed or read were all given back
        assert pf.budget.peak <= pf.budget.limit


def test_a_failed_push_leaves_the_reader_served_without_pushes() -> None:
    probe = content(Rows(), pieced=True)
    kernel = Kernel(probe.size, fail=(errno.ENOENT, 0))  # as when the kernel forgot the inode
    with pushing(kernel) as (pf, pusher, reader):
        got = kernel.read_all(reader, pause=256 * KIB, stores=1)  # the pusher meets the failure
        assert got == expected(0, probe.size, probe.size)
        assert pusher.counters["push_failures"] == 1  # and that handle pushed no more
        assert kernel.stores == 1
        assert pusher.active  # another handle would still push
        reader.close()
        settled(pf)
        assert pf.budget.used == 0


def test_a_reader_that_does_not_use_pushed_pages_stops_the_pushing() -> None:
    """Pushed pages the kernel dropped (memory pressure; an O_DIRECT reader reads past them)
    and whose window was let go: the reader asks for them, is served right, and the handle
    pushes no more (bytes still in a window are simply served from it)."""
    pf = small_prefetcher()
    try:
        reader = pf.wrap(content(Rows(), pieced=True), push=lambda source: None)
        at, dropped = 0, None
        while dropped is None:  # a push that let a window go (windows need not align with it)
            push = first_push(reader, at)
            reader.pushed(push)  # pushed, and its windows let go; then the pages are dropped
            at = reader._end
            gone = (o for o in range(push.start, push.stop, PAGE) if not reader._covering(o, o + 1))
            dropped = next(gone, None)
        offset = reader._end
        while offset < reader.size:  # up to those bytes, through them, and on
            got = reader.read(offset, 16 * KIB, deadline=time.monotonic() + 30)
            assert got == expected(offset, 16 * KIB, reader.size)
            offset += 16 * KIB
            if offset > dropped:
                assert reader.pushable() is None, offset
        reader.close()
    finally:
        pf.close()


def test_a_reader_that_catches_up_with_the_push_under_way_makes_it_stale() -> None:
    """Pushes begin `push_gap` beyond the last request, so the kernel's requests of the
    stream (and its read-ahead) are before them; but a reader that reads pushed pages faster
    than they are pushed asks for pages of the push under way: the rest of that push would
    copy pages being asked for anyway (after waiting for those requests), so it stops, and
    pushing goes on from `push_gap` beyond that read. Reads before the push leave it be."""
    pf = small_prefetcher()
    try:
        reader = pf.wrap(content(Rows(), pieced=True), push=lambda source: None)
        push = first_push(reader, 0)
        before = reader._end
        assert before + 16 * KIB <= push.start  # (the gap)
        reader.read(before, 16 * KIB, deadline=time.monotonic() + 30)
        assert reader.current(push)  # a request before the push: no matter
        at = push.start + PAGE  # read through pushed pages up to here, then a request
        assert reader.read(at, 16 * KIB, deadline=time.monotonic() + 30) == expected(
            at, 16 * KIB, reader.size
        )
        assert not reader.current(push)
        reader.pushed(push)  # (what the pusher does not do with a stale push: no matter)
        following = None
        for _ in range(500):  # the windows there being made
            if (following := reader.pushable()) is not None:
                break
            time.sleep(0.002)
        assert following is not None and following.start >= at + 16 * KIB + 64 * KIB
        reader.close()
    finally:
        pf.close()


def test_a_push_of_a_stream_that_went_elsewhere_is_stale() -> None:
    wakes: list[object] = []
    pf = small_prefetcher()
    try:
        reader = pf.wrap(content(Rows(), pieced=True), push=wakes.append)
        push = first_push(reader, 0)
        assert reader.current(push) and wakes
        reader.read(2 << 20, 4 * KIB, deadline=time.monotonic() + 30)  # elsewhere
        assert not reader.current(push)
        again = first_push(reader, (2 << 20) + 4 * KIB)  # the new stream pushes
        assert again.start > 2 << 20 and reader.current(again)
        reader.close()
        assert not reader.current(again)
    finally:
        pf.close()


def test_a_failed_push_stops_the_pushing_even_when_the_stream_went_on() -> None:
    """The kernel refused a push (it forgot the inode, the mount is going away) that a read
    made stale meanwhile: the stream's next pushes would meet the same kernel, so the handle
    pushes no more (and is served as without pushes); a closed handle's failure is none."""
    pf = small_prefetcher()
    try:
        reader = pf.wrap(content(Rows(), pieced=True), push=lambda source: None)
        push = first_push(reader, 0)
        reader.read(2 << 20, 4 * KIB, deadline=time.monotonic() + 30)  # elsewhere
        assert not reader.current(push)
        assert reader.push_failed(push, push.start)  # a failure, and the end of pushing
        at = (2 << 20) + 4 * KIB
        while at < reader.size:  # the new stream is served right, and pushes nothing
            assert reader.read(at, 64 * KIB, deadline=time.monotonic() + 30) == expected(
                at, 64 * KIB, reader.size
            )
            assert reader.pushable() is None, at
            at += 64 * KIB
        reader.close()
        assert not reader.push_failed(push, push.start)  # closed: not a failure
    finally:
        pf.close()


def test_a_kernel_without_pushes_turns_the_pusher_off() -> None:
    probe = content(Rows(), pieced=True)
    kernel = Kernel(probe.size, fail=(errno.ENOSYS, 0))
    with pushing(kernel) as (_, pusher, reader):
        got = kernel.read_all(reader, pause=256 * KIB, stores=1)
        assert got == expected(0, probe.size, probe.size)
        assert not pusher.active
        assert kernel.stores == 1 and kernel.pushed_pages == 0


def test_random_reads_push_nothing() -> None:
    probe = content(Rows(), pieced=True)
    kernel = Kernel(probe.size)
    with pushing(kernel) as (_, pusher, reader):
        for offset in range(probe.size - 4 * KIB, 0, -97 * KIB):
            got = reader.read(offset, 4 * KIB, deadline=time.monotonic() + 30)
            assert got == expected(offset, 4 * KIB, probe.size)
        time.sleep(0.05)
        assert kernel.stores == 0 and pusher.counters["pushes"] == 0


@pytest.mark.parametrize(
    ("fail", "open_", "counted", "active"),
    [
        (errno.ENOENT, True, 1, True),  # stale but open: a failure, the pusher goes on
        (errno.ENOSYS, True, 1, False),  # … and a kernel without pushes ends them all
        (errno.ENOSYS, False, 0, True),  # closed meanwhile: no failure, whatever it was
    ],
)
def test_the_pusher_counts_what_the_handle_says_is_a_failure(
    fail: int, open_: bool, counted: int, active: bool
) -> None:
    """A push refused after a read made it stale (it was current when its piece was
    stored): counted as the handle's `push_failed` says, not by asking `current` again."""
    kernel = Kernel(1 << 20, fail=(fail, 0))
    pusher = PagePusher(kernel.store)

    class Source:
        def __init__(self) -> None:
            self.checks = 0
            self.failed: list[int] = []

        def pushable(self) -> Push | None:
            return Push(0, [b"x" * PAGE], 0) if not self.failed else None

        def current(self, push: Push) -> bool:
            self.checks += 1
            return self.checks == 1  # stale once its piece was handed to the kernel

        def pushed(self, push: Push) -> None:
            raise AssertionError("nothing was pushed")

        def push_failed(self, push: Push, offset: int) -> bool:
            self.failed.append(offset)
            return open_

    source = Source()
    try:
        pusher.wake(INODE, source)
        deadline = time.monotonic() + 10
        while not source.failed and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert source.failed == [0] and kernel.stores == 1
        assert pusher.counters["push_failures"] == counted
        assert pusher.active is active
    finally:
        pusher.close()


def test_a_closed_pusher_stops_and_takes_no_more() -> None:
    kernel = Kernel(1 << 20)
    pusher = PagePusher(kernel.store)

    class Source:
        def __init__(self) -> None:
            self.asked = 0

        def pushable(self) -> Push | None:
            self.asked += 1
            return Push(0, [b"x" * PAGE], 0) if self.asked == 1 else None

        def current(self, push: Push) -> bool:
            return True

        def pushed(self, push: Push) -> None:
            pass

        def push_failed(self, push: Push, offset: int) -> bool:
            raise AssertionError("no failure here")

    source = Source()
    pusher.wake(INODE, source)
    deadline = time.monotonic() + 10
    while source.asked < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    pusher.close()
    assert not any(t.name == "page-push" and t.is_alive() for t in threading.enumerate())
    pusher.wake(INODE, source)
    time.sleep(0.05)
    assert kernel.stores == 1 and source.asked == 2
    assert not any(t.name == "page-push" and t.is_alive() for t in threading.enumerate())
