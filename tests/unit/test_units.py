"""The tiers between the cache and the kernel, called directly: names, producers, dcserv,
metastore, tree and fuse_ops."""

from __future__ import annotations

import concurrent.futures
import errno
import io
import os
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyfuse3
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dcorfs.cache.derived import DerivedCache
from dcorfs.cache.identity import ObjectId
from dcorfs.cache.metastore import Memo, MetaStore
from dcorfs.errors import AccessDenied, DeadlineExceeded, NotFound, TransientError
from dcorfs.fs.content import StaticContent
from dcorfs.fs.fuse_ops import Operations
from dcorfs.fs.names import sanitize, unique
from dcorfs.fs.producers.npy import npy_header
from dcorfs.fs.producers.text import table_bytes
from dcorfs.fs.producers.tsv import _format
from dcorfs.fs.s3tree import PLAIN_NAME, BucketResourceDir
from dcorfs.fs.tree import Context, Dir, File, LazyFile, Node, ResourceDir, StaticDir, static_file
from dcorfs.hdf5.rtdc import Feature
from dcorfs.opening.pools import Pools
from dcorfs.opening.resources import Resources, Texts
from dcorfs.opening.warm import Warmer
from dcorfs.remote.catalog import Catalog, Resource
from dcorfs.remote.dcserv import DcorApi, Locator, object_key, parse_basin
from dcorfs.settings import Token, parse_host, parse_size


def test_names_are_safe_and_unique() -> None:
    assert sanitize("a/b") == "a_b" and sanitize("..") == "_.._" and sanitize("") == "__"
    assert sanitize("x\0y") == "x_y"
    assert len(sanitize("é" * 300).encode()) <= 255
    named = unique([("M1.rtdc", "id-1", 1), ("M1.rtdc", "id-2", 2), ("m", "id-3", 3)])
    assert named == {"M1.rtdc": 1, "M1~id-2.rtdc": 2, "m": 3}
    long = unique([("a" * 300, "x", 1), ("a" * 300, "y", 2)])
    assert len(long) == 2 and all(len(n.encode()) <= 255 for n in long)


@given(
    hnp.arrays(
        dtype=st.sampled_from(["<f4", "<f8", "u1", "<u4", "<i2", "?"]),
        shape=st.tuples(st.integers(0, 5), st.integers(1, 3)),
    )
)
def test_npy_header_is_what_numpy_writes(array: np.ndarray) -> None:  # type: ignore[type-arg]
    buffer = io.BytesIO()
    np.save(buffer, array)
    header = npy_header(array.dtype, array.shape)
    assert buffer.getvalue()[: len(header)] == header
    assert len(header) % 64 == 0


@given(st.floats(width=32, allow_nan=False))
def test_float32_text_round_trips(value: float) -> None:
    fmt, width = _format(np.dtype("<f4"))
    text = fmt % np.float32(value)
    assert len(text) <= width
    assert np.float32(float(text)) == np.float32(value)


@given(st.floats(allow_nan=False))
def test_float64_text_round_trips(value: float) -> None:
    fmt, width = _format(np.dtype("<f8"))
    text = fmt % value
    assert len(text) <= width and float(text) == value


def test_table_csv_flattens_dcserv_rows() -> None:
    text = table_bytes([["a", "b"], [[[1.5, None]], [[2.0, 3]]]]).decode()
    assert text == "a,b\n1.5,nan\n2.0,3\n"


def test_settings_parsing() -> None:
    assert parse_host("dcor.mpl.mpg.de") == "https://dcor.mpl.mpg.de"
    assert parse_host("http://127.0.0.1:8765/") == "http://127.0.0.1:8765"
    assert parse_size("10G") == 10 << 30 and parse_size("512M") == 512 << 20
    token = Token("secret-value")
    assert "secret" not in repr(token) and "secret" not in f"{token}"


def test_basins_and_locator_renewal() -> None:
    basin = parse_basin(
        {
            "name": "resource-abc",
            "format": "http",
            "urls": ["http://h:1/circle-x/resource/abc/def/ghi?Expires=1&Signature=s"],
            "perishable": True,
            "time_request": 100.0,
            "time_expiration": 3700.0,
        }
    )
    assert basin.key == "circle-x/resource/abc/def/ghi" and basin.lifetime == 3600.0
    assert object_key("https://h/circle-x/condensed/a/b/c") == "circle-x/condensed/a/b/c"
    now = [0.0]
    renewals: list[float] = []

    def renew(deadline: float) -> tuple[str, float | None]:
        renewals.append(now[0])
        return f"url-{len(renewals)}", 3600.0

    locator = Locator(clock=lambda: now[0])
    locator.register(basin.key, basin.url, lifetime=basin.lifetime, renew=renew)
    assert locator.url(basin.key, deadline=1) == basin.url
    now[0] = 3600.0 - 30  # within the renewal margin
    assert locator.url(basin.key, deadline=1) == "url-1"
    assert locator.url(basin.key, deadline=1) == "url-1"
    assert locator.renew(basin.key, deadline=1) == "url-2"  # as after a 403
    with pytest.raises(NotFound):
        locator.url("unknown", deadline=1)
    locator.register("public", "u", lifetime=None)
    with pytest.raises(AccessDenied):
        locator.renew("public", deadline=1)


