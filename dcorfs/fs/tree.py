"""The namespace of the mount (README, "The tree"): nodes, their names, lazy children,
refresh times.

A node is a directory or a file with a canonical path (its inode number is derived from it).
Directory children are loaded on first need by a blocking call (run in a worker thread by
`fuse_ops`) and kept: forever for a resource's own directory (resources are immutable) once
its condensed file is there, else for `dir_cache_time` (doc/DCOR.md §1); for `dir_cache_time`
for listings of datasets, circles and collections, counted from when the server was asked for
them. A stale listing is loaded again, which answers at once with the older listing while the
catalog refreshes it in the background (doc/DCOR.md §4).
`ready_children()` and `ready_child(name)` never wait for the network or other work: they
answer from what is loaded (a resource directory's feature file also from its resource once
it is opened for good, or from what its condensed file serves early), or None; a lookup
`fuse_ops` can answer so stays on the event loop.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Protocol

from ..cache import prefetch
from ..cache.blockcache import BlockCache
from ..cache.derived import DerivedCache
from ..cache.identity import ObjectId
from ..errors import AccessDenied, DcorfsError, NotFound, unreachable
from ..hdf5.contour import Contour, contour_of
from ..hdf5.rtdc import RtdcResource
from ..hdf5.structure import TRACE_PREFIX, Feature
from ..opening.resources import Texts
from ..opening.warm import Served
from ..remote.catalog import Catalog, Dataset, Group, Listing, Resource
from .content import FileContent, StaticContent
from .names import sanitize, unique
from .producers.fcs import fcs_content
from .producers.npy import contour_npys, npy_content, npy_of
from .producers.passthrough import ObjectContent
from .producers.rtdc_file import rtdc_content
from .producers.text import json_bytes, log_bytes, table_bytes
from .producers.tiff import pixel_size_of, tiff_content, tiff_features
from .producers.tsv import table_columns, tsv_content

log = logging.getLogger(__name__)

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
README = """\
dcorfs: DCOR as a read-only filesystem

  by-id/<resource-id>/                 any resource by its id (listing: ids opened so far)
  datasets/<dataset-name>/             any dataset by name (listing: all datasets)
  circles/<circle>/<dataset-name>/     datasets by circle
  collections/<collection>/<dataset>/  datasets by collection
  .dcorfs/status.json                  live counters of this mount (`dcorfs status MOUNT`)

In a dataset directory every RT-DC resource (.rtdc) is a directory named like the file
without its suffix; other resources are plain files; dataset.json is the CKAN record.

In an RT-DC resource directory:
  <name>.rtdc            the whole measurement as one HDF5 file (dclab, h5py, HDFView …)
  <feature>.npy          one per feature (numpy.load(path, mmap_mode="r") works)
  trace/<name>.npy       fluorescence traces, shape (events, samples)
  contour/points.npy     contours, all events' (x, y) points one after another
  contour/offsets.npy    event i's are points[offsets[i]:offsets[i+1]]
  features.tsv           all scalar features as a fixed-width, tab-separated table
  features.fcs           the same table as an FCS 3.1 file (FlowJo, flowCore, FlowKit)
  image.tif, mask.tif    the images as TIFF stacks, one page per event (Fiji/ImageJ)
  metadata.json          the measurement's metadata as DCOR's dcserv API returns it
  logs/<name>.txt        logs;  tables/<name>.csv  tables

