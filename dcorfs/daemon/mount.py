"""The composition root: checks, the daemon, and the wiring http → dcserv → cache → tree → FUSE.

`mount()` checks what can be checked before mounting (mount point, /dev/fuse, cache dir, the
host or, with `--s3-only`, the S3 endpoint), then forks the daemon and waits on a pipe until
the mount is up (exit 0) or failed (one-line reason, exit 1). The daemon mounts, answers FUSE
requests on one trio thread, and unmounts on SIGTERM/SIGINT (`pyfuse3.close(unmount=True)` in
any case).
"""

from __future__ import annotations

import dataclasses
import errno
import faulthandler
import functools
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from .. import __version__
from ..cache import cachedir
from ..cache.blockcache import BlockCache
from ..cache.derived import DerivedCache
from ..cache.diskstore import DiskStore
from ..cache.metastore import Memo, MetaStore
from ..cache.prefetch import DECODED_BLOCK
from ..errors import (
    AccessDenied,
    ConfigError,
    DcorfsError,
    DeadlineExceeded,
    NotFound,
    StaleMount,
)
from ..fs.fuse_ops import Activity, Operations
from ..fs.readahead import Prefetcher
from ..fs.s3tree import build_s3_root
from ..fs.tree import Context, Dir, build_root
from ..hdf5.rtdc import CycleCollector
from ..opening.resources import Resources
from ..remote.buckets import BucketCatalog
from ..remote.catalog import Catalog
from ..remote.dcserv import DcorApi, Locator, bucket_name, make_fetch
from ..remote.http import Http, RetryPolicy
from ..remote.s3 import ObjectStore, sigv4_presigner
from ..settings import MountSettings
from .logs import configure
from .notify import Notifier, watchdog_interval
from .report import one_line
from .tuning import tune

log = logging.getLogger(__name__)
PREFLIGHT_SECONDS = 15.0
STATUS_PERIOD = 10.0  # seconds between STATUS= lines to systemd
REJECTED_CREDENTIALS = ("SignatureDoesNotMatch", "InvalidAccessKeyId")


def _scope(settings: MountSettings) -> str:
    """Whose answers the metadata store holds: answers given for a token (or S3 credentials)
    are only served to a mount with the same token (credentials), named by a fingerprint
    (the secrets themselves stay out of the cache)."""
    if settings.s3_only:
        credentials = settings.s3_credentials
        who = f"key-{credentials.fingerprint}" if credentials else "anonymous"
        return f"s3:{settings.s3_endpoint}|{who}"
    who = f"token-{settings.token.fingerprint}" if settings.token else "public"
    return f"{settings.host}|{who}"


def object_store(settings: MountSettings, http: Http) -> ObjectStore | None:
    """The object store of `--s3-endpoint`, signing with the S3 credentials if there are."""
    if settings.s3_endpoint is None:
        return None
    credentials = settings.s3_credentials
    sign = sigv4_presigner(credentials) if credentials is not None else None
    return ObjectStore(http=http, endpoint=settings.s3_endpoint, sign=sign)