def test_memo_serves_stored_answers_offline(tmp_path: Path) -> None:
    path = tmp_path / "meta.sqlite3"
    calls: list[str] = []

    def online(deadline: float) -> Any:
        calls.append("ask")
        return {"v": 1}

    def offline(deadline: float) -> Any:
        raise TransientError("connection refused")

    memo = Memo(MetaStore(path, scope="h|public"))
    assert memo.get("k", online, max_age=100) == {"v": 1}
    assert memo.get("k", online, max_age=100) == {"v": 1}
    assert calls == ["ask"]
    again = Memo(MetaStore(path, scope="h|public"))
    assert again.get("k", offline, max_age=0) == {"v": 1}
    with pytest.raises(TransientError):
        again.get("other", offline, max_age=0)
    private = Memo(MetaStore(path, scope="h|private"))
    with pytest.raises(TransientError):  # answers of another scope are never used
        private.get("k", offline, max_age=0)
    assert path.stat().st_mode & 0o777 == 0o600

    def gone(deadline: float) -> Any:
        raise NotFound("deleted")

    with pytest.raises(NotFound):  # permanent errors are not masked by stored answers
        again.get("k", gone, max_age=0)
    with pytest.raises(DeadlineExceeded):
        again.get("new", lambda d: (_ for _ in ()).throw(DeadlineExceeded("slow")), max_age=0)


def test_memo_keeps_answers_that_may_grow_for_less_time(tmp_path: Path) -> None:
    """An answer's own content says how long it is kept (doc/DCOR.md §7): basins whose
    condensed entry has no `features` yet are asked again, complete ones never."""
    answers = iter([{"features": None}, {"features": ["deform"]}, {"features": []}])
    memo = Memo(MetaStore(tmp_path / "meta.sqlite3", scope="h|public"))

    def age(value: Any) -> float:
        return float("inf") if value["features"] is not None else 0.0

    def ask(deadline: float) -> Any:
        return next(answers)

    assert memo.get("k", ask, max_age=age) == {"features": None}
    assert memo.get("k", ask, max_age=age) == {"features": ["deform"]}
    assert memo.get("k", ask, max_age=age) == {"features": ["deform"]}


def test_memo_refreshes_listings_in_the_background(tmp_path: Path) -> None:
    """doc/DCOR.md §4: a stale listing is returned at once; one refresh at a time asks for
    it again, each page with a deadline of its own; a failed one keeps the listing and is
    retried after REFRESH_RETRY."""
    now = [0.0]
    memo = Memo(MetaStore(None, scope="h|public"), timeout=7.0, clock=lambda: now[0])
    held = threading.Event()
    deadlines: list[float] = []
    answers: list[Any] = [["a"]]

    def ask(deadline: Any) -> Any:
        deadlines.extend([deadline(), deadline()])  # two pages
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        held.wait(10)
        return answer

    held.set()
    first, asked = memo.listing("k", ask, max_age=0.0)  # nothing stored: waited for
    assert first == ["a"] and deadlines == [7.0, 7.0] and asked <= time.time()
    held.clear()
    answers.append(["a", "b"])
    assert memo.listing("k", ask, max_age=0.0)[0] == ["a"]  # at once; a refresh is held
    assert memo.listing("k", ask, max_age=0.0)[0] == ["a"]  # no second refresh meanwhile
    held.set()
    until = time.monotonic() + 10
    while memo.listing("k", ask, max_age=1000.0)[0] != ["a", "b"]:
        assert time.monotonic() < until
        time.sleep(0.01)
    assert answers == []
    answers.append(TransientError("connection refused"))
    assert memo.listing("k", ask, max_age=0.0)[0] == ["a", "b"]  # the refresh fails
    until = time.monotonic() + 10
    while answers:
        assert time.monotonic() < until
        time.sleep(0.01)
    time.sleep(0.1)
    answers.append(["c"])
    assert memo.listing("k", ask, max_age=0.0)[0] == ["a", "b"]  # not retried so soon
    assert answers == [["c"]]
    now[0] += 31.0
    memo.listing("k", ask, max_age=0.0)  # retried later
    until = time.monotonic() + 10
    while memo.listing("k", ask, max_age=1000.0)[0] != ["c"]:
        assert time.monotonic() < until
        time.sleep(0.01)


class Broken(File):
    def content(self) -> Any:
        raise RuntimeError("a bug below the FUSE layer")


def operations(root: StaticDir) -> Operations:
    return Operations(
        root=root,
        timeout=5,
        attr_time=3600,
        listing_time=300,
        negative_time=7,
        limiter=trio.CapacityLimiter(4),
    )


