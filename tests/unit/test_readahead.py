"""Read-ahead never changes the bytes a read returns, and keeps to its memory budget."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.diskstore import DiskStore
from dcorfs.cache.identity import ObjectId
from dcorfs.errors import TransientError
from dcorfs.fs.content import FileContent, PartsContent, RowContent, StaticContent
from dcorfs.fs.producers.passthrough import ObjectContent
from dcorfs.fs.readahead import Prefetcher

KIB = 1 << 10
TRUTH = np.random.default_rng(3).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
ROW = 1000  # bytes per row: windows never line up with rows


class Rows:
    """Rows of TRUTH, made slowly and sometimes failing; counts what is made at once."""

    def __init__(self, *, fail_rate: float = 0.0, seed: int = 0) -> None:
        self.fail_rate = fail_rate
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.calls = 0

    def __call__(self, first: int, last: int, deadline: float) -> bytes:
        with self.lock:
            self.calls += 1
            fail = self.random.random() < self.fail_rate
        time.sleep(0.0005)
        if fail:
            raise TransientError("injected")
        return TRUTH[first * ROW : last * ROW]


def content(rows: Rows, *, pieced: bool = False) -> FileContent:
    """The header and TRUTH's rows; `pieced`: as a header part and an object of small blocks
    (windows are then made as many pieces, see `read_pieces`), else as one `RowContent`."""
    count = (len(TRUTH) - 64) // ROW
    if not pieced:
        return RowContent(b"HEAD" * 16, row_bytes=ROW, count=count, rows=rows)
    obj = ObjectId(key="truth", etag="1", size=count * ROW)

    def fetch(obj: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        return rows(0, 0, deadline) + TRUTH[start:stop]  # rows: delays and failures

    blocks = BlockCache(fetch=fetch, store=None, block_size=3 * KIB + 5, parallel=1)
    return PartsContent(
        64 + obj.size, [(0, StaticContent(b"HEAD" * 16)), (64, ObjectContent(blocks, obj))]
    )


def expected(offset: int, length: int, size: int) -> bytes:
    whole = (b"HEAD" * 16 + TRUTH)[:size]
    return whole[offset : offset + length]


def small_prefetcher(budget: int = 256 * KIB, **more: int) -> Prefetcher:
    """A prefetcher of small windows (`more`: other settings, e.g. of pushes)."""
    return Prefetcher(
        budget_bytes=budget,
        workers=3,
        initial=16 * KIB,
        cap=64 * KIB,
        stream=32 * KIB,
        back=32 * KIB,
        forward=256 * KIB,
        timeout=30,
        **more,
    )


@contextmanager
def prefetcher(budget: int = 256 * KIB) -> Iterator[Prefetcher]:
    made = small_prefetcher(budget)
    try:
        yield made
    finally:
        made.close()


def pattern() -> st.SearchStrategy[list[tuple[str, int, int]]]:
    """Access patterns: sequential streams of kernel-like reads, with random jumps."""
    step = st.tuples(
        st.sampled_from(["seq", "seq", "seq", "jump", "back"]),
        st.integers(0, 3 << 20),
        st.sampled_from([4 * KIB, 128 * KIB, 7 * KIB + 3, 1]),
    )
    return st.lists(step, min_size=1, max_size=60)


def walk(steps: list[tuple[str, int, int]]) -> Iterator[tuple[int, int]]:
    pos = 0
    for kind, where, length in steps:
        if kind == "jump":
            pos = where
        elif kind == "back":
            pos = max(0, pos - 3 * length)
        yield pos, length
        pos += length


@settings(max_examples=60, deadline=None)
@given(pattern(), st.booleans(), st.booleans())
def test_reads_and_peeks_return_the_truth(
    steps: list[tuple[str, int, int]], peek: bool, pieced: bool
) -> None:
    with prefetcher() as pf:
        reader = pf.wrap(content(Rows(), pieced=pieced))
        for offset, length in walk(steps):
            want = expected(offset, length, reader.size)
            if peek:
                got = reader.peek(offset, length)
                if got is not None:
                    assert got == want
                    continue
            assert reader.read(offset, length, deadline=time.monotonic() + 30) == want
        reader.close()
        assert pf.budget.peak <= pf.budget.limit


@settings(max_examples=30, deadline=None)
@given(pattern(), st.integers(0, 1000), st.booleans())
def test_failures_never_give_wrong_bytes(
    steps: list[tuple[str, int, int]], seed: int, pieced: bool
) -> None:
    with prefetcher() as pf:
        reader = pf.wrap(content(Rows(fail_rate=0.3, seed=seed), pieced=pieced))
        for offset, length in walk(steps):
            try:
                got = reader.read(offset, length, deadline=time.monotonic() + 30)
            except TransientError:
                continue
            assert got == expected(offset, length, reader.size)
        reader.close()


def test_a_stream_is_served_ahead_and_memory_is_given_back() -> None:
    with prefetcher() as pf:
        rows = Rows()
        reader = pf.wrap(content(rows))
        inline = 0
        for offset in range(0, 2 << 20, 16 * KIB):
            got = None
            for _ in range(200):  # the made window turns up without blocking
                got = reader.peek(offset, 16 * KIB)
                if got is not None or offset < 64 * KIB:
                    break
                time.sleep(0.001)
            if got is None:
                got = reader.read(offset, 16 * KIB, deadline=time.monotonic() + 30)
            else:
                inline += 1
            assert got == expected(offset, 16 * KIB, reader.size)
            assert pf.budget.used <= pf.budget.limit
        assert inline > 100  # most of the stream came from windows made ahead
        assert pf.counters["windows"] > 10
        reader.close()
        deadline = time.monotonic() + 10
        while pf.budget.used and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pf.budget.used == 0
        assert pf.budget.peak <= pf.budget.limit


def test_random_reads_make_nothing_ahead() -> None:
    with prefetcher() as pf:
        rows = Rows()
        reader = pf.wrap(content(rows))
        rng = random.Random(5)
        for _ in range(50):
            offset = rng.randrange(0, reader.size - 4 * KIB)
            assert reader.read(offset, 4 * KIB, deadline=time.monotonic() + 30) == expected(
                offset, 4 * KIB, reader.size
            )
        assert pf.counters["windows"] == 0
        assert rows.calls == 50


def test_random_page_faults_of_a_large_file_make_nothing_ahead() -> None:
    """As an mmap reader of random events of image.npy (400 MB): 128 KiB reads far apart,
    with the real policy's sizes; the occasional short jump forward is not a stream."""
    big = RowContent(b"H" * 128, row_bytes=20000, count=20000, rows=lambda a, b, d: bytes(b - a))
    made = Prefetcher(budget_bytes=48 << 20)
    try:
        reader = made.wrap(big)
        for i in random.Random(0).sample(range(20000), 200):
            offset = (128 + i * 20000) // (128 * KIB) * (128 * KIB)
            if reader.peek(offset, 128 * KIB) is None:
                reader.read(offset, 128 * KIB, deadline=time.monotonic() + 30)
        assert made.counters["windows"] == 0
    finally:
        made.close()


