"""The wiring of a mount: every layer built from `MountSettings`, bottom up, imports and data
one way (http → DCOR client and S3 → caches → opening → tree → FUSE operations). The pools
and threads made here and below are listed in doc/ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import pyfuse3
import trio

from .. import __version__
from ..cache import cachedir
from ..cache.blockcache import PARALLEL, BlockCache
from ..cache.budget import InFlight, MemoryPlan
from ..cache.derived import DerivedCache
from ..cache.diskstore import DiskStore
from ..cache.metastore import Memo, MetaStore
from ..cache.prefetch import DECODED_BLOCK
from ..cache.writebehind import WriteBehind
from ..fs.activity import Activity
from ..fs.fuse_ops import Operations
from ..fs.pagepush import PagePusher, Store
from ..fs.readahead import Prefetcher
from ..fs.s3tree import build_s3_root
from ..fs.tree import Context, Dir, build_root
from ..hdf5.workers import HDF5Workers
from ..opening.objects import Objects
from ..opening.pools import Pools
from ..opening.resources import Resources
from ..opening.warm import Warmer
from ..remote.buckets import BucketCatalog
from ..remote.catalog import Catalog
from ..remote.dcserv import DcorApi, Locator, make_fetch
from ..remote.http import Http
from ..remote.s3 import ObjectStore, sigv4_presigner
from ..remote.shared import SharedTier
from ..settings import MountSettings

WORKERS_READY = 10.0  # seconds the start waits at most for the HDF5 workers' server


def scope(settings: MountSettings) -> str:
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


def memory_plan(settings: MountSettings) -> MemoryPlan:
    """`--memory-limit` shared out (with room for uploads when there is a shared tier)."""
    return MemoryPlan.of(settings.memory_limit, shared=settings.shared_cache is not None)


def shared_tier(settings: MountSettings, http: Http) -> SharedTier | None:
    """The shared cache tier of `--shared-cache`, signing with its credentials if there are."""
    if settings.shared_cache is None:
        return None
    room = InFlight(memory_plan(settings).uploading)
    return SharedTier(http=http, config=settings.shared_cache, room=room)


@dataclass
class Layers:
    """The layers below the tree, wired (see `build_layers`)."""

    http: Http
    disk: DiskStore
    writer: WriteBehind  # the disk store's writes, behind the readers
    store: MetaStore
    buckets: BucketCatalog | None  # --s3-only
    catalog: Catalog | None  # with DCOR's API
    cache: BlockCache
    derived: DerivedCache
    pools: Pools
    workers: HDF5Workers  # HDF5 work on bytes in memory, in processes of their own
    objects: Objects
    resources: Resources
    shared: SharedTier | None  # --shared-cache

    def close(self) -> None:
        parts = (self.pools, self.workers, self.resources, self.derived, self.cache)
        shared = (self.shared,) if self.shared is not None else ()  # its uploads use http
        # each closed even when one before it fails (the writer's queue must reach the disk)
        with contextlib.ExitStack() as closing:
            for part in reversed((*parts, self.writer, *shared, self.http, self.store, self.disk)):
                closing.callback(part.close)


def build_layers(settings: MountSettings, http: Http | None = None) -> Layers:
    """Wire the layers from HTTP up to `Resources` (imports and data flow one way)."""
    # connections kept per host: one for each thread that may send at once (FUSE handlers'
    # threads, the block cache's fetches, the read-ahead's makes)
    http = http or Http(pool_size=settings.network_threads + PARALLEL + settings.prefetch_threads)
    disk = DiskStore(  # first: it takes the cache dir's lock and renews damaged databases
        settings.cache_dir, limit_bytes=settings.cache_size, block_size=settings.block_size
    )
    s3 = object_store(settings, http)
    store = MetaStore(settings.cache_dir / cachedir.META, scope=scope(settings))
    memo = Memo(store, timeout=settings.timeout)
    api = catalog = buckets = None
    if settings.s3_only:
        assert s3 is not None
        buckets = BucketCatalog(
            store=s3,
            memo=memo,
            circles=settings.circles,
            dir_cache_time=settings.dir_cache_time,
            bucket_template=settings.s3_bucket_template,
        )
    else:
        api = DcorApi(http=http, base_url=settings.host, token=settings.token)
        catalog = Catalog(api=api, memo=memo, dir_cache_time=settings.dir_cache_time)
    locator = Locator()
    plan = memory_plan(settings)
    shared = shared_tier(settings, http)
    if shared is not None:
        shared.announce()
    fetch = make_fetch(http, locator)
    writer = WriteBehind(disk, limit=plan.writing)
    cache = BlockCache(
        fetch=shared.wrap(fetch) if shared is not None else fetch,
        store=writer,
        block_size=settings.block_size,
        memory_bytes=plan.blocks,
        in_flight=InFlight(plan.fetching),
    )
    derived = DerivedCache(  # decoded feature values, in the same store and size bound
        store=writer,
        block_size=DECODED_BLOCK,
        memory_bytes=plan.decoded,
        max_fetch_bytes=4 * DECODED_BLOCK,  # decoded at once: bounds the buffers in flight
        parallel=4,
        # its own bound: a decode holding room waits for fetches of compressed bytes, which
        # must never wait for room that decodes hold
        in_flight=InFlight(plan.decoding),
    )
    pools = Pools(
        warm=settings.warm_threads,
        ask=settings.ask_threads,
        prepare=settings.prepare_threads,
        build=settings.build_threads,
        ahead=settings.build_threads,
        listing=settings.listing_threads,
    )
    # (what the workers run, imported once by the server they are forked from: small files'
    # structure, skeletons); the server started now, beside the rest of the start
    # (`build_front` waits for it)
    workers = HDF5Workers(settings.hdf5_workers, preload=["dcorfs.fs.producers.rtdc_file"])
    workers.serve()
    objects = Objects(
        api=api,
        memo=memo,
        http=http,
        locator=locator,
        cache=cache,
        timeout=settings.timeout,
        store=s3,
        listed=buckets.listed if buckets is not None else None,
        recheck=settings.dir_cache_time,
        bucket_template=settings.s3_bucket_template,
        shared=shared,
    )
    warmer = Warmer(cache=cache, derived=derived, pool=pools.warm, timeout=settings.timeout)
    resources = Resources(
        objects=objects,
        warmer=warmer,
        pools=pools,
        api=api,
        catalog=catalog,
        memo=memo,
        cache=cache,
        derived=derived,
        timeout=settings.timeout,
        recheck=settings.dir_cache_time,
        workers=workers,
    )
    return Layers(
        http,
        disk,
        writer,
        store,
        buckets,
        catalog,
        cache,
        derived,
        pools,
        workers,
        objects,
        resources,
        shared,
    )


@dataclass
class Front:
    """What a front end (FUSE or WebDAV) serves: the tree over the layers, the read-ahead
    shared by its open files, its activity, status.json's report, and how to close it all."""

    root: Dir
    prefetcher: Prefetcher
    activity: Activity
    report: Callable[[], dict[str, Any]]
    close: Callable[[], None]