def make_ops() -> Operations:
    readme = File("/README.txt", size=5, make=lambda: StaticContent(b"hello"))
    broken = Broken("/broken", size=1, make=lambda: StaticContent(b"x"))
    root = StaticDir("/", {"README.txt": readme, "broken": broken, "sub": StaticDir("/sub", {})})
    return operations(root)


async def test_fuse_ops_called_directly() -> None:
    ops = make_ops()
    ctx: Any = None
    entry = await ops.lookup(pyfuse3.ROOT_INODE, b"README.txt", ctx)
    assert entry.st_size == 5 and entry.st_mode & 0o777 == 0o444
    assert entry.st_ino == (await ops.lookup(pyfuse3.ROOT_INODE, b"README.txt", ctx)).st_ino
    assert make_ops()._inode(ops._nodes[entry.st_ino], 1) == entry.st_ino  # stable numbers
    info = await ops.open(entry.st_ino, os.O_RDONLY, ctx)
    assert info.keep_cache and await ops.read(info.fh, 1, 3) == b"ell"
    with pytest.raises(pyfuse3.FUSEError) as caught:  # ENOSYS: the kernel stops sending FLUSH
        await ops.flush(info.fh)
    assert caught.value.errno == errno.ENOSYS and not ops.activity.counters["errors"]
    await ops.release(info.fh)
    negative = await ops.lookup(pyfuse3.ROOT_INODE, b"missing", ctx)
    assert negative.st_ino == 0 and negative.entry_timeout == 7
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await ops.open(entry.st_ino, flags, ctx)
        assert caught.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await ops.mkdir(pyfuse3.ROOT_INODE, b"x", 0o755, ctx)
    assert caught.value.errno == errno.EROFS
    broken = await ops.lookup(pyfuse3.ROOT_INODE, b"broken", ctx)
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await ops.open(broken.st_ino, os.O_RDONLY, ctx)
    assert caught.value.errno == errno.EIO and ops.activity.counters["errors"] == 1
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await ops.getattr(12345, ctx)
    assert caught.value.errno == errno.ENOENT
    await ops.forget([(entry.st_ino, 2)])
    with pytest.raises(pyfuse3.FUSEError):
        await ops.getattr(entry.st_ino, ctx)


class SlowDisk:
    """Bytes that are on a disk answering slowly: `peek` with `disk` takes 20 ms."""

    size = 5

    def __init__(self) -> None:
        self.disk_peeks = 0

    def read(self, offset: int, length: int, *, deadline: float) -> bytes:
        return b"hello"[offset : offset + length]

    def peek(self, offset: int, length: int, *, disk: bool = False) -> bytes | None:
        if not disk:
            return None
        self.disk_peeks += 1
        time.sleep(0.02)
        return b"hello"[offset : offset + length]


async def test_a_slow_disk_cache_is_read_in_threads_for_a_while() -> None:
    """Reads from the disk cache are served on the FUSE thread while it answers fast; one
    slower than `DISK_INLINE_SLOW` sends them to worker threads for `DISK_INLINE_PAUSE`."""
    content = SlowDisk()
    node = File("/slow", size=5, make=lambda: content)
    ops = operations(StaticDir("/", {"slow": node}))
    entry = await ops.lookup(pyfuse3.ROOT_INODE, b"slow", cast(Any, None))
    info = await ops.open(entry.st_ino, os.O_RDONLY, cast(Any, None))
    assert await ops.read(info.fh, 0, 5) == b"hello"  # on the FUSE thread, slowly
    assert ops.activity.counters["reads_inline"] == 1 and content.disk_peeks == 1
    assert await ops.read(info.fh, 1, 3) == b"ell"  # now in a thread
    assert ops.activity.counters["reads_waited"] == 1 and content.disk_peeks == 1
    ops._disk_inline_from = time.monotonic()  # (the pause is over)
    assert await ops.read(info.fh, 0, 2) == b"he"
    assert ops.activity.counters["reads_inline"] == 2 and content.disk_peeks == 2


class Early(Dir):
    """A directory whose listing is not made yet, with one child known without it (as a
    resource directory knows a scalar file once its condensed file is described)."""

    def __init__(self) -> None:
        super().__init__("/")
        self.known = File("/known.npy", size=2, make=lambda: StaticContent(b"ok"))
        self.looked_up: list[tuple[str, bool]] = []  # (name, on the calling thread)

    def ready_children(self) -> None:
        return None

    def ready_child(self, name: str) -> Node | None:
        return self.known if name == "known.npy" else None

    def lookup(self, name: str) -> Node:
        self.looked_up.append((name, threading.current_thread() is threading.main_thread()))
        raise NotFound(f"/{name} does not exist")