def test_many_readers_share_one_budget() -> None:
    with prefetcher(budget=128 * KIB) as pf:
        errors: list[BaseException] = []

        def stream(start: int) -> None:
            reader = pf.wrap(content(Rows()))
            try:
                for offset in range(start, start + (1 << 20), 32 * KIB):
                    got = reader.read(offset, 32 * KIB, deadline=time.monotonic() + 30)
                    assert got == expected(offset, 32 * KIB, reader.size)
                    assert pf.budget.used <= pf.budget.limit
            except BaseException as exc:  # reported below
                errors.append(exc)
            finally:
                reader.close()

        threads = [threading.Thread(target=stream, args=(i * 300 * KIB,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert pf.budget.peak <= pf.budget.limit


@pytest.mark.parametrize("size", [0, 1])
def test_tiny_files(size: int) -> None:
    with prefetcher() as pf:
        reader = pf.wrap(RowContent(b"x" * size, row_bytes=1, count=0, rows=Rows()))
        assert reader.read(0, 100, deadline=time.monotonic() + 1) == b"x" * size
        assert reader.peek(0, 100) == b"x" * size


def test_a_window_made_is_cut_right_by_readers_at_once() -> None:
    """Kernel read-ahead requests of one window arrive in parallel: each reader's first look
    at the made window must see its piece offsets whole (they were once filled in place, and
    a reader could cut with half of them: IndexError, EIO)."""
    import concurrent.futures
    import sys

    from dcorfs.fs.readahead import _Window

    pieces = [bytes([i % 256]) * 10 for i in range(2000)]
    truth = b"".join(pieces)
    errors: list[BaseException] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(300):
            made: concurrent.futures.Future[list[bytes]] = concurrent.futures.Future()
            made.set_result(pieces)
            window = _Window(1000, 1000 + len(truth), made)
            barrier = threading.Barrier(4)

            def read(window: _Window = window, barrier: threading.Barrier = barrier) -> None:
                try:
                    barrier.wait()
                    got = window.made(1.0)
                    assert got is not None
                    offset = 1000 + len(truth) - 150
                    assert window.cut(got, offset, offset + 120) == truth[-150:-30]
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=read) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


@pytest.mark.parametrize("first", [0, 50 * KIB + 7])
def test_a_small_file_is_made_whole_at_its_first_read(first: int) -> None:
    """Its first read (wherever it starts) makes the whole file at once; every later read is
    served from that, without blocking (`peek`) and without making anything again; read to
    its end, its bytes are given back to the budget (before the handle is closed)."""
    rows = Rows()
    small = RowContent(b"HEAD" * 16, row_bytes=ROW, count=200, rows=rows)
    with prefetcher(budget=1024 * KIB) as made:
        handle = made.wrap(small)
        assert handle.read(first, 128 * KIB, deadline=time.monotonic() + 30) == expected(
            first, 128 * KIB, small.size
        )
        assert rows.calls == 1
        assert made.budget.used == small.size
        for offset in range(0, small.size, 32 * KIB):
            assert handle.peek(offset, 32 * KIB) == expected(offset, 32 * KIB, small.size)
        assert rows.calls == 1
        assert made.budget.used == 0 and made.small_budget.used == 0
        handle.close()


class OnDisk:
    """An object of TRUTH's first `size` bytes whose bytes [0, `upto`) are in a disk store
    (fetched through a cache of their own): `cache()` is a new cache over that store, its
    memory empty; `fetched` the ranges fetched since."""

    def __init__(self, tmp_path: Path, size: int, upto: int, key: str = "obj") -> None:
        self.obj = ObjectId(key=key, etag="1", size=size)
        self.fetched: list[tuple[int, int]] = []
        self.store = DiskStore(tmp_path / "cache", limit_bytes=8 << 20, block_size=64 * KIB)
        self.cache().read(self.obj, 0, upto, deadline=time.monotonic() + 30)
        self.fetched.clear()

    def fetch(self, obj: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        self.fetched.append((start, stop))
        return TRUTH[start:stop]

    def cache(self) -> BlockCache:
        return BlockCache(fetch=self.fetch, store=self.store, block_size=64 * KIB)


def test_a_small_file_on_disk_is_made_whole_by_a_peek(tmp_path: Path) -> None:
    """`peek(disk=True)` of a small file whose blocks are all in the disk cache makes it
    whole at its first read, as `read` would (later peeks, even without the disk, are served
    from that window); with a block not on disk it gives nothing and fetches nothing."""
    size = 200 * KIB + 7
    # all but the last block's last byte: the last block is stored too
    disk = OnDisk(tmp_path, size, size - 1, key="small")
    stored = disk.cache()
    with prefetcher(budget=1024 * KIB) as made:
        handle = made.wrap(ObjectContent(stored, disk.obj))
        assert handle.peek(70 * KIB, 4 * KIB) is None  # memory alone
        assert handle.peek(70 * KIB, 4 * KIB, disk=True) == TRUTH[70 * KIB : 74 * KIB]
        assert made.budget.used == size  # the whole file, one window
        for offset in range(0, size, 32 * KIB):
            assert handle.peek(offset, 32 * KIB) == TRUTH[offset : min(size, offset + 32 * KIB)]
        handle.close()
        other = ObjectId(key="other", etag="1", size=size)  # nothing of it stored
        handle = made.wrap(ObjectContent(stored, other))
        assert handle.peek(0, 4 * KIB, disk=True) is None
        assert made.budget.used == 0
        handle.close()
    assert disk.fetched == []


def test_a_peek_from_the_disk_leaves_a_window_being_made_to_it(tmp_path: Path) -> None:
    """A read of a stream covered by a window still being made is not read from the disk as
    well, though its bytes are there: the peek gives nothing (the reader waits for the window
    in a thread). (Windows are made for streams only, so the stream's rule alone gives this
    too: the window's is a guard.)"""
    gate = threading.Event()
    disk = OnDisk(tmp_path, len(TRUTH), len(TRUTH))
    obj = disk.obj
    on_disk = ObjectContent(disk.cache(), obj)

    class Held:
        """The stored object, whose reads (windows) wait for the gate; its peeks do not."""

        size = obj.size

        def read(self, offset: int, length: int, *, deadline: float) -> bytes:
            gate.wait(30)
            return on_disk.read(offset, length, deadline=deadline)

        def peek(self, offset: int, length: int, *, disk: bool = False) -> bytes | None:
            return on_disk.peek(offset, length, disk=disk)

    with prefetcher(budget=1024 * KIB) as made:
        handle = made.wrap(Held())
        gate.set()
        for offset in range(0, 64 * KIB, 16 * KIB):  # a stream: windows are made ahead
            data = handle.read(offset, 16 * KIB, deadline=time.monotonic() + 30)
            assert data == TRUTH[offset : offset + 16 * KIB]
        gate.clear()  # windows scheduled from now on are held

        def only_on_disk() -> int | None:
            """Bytes of a window being made that are on disk, not in memory (a window made
            before the gate closed may have brought a block of the next one into memory)."""
            for window in [w for w in handle._windows if not w.future.done()]:
                for at in range(window.start, window.stop - 4 * KIB + 1, 4 * KIB):
                    if on_disk.peek(at, 4 * KIB) is None:
                        return at
            return None

        offset, spot = 64 * KIB, None
        while spot is None and offset < 1024 * KIB:
            handle.peek(offset, 16 * KIB)  # served from made windows, moves the stream on
            spot = only_on_disk()
            offset += 16 * KIB
        assert spot is not None, "no window being made over bytes only on disk"
        assert handle.peek(spot, 4 * KIB, disk=True) is None
        assert disk.cache().peek(obj, spot, spot + 4 * KIB, disk=True) is not None  # on disk
        gate.set()
        handle.close()


def test_a_stream_is_not_read_from_the_disk_on_the_fuse_thread(tmp_path: Path) -> None:
    """Within a stream a read not covered by a window is left to `read` (which makes the
    next window in a thread, from the disk as from anywhere); a read elsewhere, random, is
    served from the disk by the peek (here no window can be made: no budget)."""
    disk = OnDisk(tmp_path, len(TRUTH), len(TRUTH))
    stored = ObjectContent(disk.cache(), disk.obj)
    with prefetcher(budget=0) as made:
        handle = made.wrap(stored)
        for offset in (0, 16 * KIB):  # then a stream: 32 KiB read in sequence
            assert handle.peek(offset, 16 * KIB, disk=True) == TRUTH[offset : offset + 16 * KIB]
        assert not handle._windows
        # the stream's next bytes: from memory (the first block, kept), not from the disk
        assert handle.peek(32 * KIB, 16 * KIB, disk=True) == TRUTH[32 * KIB : 48 * KIB]
        assert handle.peek(64 * KIB, 16 * KIB, disk=True) is None
        far = 2 << 20  # a jump: random access, served
        assert handle.peek(far, 4 * KIB, disk=True) == TRUTH[far : far + 4 * KIB]
        handle.close()


def test_a_small_file_partly_on_disk_is_left_to_read(tmp_path: Path) -> None:
    """Its first read is not served from the disk by a peek (its next reads would each fetch
    one block): `read` makes it whole, fetching what is missing at once; a read past its end
    is empty."""
    size = 200 * KIB + 7
    disk = OnDisk(tmp_path, size, 4 * KIB, key="small")  # block 0 alone on disk
    with prefetcher(budget=1024 * KIB) as made:
        handle = made.wrap(ObjectContent(disk.cache(), disk.obj))
        assert handle.peek(size + 10, 4 * KIB, disk=True) == b""
        assert handle.peek(0, 4 * KIB, disk=True) is None and made.budget.used == 0
        assert handle.read(0, 4 * KIB, deadline=time.monotonic() + 30) == TRUTH[: 4 * KIB]
        assert disk.fetched == [(64 * KIB, size)] and made.budget.used == size
        handle.close()


def test_small_files_made_whole_take_a_quarter_of_the_budget_at_most() -> None:
    """Handles of small files kept open (and not read to their end) leave room for streams."""
    with prefetcher(budget=1024 * KIB) as made:
        handles = []
        for _ in range(4):
            handle = made.wrap(RowContent(b"", row_bytes=ROW, count=100, rows=Rows()))
            assert handle.read(0, 4 * KIB, deadline=time.monotonic() + 30) == TRUTH[: 4 * KIB]
            handles.append(handle)
        assert made.small_budget.used == 2 * 100 * ROW  # two fit in 256 KiB, not more
        assert made.budget.used == made.small_budget.used
        for handle in handles:
            handle.close()
        assert made.budget.used == 0 and made.small_budget.used == 0


def test_a_small_file_read_is_not_failed_by_bytes_it_did_not_ask_for() -> None:
    """Making the whole file fails (a part past the read fails): the read gets its own
    bytes from the content alone."""

    def rows(first: int, last: int, deadline: float) -> bytes:
        if last > 10:
            raise TransientError("injected past the read")
        return TRUTH[first * ROW : last * ROW]

    small = RowContent(b"", row_bytes=ROW, count=100, rows=rows)
    with prefetcher(budget=1024 * KIB) as made:
        handle = made.wrap(small)
        assert handle.read(0, 4 * KIB, deadline=time.monotonic() + 30) == TRUTH[: 4 * KIB]
        assert made.budget.used == 0
        handle.close()