Everything is fetched lazily and cached; only the bytes you read cross the network.
`dcorfs warmup PATH` reads files or trees into the cache ahead of time.
"""


class Node:
    def __init__(self, path: str, *, mtime: float = 0.0) -> None:
        self.path = path
        self.mtime = mtime

    @property
    def settled(self) -> bool:
        """Whether the node's attributes (its size) are known; else call `settle` first."""
        return True

    def settle(self) -> None:
        """Blocking: make the attributes known (see `LazyFile`)."""

    def child_path(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"


class File(Node):
    """A file of known size whose content is made on open."""

    def __init__(
        self,
        path: str,
        *,
        size: int,
        make: Callable[[], FileContent],
        mtime: float = 0.0,
        dynamic: bool = False,
        blocking: bool = True,
    ) -> None:
        super().__init__(path, mtime=mtime)
        self._size = size
        self._make = make
        self.dynamic = dynamic  # contents change: size 0 (as in /proc), read with direct_io
        # may be replaced on the next listing by a file with other bytes (a resource without
        # its condensed file yet): attributes kept only for `dir_cache_time`, and the
        # replacement has an inode of its own (`fuse_ops.Operations._inode`)
        self.volatile = False
        self.blocking = blocking  # False: `content()` returns at once (called inline)

    @property
    def size(self) -> int:
        return self._size

    def content(self) -> FileContent:
        """Blocking unless `blocking` is False: may open a resource (network)."""
        return self._make()


class LazyFile(File):
    """A file whose content, and so its size, is made in the background, started when its
    attributes are first asked (`settle()`, e.g. on lookup): the synthesized .rtdc, whose
    HDF5 structure is built for whoever looks at it, not for readers of other files, or
    ahead of them when a listed dataset's resource is prepared (`ahead`, where the prefetch
    policy says so: `prefetch.prebuild_synthesized`). `settle()` waits for it; if making it failed,
    the error is raised and the next `settle()` tries again."""

    def __init__(
        self,
        path: str,
        *,
        make: Callable[[], FileContent],
        start: Callable[[Callable[[], FileContent]], Future[FileContent]],
        mtime: float = 0.0,
    ) -> None:
        super().__init__(path, size=0, make=make, mtime=mtime)
        self._start = start
        self._lock = threading.Lock()
        self._future: Future[FileContent] | None = None
        self._waiting_ahead = False  # `_future` was started by `ahead`

    def _made(self) -> FileContent | None:
        future = self._future
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()

    @property
    def settled(self) -> bool:
        return self._made() is not None

    def settle(self) -> None:
        self._settled()

    def _failed(self) -> bool:
        """Whether the last making failed (called with the lock held)."""
        future = self._future
        return future is not None and future.done() and future.exception() is not None

    def ahead(self, start: Callable[[Callable[[], FileContent]], Future[FileContent]]) -> None:
        """Start making the content with `start` (a pool of work ahead of readers), unless
        it is made, being made or failed before (a failure is left to the next `settle()`,
        which tries again). A reader who settles while it still waits in that pool takes it
        over (`settle()` starts it in its own pool instead)."""
        with self._lock:
            if self._future is None:
                self._future = start(self._make)
                self._waiting_ahead = True

    def _settled(self) -> FileContent:
        """Blocking: the content, made once (a failed making is tried again next time)."""
        with self._lock:
            future = self._future
            taken_over = self._waiting_ahead and future is not None and future.cancel()
            if future is None or taken_over or self._failed():
                future = self._future = self._start(self._make)
            self._waiting_ahead = False
        return future.result()

    @property
    def size(self) -> int:
        made = self._made()
        if made is None:
            raise RuntimeError(f"{self.path}: size asked before settle()")
        return made.size

    def content(self) -> FileContent:
        return self._settled()


def content_file(
    path: str, content: FileContent, mtime: float = 0.0, on_open: Callable[[], None] | None = None
) -> File:
    """A file whose content is made already (its size is known); `on_open` (which must not
    block) is called whenever it is opened."""

    def make() -> FileContent:
        if on_open is not None:
            on_open()
        return content

    return File(path, size=content.size, make=make, mtime=mtime, blocking=False)


def static_file(path: str, data: bytes, mtime: float = 0.0) -> File:
    return content_file(path, StaticContent(data), mtime)


def text_dir(path: str, files: dict[str, bytes], mtime: float) -> StaticDir:
    """A directory of small text files (logs/, tables/)."""
    return StaticDir(
        path,
        {name: static_file(f"{path}/{name}", data, mtime) for name, data in files.items()},
        mtime=mtime,
    )


class Dir(Node):
    def __init__(self, path: str, *, mtime: float = 0.0, max_age: float = float("inf")) -> None:
        super().__init__(path, mtime=mtime)
        self._max_age = max_age
        self._lock = threading.Lock()
        self._children: dict[str, Node] | None = None
        self._loaded = 0.0
        # set: once loaded, the listing is made again with this (in the background) while
        # the loaded one is still served
        self._background: Callable[[Callable[[], None]], object] | None = None
        self._refreshing = False
        self._refresh_lock = threading.Lock()

    @property
    def volatile(self) -> bool:
        """True for listings that are refreshed (datasets, circles, collections)."""
        return self._max_age != float("inf")

    def _fresh(self) -> dict[str, Node] | None:
        children = self._children
        if children is None or time.monotonic() - self._loaded > self._max_age:
            return None
        return children

    def ready_children(self) -> dict[str, Node] | None:
        """The children if loaded and fresh (or, with `_background`, loaded: then made again
        there); never blocks on the network."""
        fresh = self._fresh()
        if fresh is not None or self._background is None or self._children is None:
            return fresh
        with self._refresh_lock:  # never held for long (`_lock` is, while loading)
            start, self._refreshing = not self._refreshing, True
        if start:
            try:
                self._background(self._refresh)
            except RuntimeError:  # shut down: the mount is closing
                self._refreshing = False
        return self._children

    def _refresh(self) -> None:
        """Make the listing again (in the background): errors are left to a next attempt."""
        try:
            self._reload()
        except DcorfsError as exc:
            log.debug("refreshing %s: %s", self.path, exc)
        finally:
            self._refreshing = False

    def children(self) -> dict[str, Node]:
        """Blocking: loads (or refreshes) the listing. Existing child nodes are kept."""
        ready = self.ready_children()
        if ready is not None:
            return ready
        return self._reload()

    def _reload(self) -> dict[str, Node]:
        with self._lock:
            ready = self._fresh()
            if ready is not None:
                return ready
            fresh = self._load()
            old = self._children or {}
            merged = {name: self._merged(old.get(name), node) for name, node in fresh.items()}
            self._children, self._loaded = merged, time.monotonic() - self._age()
            return merged

    def _age(self) -> float:
        """How old what `_load` returned is (seconds): 0 unless it came from a listing."""
        return 0.0

    def ready_child(self, name: str) -> Node | None:
        """The child `name` if it is known now, without waiting for the network or other
        work and without raising; else None (then `lookup`, in a worker thread, says)."""
        ready = self.ready_children()
        return None if ready is None else ready.get(name)

    def lookup(self, name: str) -> Node:
        """Blocking: the child `name`, or NotFound."""
        node = self.children().get(name)
        if node is None:
            raise NotFound(f"{self.child_path(name)} does not exist")
        return node

    def listed(self, children: dict[str, Node]) -> None:
        """Called (on the event loop: must not block) when the directory is opened for a
        listing: a chance to prepare its children in the background."""

    def _load(self) -> dict[str, Node]:
        raise NotImplementedError

    def _merged(self, old: Node | None, new: Node) -> Node:
        """The child kept when a listing is made again: by default the loaded one."""
        return _keep(old, new)


def _keep(old: Node | None, new: Node) -> Node:
    """Keep the loaded node when a refresh describes the same thing (same path and kind)."""
    if old is not None and type(old) is type(new) and old.path == new.path:
        if isinstance(old, DatasetDir) and isinstance(new, DatasetDir):
            old.update(new.dataset)
        return old
    return new


def _unsettle(node: Node, max_age: float) -> None:
    """Mark a node (a file, or a directory of them) as replaced on the next listing."""
    if isinstance(node, File):
        node.volatile = True
    elif isinstance(node, StaticDir):
        node.unsettle(max_age)


class StaticDir(Dir):
    def __init__(self, path: str, children: dict[str, Node], *, mtime: float = 0.0) -> None:
        super().__init__(path, mtime=mtime)
        self._static = children

    def _load(self) -> dict[str, Node]:
        return dict(self._static)

    def unsettle(self, max_age: float) -> None:
        """Mark the directory and its files as replaced on a listing after `max_age`."""
        self._max_age = max_age
        for child in self._static.values():
            _unsettle(child, max_age)


class Opening(Protocol):
    """What the tree asks of the opened RT-DC resources (`opening.resources.Resources`)."""

    @property
    def derived(self) -> DerivedCache: ...

    def rtdc(self, dataset: Dataset, resource: Resource) -> RtdcResource: ...

    def served_early(
        self, resource_id: str, loading: Future[Any], *, timeout: float | None = None
    ) -> Served | None: ...

    def settled(self, resource_id: str) -> bool: ...

    def settled_rtdc(self, resource_id: str) -> RtdcResource | None: ...

    def texts(self, dataset: Dataset, resource: Resource) -> Texts: ...

    def remembered(self, key: str, make: Callable[[float], Any]) -> Any: ...

    def warm_scalars(self, resource: RtdcResource) -> None: ...


class Located(Protocol):
    """What the tree asks of the objects of resources (`opening.objects.Objects`)."""

    def plain(self, dataset: Dataset, resource: Resource) -> ObjectId: ...

    def is_hdf5(self, dataset: Dataset, resource: Resource) -> bool: ...


class Workers(Protocol):
    """The pools the tree runs its background work in (`opening.pools.Pools`)."""

    @property
    def prepare(self) -> Executor: ...  # resources of a listed dataset opened ahead of readers

    @property
    def listing(self) -> Executor: ...  # listings and openings of resources a reader waits for

    @property
    def build(self) -> Executor: ...  # structures of synthesized files

    @property
    def ahead(self) -> Executor: ...  # the same, of resources opened ahead of readers


class Context:
    """What every node may need from below: the opened resources, the objects of resources,
    the pools and the cache. (Listings come from a catalog given to the nodes that list:
    CKAN's here, buckets' in `s3tree`.)"""

    def __init__(
        self,
        *,
        resources: Opening,
        objects: Located,
        pools: Workers,
        cache: BlockCache,
        dir_cache_time: float,
    ) -> None:
        self.resources = resources
        self.objects = objects
        self.pools = pools
        self.cache = cache
        self.dir_cache_time = dir_cache_time


def status_dir(status: Callable[[], bytes], mtime: float) -> StaticDir:
    """.dcorfs/ with status.json, made anew on every open."""
    return StaticDir(
        "/.dcorfs",
        {
            "status.json": File(
                "/.dcorfs/status.json",
                size=0,
                make=lambda: StaticContent(status()),
                dynamic=True,
                mtime=mtime,
            )
        },
        mtime=mtime,
    )


def build_root(ctx: Context, catalog: Catalog, status: Callable[[], bytes], *, mtime: float) -> Dir:
    children: dict[str, Node] = {
        "README.txt": static_file("/README.txt", README.encode(), mtime),
        "by-id": ByIdDir("/by-id", ctx, catalog.resource, mtime=mtime),
        "datasets": DatasetsDir("/datasets", ctx, catalog, mtime=mtime),
        "circles": GroupsDir("/circles", ctx, catalog, circles=True, mtime=mtime),
        "collections": GroupsDir("/collections", ctx, catalog, circles=False, mtime=mtime),
        ".dcorfs": status_dir(status, mtime),
    }
    return StaticDir("/", children, mtime=mtime)


Resolve = Callable[[str], tuple[Dataset, Resource]]  # resource id -> (dataset, resource)


class ByIdDir(Dir):
    """Any resource id resolves on lookup; the listing shows the ids resolved so far."""

    def __init__(self, path: str, ctx: Context, resolve: Resolve, *, mtime: float) -> None:
        super().__init__(path, mtime=mtime)
        self._ctx = ctx
        self._resolve = resolve
        self._resolved: dict[str, Node] = {}

    def _load(self) -> dict[str, Node]:
        return dict(self._resolved)

    def ready_children(self) -> dict[str, Node] | None:
        return dict(self._resolved)

    def lookup(self, name: str) -> Node:
        if name in self._resolved:
            return self._resolved[name]
        if not UUID.match(name):
            raise NotFound(f"{name} is not a resource id")
        dataset, resource = self._resolve(name)
        node = self._node(self.child_path(name), dataset, resource)
        with self._lock:
            self._resolved.setdefault(name, node)
            return self._resolved[name]

    def _node(self, path: str, dataset: Dataset, resource: Resource) -> Node:
        if resource.is_rtdc:
            return ResourceDir(path, self._ctx, dataset, resource)
        file_name = sanitize(resource.name)
        plain = PlainFile(f"{path}/{file_name}", self._ctx, dataset, resource)
        return StaticDir(path, {file_name: plain.node}, mtime=resource.mtime)


class ListingDir(Dir):
    """A directory listing what the catalog lists: as old as the listing (`Listing.asked`).
    While a stale listing is refreshed it is loaded again on every look; its nodes are made
    anew only when the catalog answers anew."""

    def __init__(self, path: str, *, mtime: float, max_age: float) -> None:
        super().__init__(path, mtime=mtime, max_age=max_age)
        self._asked = time.time()
        self._source: tuple[Any, ...] | None = None
        self._made: dict[str, Node] = {}

    def _listing(self) -> Listing[Any]:
        raise NotImplementedError

    def _make(self, entries: tuple[Any, ...]) -> dict[str, Node]:
        raise NotImplementedError

    def _load(self) -> dict[str, Node]:
        listing = self._listing()
        self._asked = listing.asked
        if listing.entries is not self._source:
            self._made, self._source = self._make(listing.entries), listing.entries
        return self._made

    def _age(self) -> float:
        return max(0.0, time.time() - self._asked)


class DatasetsDir(ListingDir):
    """`datasets/`, or a circle's or collection's datasets (`fq`).

    A name looked up in `datasets/` while no listing of it is loaded or remembered (a new
    cache, or one that never listed it) is asked of CKAN alone (`package_show`, one small
    answer, remembered as any answer), not found in the listing of the whole site
    (`package_search`, page by page: the real DCOR lists thousands of datasets): a reader who
    opens a path by name never waits for, nor parses, the catalogue. A name CKAN has no
    dataset of (a name `names.unique` made), or fails on, is looked for in the listing. Once
    a listing is loaded or remembered, it answers as any listing (a stale one at once, also
    offline), and a name it lacks is asked alone (an unlisted dataset)."""

    def __init__(
        self, path: str, ctx: Context, catalog: Catalog, *, mtime: float, fq: str = ""
    ) -> None:
        super().__init__(path, mtime=mtime, max_age=ctx.dir_cache_time)
        self._ctx = ctx
        self._catalog = catalog
        self._fq = fq
        self._named: dict[str, DatasetDir] = {}  # the node of each name (listed, or asked)
        self._named_lock = threading.Lock()

    def _listing(self) -> Listing[Dataset]:
        return self._catalog.datasets(self._fq)

    def _make(self, entries: tuple[Dataset, ...]) -> dict[str, Node]:
        named = unique((ds.name, ds.id, ds) for ds in entries)
        made: dict[str, Node] = {n: self._node(n, ds) for n, ds in named.items()}
        with self._named_lock:  # (a name asked alone again gets a node again)
            for name in [n for n in self._named if n not in made]:
                del self._named[name]
        return made

    def _merged(self, old: Node | None, new: Node) -> Node:
        return new  # `_node` kept the node of the same dataset

    def _node(self, name: str, dataset: Dataset) -> DatasetDir:
        """The node of `dataset` at `name`: the one made before for that dataset (given the
        dataset as now described), else a new one."""
        with self._named_lock:
            old = self._named.get(name)
            if old is not None and old.dataset.id == dataset.id:
                old.update(dataset)
                return old
            node = self._named[name] = DatasetDir(self.child_path(name), self._ctx, dataset)
            return node

    def lookup(self, name: str) -> Node:
        if self._fq or self._children is not None or self._catalog.remembers_datasets():
            node = self.children().get(name)
            if node is None and not self._fq:
                node = self._by_name(name)  # datasets/: any dataset resolves by name
        else:
            node = self._alone_first(name)
        if node is None:
            raise NotFound(f"{self.child_path(name)} does not exist")
        return node

    def _alone_first(self, name: str) -> Node | None:
        """With no listing loaded or remembered: the dataset asked alone (`_by_name`), else
        the listing's (a name `names.unique` made, or CKAN failing on this one dataset),
        whose own failure then says the first error; not when the server is away or refuses
        (the listing would ask the same server)."""
        try:
            return self._by_name(name)
        except DcorfsError as exc:
            if isinstance(exc, AccessDenied) or unreachable(exc):
                raise
            failed = exc
        try:
            node = self.children().get(name)
        except DcorfsError:
            raise failed from None
        if node is None:
            raise failed
        return node

    def _by_name(self, name: str) -> DatasetDir | None:
        """The dataset `name` as CKAN shows it alone (`Catalog.dataset`); None where it has
        another name (a lookup by id)."""
        dataset = self._catalog.dataset(name)
        return self._node(name, dataset) if sanitize(dataset.name) == name else None


class GroupsDir(ListingDir):
    def __init__(
        self, path: str, ctx: Context, catalog: Catalog, *, circles: bool, mtime: float
    ) -> None:
        super().__init__(path, mtime=mtime, max_age=ctx.dir_cache_time)
        self._ctx = ctx
        self._catalog = catalog
        self._circles = circles

    def _listing(self) -> Listing[Group]:
        return self._catalog.circles() if self._circles else self._catalog.collections()

    def _make(self, entries: tuple[Group, ...]) -> dict[str, Node]:
        catalog = self._catalog
        field = "organization" if self._circles else "groups"
        named = unique((g.name, g.name, g) for g in entries)
        return {
            n: DatasetsDir(
                self.child_path(n), self._ctx, catalog, mtime=self.mtime, fq=f"{field}:{g.name}"
            )
            for n, g in named.items()
        }


class ProbedFile(File):
    """A file whose size is asked of its object when its attributes are first needed
    (`settle()`, in a worker thread): a failure is this file's alone (a public file the
    store refuses for now, doc/DCOR.md §2), not its directory's, and tried again next time."""

    def __init__(
        self,
        path: str,
        *,
        probe: Callable[[], int],
        make: Callable[[], FileContent],
        mtime: float = 0.0,
    ) -> None:
        super().__init__(path, size=0, make=make, mtime=mtime)
        self._probe = probe
        self._probed: int | None = None

    @property
    def settled(self) -> bool:
        return self._probed is not None

    def settle(self) -> None:
        if self._probed is None:
            self._probed = self._probe()

    @property
    def size(self) -> int:
        if self._probed is None:
            raise RuntimeError(f"{self.path}: size asked before settle()")
        return self._probed


class PlainFile:
    """A non-RT-DC resource as a lazy file (sized when first looked at if its record has
    no size: DCOR fills it in a background job, doc/DCOR.md §2)."""

    def __init__(self, path: str, ctx: Context, dataset: Dataset, resource: Resource) -> None:
        self._ctx = ctx
        self._dataset = dataset
        self._resource = resource
        self.node: File
        if resource.size is None:
            self.node = ProbedFile(path, probe=self._size, make=self._content, mtime=resource.mtime)
        else:
            self.node = File(path, size=resource.size, make=self._content, mtime=resource.mtime)

    def _size(self) -> int:
        return self._ctx.objects.plain(self._dataset, self._resource).size

    def _content(self) -> FileContent:
        obj = self._ctx.objects.plain(self._dataset, self._resource)
        return ObjectContent(self._ctx.cache, obj)


def _stem(name: str) -> str:
    lower = name.lower()
    for suffix in (".rtdc", ".dc"):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


class DatasetDir(Dir):
    def __init__(self, path: str, ctx: Context, dataset: Dataset) -> None:
        super().__init__(path, mtime=dataset.mtime, max_age=ctx.dir_cache_time)
        self._ctx = ctx
        self.dataset = dataset

    def update(self, dataset: Dataset) -> None:
        if dataset != self.dataset:
            self.dataset = dataset
            self._loaded = 0.0  # reload children on next need

    def listed(self, children: dict[str, Node]) -> None:
        """Whoever lists a dataset is likely to look into its resources (`ls -lR`, a file
        manager): they are opened in the background, side by side."""
        for child in children.values():
            if isinstance(child, ResourceDir) and child.ready_children() is None:
                self._ctx.pools.prepare.submit(child.prepare)

    def _load(self) -> dict[str, Node]:
        dataset = self.dataset
        wanted: list[tuple[str, str, Resource | None]] = [("dataset.json", "", None)]
        wanted += [(_stem(r.name) if r.is_rtdc else r.name, r.id, r) for r in dataset.resources]
        children: dict[str, Node] = {}
        for name, res in unique(wanted).items():
            path = self.child_path(name)
            if res is None:
                children[name] = static_file(path, json_bytes(dataset.record), dataset.mtime)
            elif res.is_rtdc:
                children[name] = ResourceDir(path, self._ctx, dataset, res)
            else:
                children[name] = PlainFile(path, self._ctx, dataset, res).node
        return children


class ContourDir(Dir):
    """`contour/` of a resource: `points.npy` and `offsets.npy`, sized when the directory is
    first looked into (that reads every event's header: see `hdf5.contour`), not when its
    resource is opened."""

    def __init__(self, path: str, ctx: Context, contour: Contour, *, mtime: float) -> None:
        super().__init__(path, mtime=mtime)
        self._ctx = ctx
        self._contour = contour

    def _load(self) -> dict[str, Node]:
        resources = self._ctx.resources
        made = contour_npys(self._contour, resources.derived, resources.remembered)
        return {
            name: content_file(self.child_path(name), content, self.mtime)
            for name, content in made.items()
        }


def _feature_names(opened: RtdcResource) -> dict[str, Feature]:
    """The features of a resource that have a .npy file in its directory, by file name (a
    trace's is in `trace/`; of two features with the same file name, the later)."""
    return {
        sanitize(name + ".npy"): feature
        for name, feature in opened.features.items()
        if not name.startswith(TRACE_PREFIX)
    }


class ResourceDir(Dir):
    """An RT-DC resource: feature files, features.tsv, metadata, logs, tables.

    Its listing waits for the original file to be described. A feature's .npy file is found
    without it: as soon as the condensed file is described, the scalar features it serves,
    while the resource is opened (`_early`); once the resource is settled, any feature's,
    from the opened resource (`_feature_file`): a reader of a few feature files does not wait
    for what the listing makes (TIFF preludes, the FCS text, tables), which is made when it
    is asked for."""

    def __init__(self, path: str, ctx: Context, dataset: Dataset, resource: Resource) -> None:
        super().__init__(path, mtime=resource.mtime)
        self._ctx = ctx
        self.dataset = dataset
        self.resource = resource
        # once listed, a reader is served that listing while the resource is opened again
        # (looking for its condensed file, doc/DCOR.md §1)
        self._background = ctx.pools.prepare.submit
        self._early_lock = threading.Lock()
        self._loading: Future[RtdcResource] | None = None
        # the opened resource the listing was made from, and whether the last listing was
        # made from another one (then its files whose bytes may differ are new nodes)
        self._made_from: RtdcResource | None = None
        self._reopened = False
        # the feature files made from an opened resource, by name (the listing made from it
        # has the same nodes), and its features by file name
        self._files_lock = threading.Lock()
        self._files: tuple[RtdcResource | None, dict[str, Feature], dict[str, Node]]
        self._files = (None, {}, {})

    def ready_child(self, name: str) -> Node | None:
        """As `Dir.ready_child`; also a feature's .npy file before the listing is made: of a
        settled resource, or a scalar feature's while the resource is opened (by a lookup's
        `_early`), once the condensed file is described (no worker thread for each of the
        files a reader looks up then; anything else, an error too, is left to `lookup`)."""
        ready = self.ready_children()
        if ready is not None:
            return ready.get(name)
        if not name.endswith(".npy"):
            return None
        opened = self._ctx.resources.settled_rtdc(self.resource.id)
        if opened is not None:
            return self._feature_file(opened, name)
        loading = self._loading
        if loading is None or loading.done():
            return None
        served = self._ctx.resources.served_early(self.resource.id, loading, timeout=0)
        return None if served is None else self._served_file(name, served)

    def lookup(self, name: str) -> Node:
        if self.ready_children() is None and name.endswith(".npy"):
            node = self._early(name)
            if node is not None:
                return node
        return super().lookup(name)

    def _early(self, name: str) -> Node | None:
        """Blocking: the .npy file `name` of a feature without the listing: the resource is
        opened (in the background), and the file is found once it is settled; a feature the
        condensed file serves as soon as that is described, if that comes first. Else None:
        the listing says (the same file: same bytes, same path)."""
        resources, rid = self._ctx.resources, self.resource.id
        opened = resources.settled_rtdc(rid)
        if opened is None and self._rtdc():
            loading = self._opening()
            served = resources.served_early(rid, loading)
            node = None if served is None else self._served_file(name, served)
            if node is not None:
                return node
            concurrent.futures.wait([loading])  # opened: then its file, or the listing says
            error = loading.exception()
            if error is not None:
                raise error  # the opening's own error, rather than a second attempt
            opened = resources.settled_rtdc(rid)
        return None if opened is None else self._feature_file(opened, name)

    def _opening(self) -> Future[RtdcResource]:
        """The resource's opening a lookup waits for, started unless one is under way."""
        with self._early_lock:
            loading = self._loading
            if loading is None or loading.done():
                loading = self._loading = self._ctx.pools.listing.submit(
                    self._ctx.resources.rtdc, self.dataset, self.resource
                )
            return loading

    def _rtdc(self) -> bool:
        """Blocking: whether the resource is opened as an RT-DC file (else its listing says
        what it holds)."""
        return True

    def _served_file(self, name: str, served: Served) -> Node | None:
        """The .npy file `name` of a feature the condensed file serves, else None."""
        found = served.get(name[: -len(".npy")])
        if found is None or sanitize(name) != name:
            return None
        feature, values = found
        content = npy_of(feature, ObjectContent(self._ctx.resources.derived, values))
        return content_file(self.child_path(name), content, self.mtime)

    def _feature_file(self, opened: RtdcResource, name: str) -> Node | None:
        """The .npy file `name` of a feature of `opened`, None if no feature has that file
        (see `_feature_files`). Never blocks."""
        return self._feature_files(opened, [name]).get(name)

    def _feature_files(
        self, opened: RtdcResource, names: list[str] | None = None
    ) -> dict[str, Node]:
        """The .npy files of `opened`'s features (not the traces': those are in `trace/`) by
        name, all or those of `names` it has; each made once from it, so the listing and the
        files found before it are the same nodes. Never blocks."""
        with self._files_lock:
            if self._files[0] is not opened:
                self._files = (opened, _feature_names(opened), {})
            _, features, files = self._files
            wanted = list(features) if names is None else [n for n in names if n in features]
            for name in wanted:
                if name not in files:
                    files[name] = self._npy_file(self.child_path(name), opened, features[name])
            return {name: files[name] for name in wanted}

    def _npy_file(self, path: str, opened: RtdcResource, feature: Feature) -> File:
        """A feature's .npy file; opening a scalar one warms them all: whoever reads one is
        likely to read more (their values brought into memory in the background, decoded or
        from the disk cache)."""
        warm = functools.partial(self._ctx.resources.warm_scalars, opened)
        on_open = warm if feature.scalar else None
        return content_file(path, npy_content(opened, feature), self.mtime, on_open)

    def _merged(self, old: Node | None, new: Node) -> Node:
        """A new node only for a file (or directory) whose bytes may have changed: the
        resource was opened again (its condensed file came) and it was volatile."""
        if self._reopened and isinstance(old, (File, Dir)) and old.volatile:
            return new
        return _keep(old, new)

    def prepare(self) -> None:
        """Load the listing now (in the background), and start making its synthesized .rtdc
        where the prefetch policy says so (a listing with attributes waits for its size):
        errors are left to the next reader."""
        try:
            children = self.children()
            opened = self._made_from
            if opened is not None and prefetch.prebuild_synthesized(contour_of(opened) is not None):
                for child in children.values():
                    if isinstance(child, LazyFile):
                        child.ahead(self._ctx.pools.ahead.submit)
        except DcorfsError as exc:
            log.debug("preparing %s: %s", self.path, exc)

    def _load(self) -> dict[str, Node]:
        ctx, rid, mtime = self._ctx, self.resource.id, self.mtime
        opened = ctx.resources.rtdc(self.dataset, self.resource)
        self._reopened = self._made_from is not None and opened is not self._made_from
        self._made_from = opened
        warm = functools.partial(ctx.resources.warm_scalars, opened)  # (see `_npy_file`)
        files = self._feature_files(opened)
        traces: dict[str, Node] = {}
        for name, feature in opened.features.items():
            if name.startswith(TRACE_PREFIX):
                trace = sanitize(name[len(TRACE_PREFIX) :] + ".npy")
                traces[trace] = self._npy_file(f"{self.path}/trace/{trace}", opened, feature)
        if traces:
            files["trace"] = StaticDir(self.child_path("trace"), traces, mtime=mtime)
        contour = contour_of(opened)
        if contour is not None:
            files["contour"] = ContourDir(self.child_path("contour"), ctx, contour, mtime=mtime)
        synthesized = sanitize(_stem(self.resource.name) + ".rtdc")
        files[synthesized] = LazyFile(
            self.child_path(synthesized),
            make=lambda: rtdc_content(rid, opened, ctx.resources.remembered),
            start=ctx.pools.build.submit,
            mtime=mtime,
        )
        files["features.tsv"] = content_file(
            self.child_path("features.tsv"), tsv_content(opened), mtime, warm
        )
        texts = ctx.resources.texts(self.dataset, self.resource)
        files["metadata.json"] = static_file(
            self.child_path("metadata.json"), json_bytes(texts.metadata), mtime
        )
        files["logs"] = text_dir(
            self.child_path("logs"),
            unique((f"{k}.txt", k, log_bytes(v)) for k, v in sorted(texts.logs.items())),
            mtime,
        )
        files["tables"] = text_dir(
            self.child_path("tables"),
            unique((f"{k}.csv", k, table_bytes(v)) for k, v in sorted(texts.tables.items())),
            mtime,
        )
        # for Fiji/ImageJ and flow-cytometry software (README "From Fiji, R, MATLAB, FlowJo")
        pixel_size = pixel_size_of(texts.metadata)
        for feature in tiff_features(opened):
            stack = sanitize(feature.name + ".tif")
            content = tiff_content(opened, feature, pixel_size)
            files[stack] = content_file(self.child_path(stack), content, mtime)
        if table_columns(opened):
            fcs = fcs_content(opened)
            files["features.fcs"] = content_file(self.child_path("features.fcs"), fcs, mtime, warm)
        # without its condensed file (yet) the listing is made again after `dir_cache_time`:
        # the resource is opened again then, with the condensed file once it exists; what
        # may change then (the files made from the condensed file: scalar features, the
        # table, the synthesized file, logs) is marked so
        self._max_age = float("inf") if ctx.resources.settled(rid) else ctx.dir_cache_time
        if self.volatile:
            changing = [synthesized, "features.tsv", "features.fcs", "logs"]
            changing += [sanitize(f.name + ".npy") for f in opened.scalar_features()]
            for name in changing:
                if name in files:
                    _unsettle(files[name], ctx.dir_cache_time)
        return files