async def test_a_child_known_without_the_listing_is_looked_up_on_the_event_loop() -> None:
    """`lookup` answers from `ready_child` without a worker thread; other names go to the
    directory's blocking `lookup`, in a worker thread."""
    directory = Early()
    ops = operations(cast(StaticDir, directory))
    ctx: Any = None
    entry = await ops.lookup(pyfuse3.ROOT_INODE, b"known.npy", ctx)
    assert entry.st_size == 2 and directory.looked_up == []
    negative = await ops.lookup(pyfuse3.ROOT_INODE, b"other.npy", ctx)
    assert negative.st_ino == 0 and directory.looked_up == [("other.npy", False)]


class Swapping(Dir):
    """A directory whose one file is replaced by the test (as a resource directory replaces
    its volatile files once the condensed file comes)."""

    def __init__(self, child: File) -> None:
        super().__init__("/")
        self.child = child

    def ready_children(self) -> dict[str, Node]:
        return {"features.tsv": self.child}


async def test_a_replaced_volatile_file_never_takes_the_inode_of_the_one_still_held() -> None:
    """The kernel forgets the replacement's inode while a handle of the old file is open:
    looked up again, the replacement must not be given the old file's number (the kernel
    would take the old inode's pages and size for it, and the held handle the new size)."""
    old = File("/features.tsv", size=3, make=lambda: StaticContent(b"old"))
    old.volatile = True
    new = File("/features.tsv", size=5, make=lambda: StaticContent(b"newer"))
    directory = Swapping(old)
    ops = operations(cast(StaticDir, directory))
    ctx: Any = None
    held = await ops.lookup(pyfuse3.ROOT_INODE, b"features.tsv", ctx)
    info = await ops.open(held.st_ino, os.O_RDONLY, ctx)
    directory.child = new
    first = await ops.lookup(pyfuse3.ROOT_INODE, b"features.tsv", ctx)
    assert first.st_ino != held.st_ino and first.st_size == 5
    await ops.forget([(first.st_ino, 1)])  # the old inode stays: its file is open
    again = await ops.lookup(pyfuse3.ROOT_INODE, b"features.tsv", ctx)
    assert again.st_ino != held.st_ino and again.st_size == 5
    assert (await ops.getattr(held.st_ino, ctx)).st_size == 3
    assert await ops.read(info.fh, 0, 100) == b"old"
    await ops.release(info.fh)


async def test_lazy_files_are_made_when_looked_at_and_retry_failures() -> None:
    import concurrent.futures

    attempts: list[int] = []

    def make() -> StaticContent:
        attempts.append(1)
        if len(attempts) == 1:
            raise TransientError("the first build fails")
        return StaticContent(b"synthesized")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        lazy = LazyFile("/lazy.rtdc", make=make, start=pool.submit)
        root = StaticDir("/", {"lazy.rtdc": lazy})
        ops = operations(root)
        ctx: Any = None
        assert attempts == [] and not lazy.settled  # made only once it is looked at
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await ops.lookup(pyfuse3.ROOT_INODE, b"lazy.rtdc", ctx)
        assert caught.value.errno == errno.EIO  # the failure is reported ...
        entry = await ops.lookup(pyfuse3.ROOT_INODE, b"lazy.rtdc", ctx)  # ... and tried again
        assert entry.st_size == len(b"synthesized") and len(attempts) == 2
        fh = await ops.opendir(pyfuse3.ROOT_INODE, ctx)
        assert ops._dirs[fh][0][1].settled
        info = await ops.open(entry.st_ino, os.O_RDONLY, ctx)
        assert await ops.read(info.fh, 0, 100) == b"synthesized"


def test_a_lazy_file_made_ahead_is_taken_over_waited_for_or_made_again() -> None:
    """`ahead` (a listed dataset's preparing) starts the making in a pool of its own: a
    reader settling while it still waits there takes it over in the readers' pool; one
    settling while it runs waits for it; when it failed, the next settle makes it again
    instead of meeting the old error."""
    attempts: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def make() -> StaticContent:
        name = threading.current_thread().name
        attempts.append(name)
        if name.startswith("ahead") and len(attempts) == 1:
            entered.set()
            release.wait(10)
            raise TransientError("the build ahead fails")
        return StaticContent(b"synthesized")

    def busy() -> None:
        release.wait(10)

    with (
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ahead") as ahead,
        concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="build") as build,
    ):
        # waiting in the pool ahead (its one thread busy): a reader takes it over
        blocked = ahead.submit(busy)
        queued = LazyFile("/queued.rtdc", make=make, start=build.submit)
        queued.ahead(ahead.submit)
        queued.settle()
        assert queued.settled and attempts == ["build_0"]
        release.set()
        blocked.result(10)
        attempts.clear()
        release.clear()
        # running ahead: a reader waits for it, and meets its failure; the next makes it again
        lazy = LazyFile("/lazy.rtdc", make=make, start=build.submit)
        lazy.ahead(ahead.submit)
        assert entered.wait(10)
        lazy.ahead(ahead.submit)  # being made: nothing more
        waiting = build.submit(lazy.settle)
        time.sleep(0.1)
        assert not waiting.done() and len(attempts) == 1
        release.set()
        with pytest.raises(TransientError):
            waiting.result(10)
        lazy.settle()
        assert lazy.settled and lazy.size == len(b"synthesized") and len(attempts) == 2
        lazy.ahead(ahead.submit)  # made: nothing more
        assert len(attempts) == 2