def build_front(settings: MountSettings, *, where: str) -> Front:
    """Wire the layers and the tree on them (`where`: what serves it, for the report)."""
    layers = build_layers(settings)
    http, cache, derived, resources = layers.http, layers.cache, layers.derived, layers.resources
    shared = layers.shared
    buckets, catalog = layers.buckets, layers.catalog
    ctx = Context(
        resources=resources,
        objects=layers.objects,
        pools=layers.pools,
        cache=cache,
        dir_cache_time=settings.dir_cache_time,
    )
    started = time.time()
    activity = Activity()
    prefetcher = Prefetcher(
        budget_bytes=memory_plan(settings).prefetch,
        workers=settings.prefetch_threads,
        timeout=settings.timeout,
    )

    def report() -> dict[str, Any]:
        return {
            "version": __version__,
            "host": settings.source,
            "s3_endpoint": settings.s3_endpoint,
            "mountpoint": where,
            "cache_dir": str(settings.cache_dir),
            "pid": os.getpid(),
            "started": started,
            "cache": dataclasses.asdict(cache.stats()),
            "decoded": dataclasses.asdict(derived.stats()),
            "requests": http.request_counts(),
            "fuse": dict(activity.counters),
            "read_latency": activity.histogram(),
            "prefetch": {
                **prefetcher.counters,
                "memory_bytes": prefetcher.budget.used,
                "memory_peak": prefetcher.budget.peak,
                "memory_limit": prefetcher.budget.limit,
            },
            "memory": {
                "limit": settings.memory_limit,
                "fetching": cache.held(),
                "decoding": derived.held(),
                "writing": layers.writer.stats(),  # blocks queued for the disk cache
                "run_buffers": layers.disk.run_buffers.stats(),  # runs read past the page cache
            },
            "hdf5_workers": layers.workers.stats(),
            "shared": shared.stats() if shared is not None else None,
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

    def close() -> None:
        prefetcher.close()
        layers.close()

    # served once the HDF5 workers' server can fork them (its imports, ~0.3 CPU-s, paid here
    # rather than by the first listing; calls run in the daemon until then, if it is slow)
    layers.workers.served(WORKERS_READY)
    return Front(root, prefetcher, activity, report, close)


def build(
    settings: MountSettings,
) -> tuple[Operations, Callable[[], dict[str, Any]], Callable[[], None]]:
    """Wire the layers and the FUSE operations on them (imports and data flow one way:
    http → … → fuse_ops)."""
    front = build_front(settings, where=str(settings.mountpoint))
    ops = Operations(
        root=front.root,
        timeout=settings.timeout,
        attr_time=settings.attr_time,
        listing_time=settings.dir_cache_time,
        negative_time=settings.negative_time,
        limiter=trio.CapacityLimiter(settings.network_threads),
        activity=front.activity,
        prefetcher=front.prefetcher,
        # notify_store takes any contiguous buffer (pyfuse3 reads it with PyObject_GetBuffer)
        pusher=PagePusher(cast(Store, pyfuse3.notify_store), front.activity.counters),
    )
    return ops, front.report, front.close