def check_mountpoint(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"mount point {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise StaleMount(path) from None
        raise ConfigError(f"mount point {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"mount point {path} is not a directory")
    if path.is_mount():
        raise ConfigError(f"{path} is already a mount point (busy)")
    try:
        occupied = any(path.iterdir())
    except OSError as exc:
        raise ConfigError(f"mount point {path}: {exc.strerror}") from None
    if occupied:
        raise ConfigError(f"mount point {path} is not empty (the mount would hide its files)")
    if not Path("/dev/fuse").exists():
        raise ConfigError("/dev/fuse is missing: install fuse3 and load the fuse module")


def check_cache_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create cache dir {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"cache dir {path} is not writable")


def _preflight(
    origin: str,
    like: str,
    marker: str,
    store: MetaStore,
    ask: Callable[[Http], None],
    *,
    unchecked: str = "",
) -> None:
    """`ask` the origin what only a working `like` server answers (a ConfigError from it goes
    out as it is); unreachable is fine only when answers are stored: `marker`, kept in the
    store after a success (then the warning says what was left `unchecked`)."""
    http = Http(policy=RetryPolicy(attempts=3, connect_timeout=5.0, read_timeout=10.0))
    try:
        ask(http)
    except ConfigError:
        raise
    except DcorfsError as exc:
        if not (exc.transient or isinstance(exc, DeadlineExceeded)):
            raise ConfigError(f"{origin} does not answer like {like}: {exc}") from None
        if store.get(marker) is None:
            raise ConfigError(f"cannot reach {origin}: {exc}") from None
        print(f"dcorfs: {origin} unreachable; serving what is cached{unchecked}", file=sys.stderr)
    else:
        store.put(marker, {"checked": time.time()})
    finally:
        http.close()


def check_host(settings: MountSettings, store: MetaStore) -> None:
    """The host must answer like CKAN, and take a token for a user (it would silently treat
    a wrong or expired one as anonymous: doc/DCOR.md §9); unreachable is fine only when
    answers are stored."""

    def ask(http: Http) -> None:
        api = DcorApi(http=http, base_url=settings.host, token=settings.token)
        api.action("status_show", {}, deadline=time.monotonic() + PREFLIGHT_SECONDS)
        if (
            api.authenticated
            and api.token_user(deadline=time.monotonic() + PREFLIGHT_SECONDS) is None
        ):
            raise ConfigError(
                f"{settings.host} rejects the API token (wrong or expired; it would read "
                "as anonymous): check --api-key-file or DCOR_API_KEY"
            )

    unchecked = " (the API token was not checked)" if settings.token else ""
    _preflight(settings.host, "DCOR", "status_show", store, ask, unchecked=unchecked)


def check_endpoint(settings: MountSettings, store: MetaStore) -> None:
    """The S3 endpoint must answer (a refusal to list is an answer) unless answers are stored,
    each circle must have a bucket there, and signing must be possible (botocore installed)
    when there are credentials."""

    def ask(http: Http) -> None:
        objects = object_store(settings, http)
        assert objects is not None
        for circle_id in settings.circles:
            bucket = bucket_name(circle_id, settings.s3_bucket_template)
            deadline = time.monotonic() + PREFLIGHT_SECONDS
            try:
                objects.list(bucket, "resource/", max_keys=1, pages=1, deadline=deadline)
            except AccessDenied as exc:  # there, but not listable with these credentials
                if exc.code in REJECTED_CREDENTIALS:
                    print(
                        f"dcorfs: warning: {settings.s3_endpoint} rejects these S3 credentials "
                        f"({exc.code}): their reads will fail with EACCES",
                        file=sys.stderr,
                    )
            except NotFound:
                raise ConfigError(f"{settings.s3_endpoint} has no bucket {bucket}") from None

    assert settings.s3_endpoint is not None
    _preflight(settings.s3_endpoint, "S3", "s3_checked", store, ask)


def mount(settings: MountSettings, *, on_ready: Callable[[], None] | None = None) -> int:
    """Mount; returns the exit code. In the background unless `settings.foreground`, where
    `on_ready` runs once the mount is up (the demo prints what to try)."""
    check_mountpoint(settings.mountpoint)
    check_cache_dir(settings.cache_dir)
    store = MetaStore(settings.cache_dir / cachedir.META, scope=_scope(settings))
    try:
        if settings.s3_only:
            check_endpoint(settings, store)
        else:
            check_host(settings, store)
            if settings.s3_credentials is not None:
                sigv4_presigner(settings.s3_credentials)  # botocore is there
    finally:
        store.close()
    if settings.foreground:

        def ready(message: str) -> None:
            if message == "ok" and on_ready is not None:
                on_ready()
            elif message != "ok":
                print(f"dcorfs: {message}", file=sys.stderr)

        return run(settings, ready=ready)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        code = 1
        try:
            code = run(settings, ready=lambda message: _tell(write_end, message))
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    if message == "ok":
        return 0
    os.waitpid(pid, 0)
    print(f"dcorfs: {message or 'the daemon died while mounting (see the log)'}", file=sys.stderr)
    return 1


def _tell(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode())
    finally:
        os.close(fd)


def run(settings: MountSettings, *, ready: Callable[[str], None]) -> int:
    """The daemon: build everything, mount, serve until unmounted or signalled."""
    log_file = settings.log_file or settings.cache_dir / cachedir.LOG
    configure(
        level=settings.log_level,
        log_file=log_file,
        stderr=settings.foreground,
        secrets=settings.secrets(),
    )
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    notifier = Notifier.from_environment()
    try:
        ops, report, close = _build(settings)
    except DcorfsError as exc:
        log.error("cannot start: %s", exc)
        ready(str(exc))
        return 1
    except Exception as exc:
        log.exception("cannot start")
        ready(f"cannot start: {exc}")
        return 1
    options = set(pyfuse3.default_options) | {
        f"fsname=dcorfs:{settings.source.split('://', 1)[1]}",
        "subtype=dcorfs",
        "ro",
    }
    if settings.allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, str(settings.mountpoint), options)
    except RuntimeError as exc:
        ready(f"cannot mount {settings.mountpoint}: {exc}")
        close()
        return 1
    log.info("dcorfs %s: %s mounted at %s", __version__, settings.source, settings.mountpoint)
    ready("ok")
    collector = CycleCollector()  # h5py in many threads: see its design note
    collector.start()
    notifier.send("READY=1", f"STATUS=mounted {settings.source} at {settings.mountpoint}")
    try:
        trio.run(_serve, ops, notifier, report, functools.partial(_tune, settings))
    finally:
        notifier.send("STOPPING=1", "STATUS=unmounting")
        collector.stop()
        pyfuse3.close(unmount=True)
        close()
        log.info("unmounted %s", settings.mountpoint)
    return 0


async def _serve(
    ops: Operations,
    notifier: Notifier,
    report: Callable[[], dict[str, Any]],
    after_init: Callable[[], None],
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals)
        nursery.start_soon(_after_init, ops, after_init)
        if notifier.active:
            nursery.start_soon(_keep_systemd_informed, notifier, report, watchdog_interval())
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _after_init(ops: Operations, action: Callable[[], None]) -> None:
    await ops.initialized.wait()
    action()


def _tune(settings: MountSettings) -> None:
    """After INIT: the kernel sets the read-ahead from INIT's answer, so tuning comes later."""
    if settings.kernel_tuning and os.geteuid() == 0:
        tune(
            settings.mountpoint,
            read_ahead_kb=settings.read_ahead_kb,
            max_background=settings.max_background,
        )


async def _signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
        async for number in received:
            log.info("received %s: unmounting", signal.Signals(number).name)
            pyfuse3.terminate()
            return


async def _keep_systemd_informed(
    notifier: Notifier, report: Callable[[], dict[str, Any]], watchdog: float | None
) -> None:
    """STATUS= every few seconds; WATCHDOG=1 from the event loop itself, so that a blocked
    loop (the mount answering nothing) lets systemd's WatchdogSec= restart the service."""
    period = min(STATUS_PERIOD, watchdog) if watchdog else STATUS_PERIOD
    last_status = 0.0
    while True:
        fields = ["WATCHDOG=1"] if watchdog else []
        if trio.current_time() - last_status >= STATUS_PERIOD:
            last_status = trio.current_time()
            fields.append(f"STATUS={one_line(await trio.to_thread.run_sync(report))}")
        notifier.send(*fields)
        await trio.sleep(period)


@dataclass
class Layers:
    """The layers below the tree, wired (see `build_layers`)."""

    http: Http
    disk: DiskStore
    store: MetaStore
    buckets: BucketCatalog | None  # --s3-only
    catalog: Catalog | None  # with DCOR's API
    cache: BlockCache
    derived: DerivedCache
    resources: Resources

    def close(self) -> None:
        for part in (self.resources, self.derived, self.cache, self.http, self.store, self.disk):
            part.close()


def build_layers(settings: MountSettings, http: Http | None = None) -> Layers:
    """Wire the layers from HTTP up to `Resources` (imports and data flow one way)."""
    http = http or Http(pool_size=settings.network_threads)
    disk = DiskStore(  # first: it takes the cache dir's lock and renews damaged databases
        settings.cache_dir, limit_bytes=settings.cache_size, block_size=settings.block_size
    )
    objects = object_store(settings, http)
    store = MetaStore(settings.cache_dir / cachedir.META, scope=_scope(settings))
    memo = Memo(store, timeout=settings.timeout)
    api = catalog = buckets = None
    if settings.s3_only:
        assert objects is not None
        buckets = BucketCatalog(
            store=objects,
            memo=memo,
            circles=settings.circles,
            dir_cache_time=settings.dir_cache_time,
            bucket_template=settings.s3_bucket_template,
        )
    else:
        api = DcorApi(http=http, base_url=settings.host, token=settings.token)
        catalog = Catalog(api=api, memo=memo, dir_cache_time=settings.dir_cache_time)
    locator = Locator()
    decoded_memory = settings.memory_cache // 8  # of the memory cache: decoded values
    cache = BlockCache(
        fetch=make_fetch(http, locator),
        store=disk,
        block_size=settings.block_size,
        memory_bytes=settings.memory_cache - decoded_memory,
    )
    derived = DerivedCache(  # decoded feature values, in the same store and size bound
        store=disk,
        block_size=DECODED_BLOCK,
        memory_bytes=decoded_memory,
        max_fetch_bytes=4 * DECODED_BLOCK,  # decoded at once: bounds the buffers in flight
        parallel=4,
    )
    resources = Resources(
        api=api,
        catalog=catalog,
        memo=memo,
        http=http,
        locator=locator,
        cache=cache,
        derived=derived,
        timeout=settings.timeout,
        store=objects,
        listed=buckets.listed if buckets is not None else None,
        recheck=settings.dir_cache_time,
        bucket_template=settings.s3_bucket_template,
    )
    return Layers(http, disk, store, buckets, catalog, cache, derived, resources)


def _build(
    settings: MountSettings,
) -> tuple[Operations, Callable[[], dict[str, Any]], Callable[[], None]]:
    """Wire the layers (imports and data flow one way: http → … → fuse_ops)."""
    layers = build_layers(settings)
    http, cache, derived, resources = layers.http, layers.cache, layers.derived, layers.resources
    buckets, catalog = layers.buckets, layers.catalog
    ctx = Context(resources=resources, cache=cache, dir_cache_time=settings.dir_cache_time)
    started = time.time()
    activity = Activity()
    prefetcher = Prefetcher(
        budget_bytes=settings.prefetch_memory,
        workers=settings.prefetch_threads,
        timeout=settings.timeout,
    )

    def report() -> dict[str, Any]:
        return {
            "version": __version__,
            "host": settings.source,
            "s3_endpoint": settings.s3_endpoint,
            "mountpoint": str(settings.mountpoint),
            "cache_dir": str(settings.cache_dir),
            "pid": os.getpid(),
            "started": started,
            "cache": dataclasses.asdict(cache.stats()),
            "decoded": dataclasses.asdict(derived.stats()),
            "requests": http.request_counts(),
            "fuse": dict(activity.counters),
            "prefetch": {
                **prefetcher.counters,
                "memory_bytes": prefetcher.budget.used,
                "memory_peak": prefetcher.budget.peak,
                "memory_limit": prefetcher.budget.limit,
            },
            "recent_errors": list(activity.recent_errors),
        }

    def status() -> bytes:
        return (json.dumps(report(), indent=2, sort_keys=True) + "\n").encode()

    root: Dir
    if buckets is not None:
        root = build_s3_root(ctx, buckets, status, mtime=started)
    else:
        assert catalog is not None
        root = build_root(ctx, catalog, status, mtime=started)
    ops = Operations(
        root=root,
        timeout=settings.timeout,
        attr_time=settings.attr_time,
        listing_time=settings.dir_cache_time,
        negative_time=settings.negative_time,
        limiter=trio.CapacityLimiter(settings.network_threads),
        activity=activity,
        prefetcher=prefetcher,
    )

    def close() -> None:
        prefetcher.close()
        layers.close()

    return ops, report, close