def test_metadata_ranges_on_open() -> None:
    from dcorfs.cache.prefetch import HEAD, TAIL, metadata_ranges

    assert metadata_ranges(1000, whole=1 << 20) == [(0, 1000)]
    size = 50 << 20
    assert metadata_ranges(size, whole=1 << 20) == [(0, HEAD), (size - TAIL, size)]
    assert metadata_ranges(HEAD + 10, whole=0) == [(0, HEAD), (HEAD, HEAD + 10)]


def test_a_condensed_file_up_to_its_limit_is_fetched_whole_before_hdf5_opens_it() -> None:
    from dcorfs.cache.prefetch import CONDENSED_WHOLE_ON_OPEN, HEAD, TAIL, structure_ranges

    size = 14 << 20  # 100,000 events' scalars
    assert structure_ranges("condensed", size) == [(0, size)]
    assert structure_ranges("resource", size) == [(0, HEAD), (size - TAIL, size)]
    larger = CONDENSED_WHOLE_ON_OPEN + 1
    assert structure_ranges("condensed", larger) == [(0, HEAD), (larger - TAIL, larger)]


class OpeningOnly(Resources):
    """`Resources` with real pools and no layers below (its tests replace what opens); with
    `derived`, a real warmer of its values."""

    def __init__(self, derived: DerivedCache | None = None, recheck: float = 300.0) -> None:
        none = cast(Any, None)
        self.pools = Pools()
        warmer = none
        if derived is not None:
            warmer = Warmer(cache=none, derived=derived, pool=self.pools.warm, timeout=9)
        super().__init__(
            objects=none,
            warmer=warmer,
            pools=self.pools,
            api=None,
            catalog=None,
            memo=none,
            cache=none,
            derived=derived or none,
            timeout=9,
            recheck=recheck,
        )


class HeldResources(OpeningOnly):
    """`Resources` whose opening of a resource waits for `release` and then fails; what the
    condensed file serves is published by the test (real `served_early` and publishing)."""

    def __init__(self, derived: DerivedCache) -> None:
        super().__init__(derived)
        self.release = threading.Event()
        self.attempts = 0

    def rtdc(self, dataset: Any, resource: Any) -> Any:
        self.attempts += 1
        assert self.release.wait(30)
        raise NotFound("the original file is gone")


def test_scalar_files_are_found_before_the_listing_is_made() -> None:
    """A resource directory finds the .npy file of a feature the condensed file serves as soon
    as that is described, while its listing (waiting for the original) is still being made;
    other names wait for the listing, and share its fate."""
    derived = DerivedCache(store=None)
    feature = Feature(name="deform", dtype=np.dtype("<f4"), shape=(3,), source="condensed")
    values = np.array([0.5, 1.5, 2.5], dtype="<f4")
    obj = ObjectId(key="k#rows/deform", etag="e", size=values.nbytes)
    made = threading.Event()

    def make(start: int, stop: int, deadline: float) -> bytes:
        made.set()
        return values.tobytes()[start:stop]

    derived.register(obj, make)
    resources = HeldResources(derived)
    none = cast(Any, None)
    ctx = Context(
        resources=resources, objects=none, pools=resources.pools, cache=derived, dir_cache_time=60
    )
    resource = Resource("r1", "M001.rtdc", "d1", "c1", None, None, 0.0, True, None)
    directory = ResourceDir("/by-id/r1", ctx, cast(Any, None), resource)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert directory.ready_child("deform.npy") is None  # no listing under way yet
            time.sleep(0.1)
            assert resources.attempts == 0  # nor started by it
            early = pool.submit(directory.lookup, "deform.npy")
            with pytest.raises(concurrent.futures.TimeoutError):  # nothing published yet
                early.result(timeout=0.2)
            until = time.monotonic() + 10
            while resources.attempts == 0 and time.monotonic() < until:
                time.sleep(0.01)
            assert resources.attempts == 1  # the lookup's listing, waiting for the original
            started = time.monotonic()
            assert directory.ready_child("deform.npy") is None  # and it does not wait for it
            assert time.monotonic() - started < 1.0
            resources._early_future("r1").set_result({"deform": (feature, obj)})
            node = early.result(timeout=30)
        assert isinstance(node, File) and node.path == "/by-id/r1/deform.npy"
        # now found without waiting (on the event loop), the same file; other names are not
        inline = directory.ready_child("deform.npy")
        assert isinstance(inline, File) and inline.path == node.path and inline.size == node.size
        assert directory.ready_child("image.npy") is None
        assert directory.ready_child("features.tsv") is None
        # a reader looked for one: the values of all of them are made in the background
        assert made.wait(30) and derived.peek(obj, 0, obj.size) == values.tobytes()
        buffer = io.BytesIO(node.content().read(0, node.size, deadline=time.monotonic() + 9))
        assert np.array_equal(np.load(buffer), values)
        assert directory.ready_children() is None  # the listing is still being made
        resources.release.set()
        for name in ("image.npy", "area_um.npy", "deform.npy~"):
            with pytest.raises(NotFound):
                directory.lookup(name)
    finally:
        resources.release.set()
        resources.pools.close()


def test_a_failed_listing_is_not_attempted_again_by_the_same_lookup() -> None:
    """A lookup whose background listing fails gets that error, without opening the
    resource a second time itself (a slow failure would otherwise take twice as long)."""
    resources = HeldResources(DerivedCache(store=None))
    resources.release.set()
    ctx = Context(
        resources=resources,
        objects=cast(Any, None),
        pools=resources.pools,
        cache=resources.derived,
        dir_cache_time=60,
    )
    resource = Resource("r1", "M001.rtdc", "d1", "c1", None, None, 0.0, True, None)
    directory = ResourceDir("/by-id/r1", ctx, cast(Any, None), resource)
    try:
        with pytest.raises(NotFound, match="gone"):
            directory.lookup("area_um.npy")
        assert resources.attempts == 1
        assert directory.ready_child("area_um.npy") is None  # the error is left to lookup
    finally:
        resources.pools.close()


class Opened:
    """An opened resource with its condensed file: three events of two scalar features and a
    trace, no images, no contour (enough for `ResourceDir`'s listing)."""

    events = 3

    def __init__(self, derived: DerivedCache) -> None:
        self.derived = derived
        self.features = {
            name: Feature(name=name, dtype=np.dtype("<f4"), shape=(3,), source="condensed")
            for name in ("deform", "area_um", "trace/fl1_raw")
        }
        self.values = {name: np.arange(3, dtype="<f4") + i for i, name in enumerate(self.features)}
        for name, values in self.values.items():
            data = values.tobytes()
            derived.register(
                self.rows_object(name), lambda start, stop, deadline, d=data: d[start:stop]
            )

    def rows_object(self, name: str) -> ObjectId:
        return ObjectId(key=f"k#rows/{name}", etag="e", size=12)

    def scalar_features(self) -> list[Feature]:
        return [f for f in self.features.values() if f.scalar]

    def event_table(self) -> list[Feature]:
        return [f for f in self.scalar_features() if not f.name.startswith("trace/")]

    def source(self, kind: str) -> None:
        return None  # no contour (and without DCOR's API nothing is joined)

    def complete(self) -> bool:
        return True  # both files: nothing is to come


class Listed(ResourceDir):
    """A resource directory whose listings are counted."""

    loads = 0

    def _load(self) -> dict[str, Node]:
        self.loads += 1
        return super()._load()


class SettledResources(OpeningOnly):
    """`Resources` whose opening of "r1" gives `opened`, counted; with `hold`, it waits for
    `release`, having published `deform` as served early by the condensed file."""

    def __init__(self, derived: DerivedCache, *, hold: bool = False) -> None:
        super().__init__(derived)
        self.opened = Opened(derived)
        self.attempts = 0
        self.hold = hold
        self.release = threading.Event()

    def _open_rtdc(self, dataset: Any, resource: Any, early: Any) -> Any:
        self.attempts += 1
        if self.hold:
            features = self.opened.features
            early.set_result({"deform": (features["deform"], self.opened.rows_object("deform"))})
            assert self.release.wait(30)
        return self.opened

    def texts(self, dataset: Any, resource: Any) -> Texts:
        return Texts(metadata={}, logs={}, tables={})


def _settled_dir(hold: bool = False) -> tuple[SettledResources, Listed]:
    derived = DerivedCache(store=None)
    resources = SettledResources(derived, hold=hold)
    none = cast(Any, None)
    ctx = Context(
        resources=resources, objects=none, pools=resources.pools, cache=derived, dir_cache_time=60
    )
    resource = Resource("r1", "M001.rtdc", "d1", "c1", None, None, 0.0, True, None)
    return resources, Listed("/by-id/r1", ctx, none, resource)


def test_a_settled_resources_feature_files_are_found_without_its_listing() -> None:
    """A feature's .npy file of a settled resource is found from the opened resource: no
    listing is made (its TIFF preludes, FCS text and tables wait until one is asked for),
    found again on the event loop without waiting; the listing made later has the same files.
    Other names, and names no feature has, are the listing's to say."""
    resources, directory = _settled_dir()
    try:
        assert resources.settled_rtdc("r1") is None  # not opened yet
        assert directory.ready_child("deform.npy") is None  # and not opened by this
        node = directory.lookup("deform.npy")
        assert resources.attempts == 1 and directory.loads == 0
        assert directory.ready_children() is None  # no listing
        assert resources.settled_rtdc("r1") is resources.opened
        assert isinstance(node, File) and node.path == "/by-id/r1/deform.npy"
        data = node.content().read(0, node.size, deadline=time.monotonic() + 9)
        assert np.array_equal(np.load(io.BytesIO(data)), resources.opened.values["deform"])
        # found on the event loop now, the same file; so are the others
        assert directory.ready_child("deform.npy") is node
        area = directory.ready_child("area_um.npy")
        assert isinstance(area, File) and area.path == "/by-id/r1/area_um.npy"
        assert directory.lookup("area_um.npy") is area
        assert directory.ready_child("fl1_raw.npy") is None  # a trace's is in trace/
        assert directory.ready_child("image.npy") is None  # no such feature: the listing says
        assert directory.ready_child("features.tsv") is None
        assert directory.loads == 0 and resources.attempts == 1
        with pytest.raises(NotFound):
            directory.lookup("image.npy")
        assert directory.loads == 1
        listing = cast(dict[str, Node], directory.ready_children())
        assert {"features.tsv", "features.fcs", "trace", "M001.rtdc"} <= set(listing)
        assert listing["deform.npy"] is node and listing["area_um.npy"] is area
        assert resources.attempts == 1
    finally:
        resources.pools.close()


def test_a_feature_file_the_condensed_file_does_not_serve_waits_for_the_opening() -> None:
    """While the resource is opened, a feature's file the condensed file does not serve (or
    serves but is not described yet) is found once the opening ends, from it: no listing."""
    resources, directory = _settled_dir(hold=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            served = directory.lookup("deform.npy")  # published before the opening ends
            assert isinstance(served, File) and resources.attempts == 1
            waiting = pool.submit(directory.lookup, "area_um.npy")
            with pytest.raises(concurrent.futures.TimeoutError):
                waiting.result(timeout=0.2)
            resources.release.set()
            node = waiting.result(timeout=30)
        assert isinstance(node, File) and node.path == "/by-id/r1/area_um.npy"
        assert directory.ready_child("area_um.npy") is node
        assert directory.loads == 0 and resources.attempts == 1
    finally:
        resources.release.set()
        resources.pools.close()


def test_a_bucket_object_that_is_not_hdf5_is_not_opened_for_a_feature_file() -> None:
    """In a bucket, a resource whose object is not HDF5 is a directory holding it: a lookup
    of a feature's file there is not found, without opening the object as RT-DC."""
    resources, _ = _settled_dir()

    class NotHdf5:
        def is_hdf5(self, dataset: Any, resource: Any) -> bool:
            return False

    ctx = Context(
        resources=resources,
        objects=cast(Any, NotHdf5()),
        pools=resources.pools,
        cache=resources.derived,
        dir_cache_time=60,
    )
    resource = Resource("r1", "r1", "d1", "c1", 5, "e", 0.0, True, None)
    directory = BucketResourceDir("/circles/c/r1", ctx, cast(Any, None), resource)
    try:
        with pytest.raises(NotFound):
            directory.lookup("deform.npy")
        assert resources.attempts == 0
        assert set(cast(dict[str, Node], directory.ready_children())) == {PLAIN_NAME}
    finally:
        resources.pools.close()


def test_only_a_settled_resource_is_answered_without_opening_it() -> None:
    """`settled_rtdc` never opens: the opened resource once nothing more is to come (its own
    files, and its upstreams joined for good), else None."""

    class WithCondensed(Opened):
        def source(self, kind: str) -> Any:
            return object()

    resources = OpeningOnly()
    opened = WithCondensed(DerivedCache(store=None))
    try:
        resources._opened["r1"] = cast(Any, opened)
        assert resources.settled_rtdc("r1") is opened  # no DCOR API: nothing is joined
        resources._unsettled["r1"] = time.monotonic()  # opened without its condensed file
        assert resources.settled_rtdc("r1") is None
        del resources._unsettled["r1"]
        resources._partial.add("r1")  # joined without all its upstreams
        assert resources.settled_rtdc("r1") is None
        resources._partial.discard("r1")
        resources._api = resources._catalog = cast(Any, object())  # upstreams are joined
        assert resources.settled_rtdc("r1") is None  # not joined yet
        joined = object()
        resources._joined["r1"] = (cast(Any, opened), (), cast(Any, joined))
        assert resources.settled_rtdc("r1") is None  # joined until an upstream changes
        resources._joined["r1"] = (cast(Any, opened), None, cast(Any, joined))
        assert resources.settled_rtdc("r1") is joined  # kept for good
        resources._joined["r1"] = (cast(Any, WithCondensed(DerivedCache(store=None))), None, joined)
        assert resources.settled_rtdc("r1") is None  # joined from an earlier opening
    finally:
        resources.pools.close()


def test_logs_are_final_only_with_the_condensing_logs(tmp_path: Path) -> None:
    """dc_serve answers the logs without the condensed file's when it cannot add them
    (doc/DCOR.md §7): such an answer is asked again after `dir_cache_time`."""
    answers = iter([{"original": ["a"]}, {"original": ["a"], "dclab-condense": ["b"]}, {}])

    class Api:  # the transport boundary: dcserv's answers in turn
        def dcserv(self, resource_id: str, query: str, *, deadline: float) -> Any:
            return next(answers)

    memo = Memo(MetaStore(tmp_path / "meta.sqlite3", scope="h|public"))
    catalog = Catalog(api=cast(DcorApi, Api()), memo=memo, dir_cache_time=0.0)
    assert "dclab-condense" not in catalog.dcserv("r", "logs")
    assert "dclab-condense" in catalog.dcserv("r", "logs")
    assert "dclab-condense" in catalog.dcserv("r", "logs")  # final: not asked again


class Reopened:
    """An opened resource without its condensed file (what `_own_rtdc` keeps)."""

    closed = False

    def source(self, kind: str) -> None:
        return None

    def complete(self) -> bool:
        return False  # no condensed file

    def close(self) -> None:
        self.closed = True


class FailingReopen(OpeningOnly):
    """`Resources` whose first opening of a resource succeeds (without the condensed file)
    and whose later ones fail with an error that is not dcorfs' own (h5py's OSError)."""

    def __init__(self) -> None:
        super().__init__(recheck=3600)
        self.attempts = 0
        self.first = Reopened()

    def _open_rtdc(self, dataset: Any, resource: Any, early: Any) -> Any:
        self.attempts += 1
        if self.attempts == 1:
            return self.first
        raise OSError("Unable to synchronously open file (truncated file)")


def test_a_failed_reopening_serves_the_earlier_one_and_waits_for_the_next_recheck() -> None:
    resources = FailingReopen()
    resource = Resource("r1", "M001.rtdc", "d1", "c1", None, None, 0.0, True, None)
    try:
        assert resources._own_rtdc(cast(Any, None), resource) is resources.first
        resources._unsettled["r1"] -= 3600  # `recheck` has passed
        assert resources._own_rtdc(cast(Any, None), resource) is resources.first
        assert resources._own_rtdc(cast(Any, None), resource) is resources.first
        assert resources.attempts == 2  # not again until `recheck` has passed once more
    finally:
        resources.pools.close()
        resources.close()


class Relisted(Dir):
    """A directory refreshed in the background whose second listing waits for `release`."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        super().__init__("/d", max_age=3600)
        self._background = pool.submit
        self.release = threading.Event()
        self.loads = 0

    def _load(self) -> dict[str, Node]:
        self.loads += 1
        if self.loads > 1:
            assert self.release.wait(30)
        return {f"v{self.loads}": static_file(f"/d/v{self.loads}", b"")}


def test_a_stale_listing_is_served_while_it_is_made_again() -> None:
    """A resource directory's readers are not kept waiting while the resource is opened
    again (doc/DCOR.md §1): the loaded listing is served meanwhile."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    directory = Relisted(pool)
    try:
        assert set(directory.children()) == {"v1"}
        directory._loaded -= 3600  # `max_age` has passed
        assert set(cast(dict[str, Node], directory.ready_children())) == {"v1"}
        assert directory.lookup("v1").path == "/d/v1"  # not waiting for the new listing
        directory.release.set()
    finally:
        directory.release.set()
        pool.shutdown(wait=True)
    assert set(cast(dict[str, Node], directory.ready_children())) == {"v2"}
    assert directory.loads == 2


class ClosedMeanwhile(FailingReopen):
    """`Resources` closed (the mount ends) while a resource is being opened."""

    def _open_rtdc(self, dataset: Any, resource: Any, early: Any) -> Any:
        self.close()
        return self.first


def test_a_resource_opened_while_the_mount_closes_is_closed_too() -> None:
    resources = ClosedMeanwhile()
    resource = Resource("r1", "M001.rtdc", "d1", "c1", None, None, 0.0, True, None)
    with pytest.raises(TransientError, match="closing"):
        resources._own_rtdc(cast(Any, None), resource)
    assert resources.first.closed  # not left open in `_opened`
    assert not resources._opened


def test_a_skeleton_is_remembered_per_own_files_it_is_outlined_from() -> None:
    """doc/DCOR.md §2: a resource opened from its condensed file alone (its original refused
    for now) outlines its synthesized .rtdc from that file; once the original is read the
    skeleton is made again (another key), not the condensed file's kept for good."""
    from dcorfs.fs.producers.rtdc_file import _skeleton_key

    class Opened:
        features: dict[str, Any] = {}

        def __init__(self, *kinds: str) -> None:
            self.kinds = kinds

        def source(self, kind: str) -> object | None:
            return object() if kind in self.kinds else None

    both = _skeleton_key("r1", cast(Any, Opened("resource", "condensed")))
    assert _skeleton_key("r1", cast(Any, Opened("condensed"))) != both
    assert _skeleton_key("r1", cast(Any, Opened("resource"))) != both
    assert _skeleton_key("r1", cast(Any, Opened("condensed", "resource"))) == both
