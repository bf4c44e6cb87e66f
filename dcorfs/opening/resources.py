"""Opening RT-DC resources: a resource's original and condensed files opened side by side.

Where the objects are and who they are is `objects`' job; warming values is `warm`'s; the
work runs in the mount's `pools`. Opened resources are kept for the life of the mount once
they have their condensed file (see below); one opened again is retired, never closed before
the mount ends (readers may still hold it). Without DCOR's API (`--s3-only`) metadata, logs
and tables are read from the files themselves (`filetexts`).

A resource whose condensed file does not exist (yet: DCOR makes it in a background job that
lags uploads and may fail for good, doc/DCOR.md §1) opens from its original alone; nothing about
that absence is kept for good: such a resource is opened again, dcserv's basins and logs asked
again, once `recheck` seconds have passed, so the condensed file is used once it appears.
Likewise a public resource whose original the store refuses for now (not yet tagged public,
doc/DCOR.md §2) opens from its condensed file alone and is opened again after `recheck`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..cache import answers, prefetch
from ..cache.blockcache import BlockCache
from ..cache.derived import DerivedCache
from ..cache.metastore import FOREVER, Memo
from ..errors import (
    AccessDenied,
    DcorfsError,
    NotFound,
    ProtocolError,
    ServerError,
    TransientError,
)
from ..hdf5 import upstream
from ..hdf5.featurerule import event_count
from ..hdf5.rtdc import (
    OWN_SOURCES,
    RemoteFile,
    RtdcResource,
    RtdcSource,
    describe,
    described,
)
from ..hdf5.structure import BASINS
from ..hdf5.workers import INLINE, HDF5Workers
from ..remote.catalog import Catalog, Dataset, Resource
from ..remote.dcserv import (
    DcorApi,
)
from ..remote.failures import Failures
from .filetexts import file_texts, json_value
from .objects import Objects
from .pools import Pools
from .warm import Served, Warmer

log = logging.getLogger(__name__)
T = TypeVar("T")
CLOSE_WAIT = 5.0  # seconds openings under way are given to end when the mount closes


@dataclass(frozen=True)
class Texts:
    """What a resource directory shows besides features, in dcserv's shapes."""

    metadata: Any
    logs: dict[str, Any]
    tables: dict[str, Any]


class Resources:
    """Opened RT-DC resources of one mount (their objects located by `Objects`, their values
    warmed by `Warmer`, the work done in the mount's `Pools`)."""

    def __init__(
        self,
        *,
        objects: Objects,
        warmer: Warmer,
        pools: Pools,
        api: DcorApi | None,
        catalog: Catalog | None,
        memo: Memo,
        cache: BlockCache,
        derived: DerivedCache,
        timeout: float,
        recheck: float = 300.0,
        workers: HDF5Workers = INLINE,
    ) -> None:
        """`api` and `catalog`: DCOR's API, None without it (then metadata, logs and tables
        come from the files); `recheck`: seconds after which what may still change (a
        condensed file that did not exist) is looked at again; `workers`: where small files'
        structure is read and skeletons are built (`hdf5.workers`)."""
        self._workers = workers
        self._objects = objects
        self._warmer = warmer
        self._pools = pools
        self._api = api
        self._catalog = catalog
        self._memo = memo
        self._cache = cache
        self._derived = derived
        self._timeout = timeout
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}
        self._opened: dict[str, RtdcResource] = {}
        self._recheck = recheck
        # resources opened without their condensed file: when (monotonic), to look again
        self._unsettled: dict[str, float] = {}
        # replaced by a later opening: never closed before the mount ends (`close`), as
        # readers may hold them, and the values they registered with `DerivedCache` (which
        # keeps the first maker of an object) are still decoded through their sources
        self._retired: list[RtdcResource] = []
        self._closed = False  # `close` called: an opening that ends later closes its own
        # by resource: (own, the upstream openings joined, or None once kept for good, joined)
        self._joined: dict[
            str, tuple[RtdcResource, tuple[RtdcResource, ...] | None, RtdcResource]
        ] = {}
        self._partial: set[str] = set()  # last joined without all its upstreams' originals
        self._early: dict[str, concurrent.futures.Future[Served | None]] = {}
        self._failures = Failures()  # resources the server fails on (doc/DCOR.md §8)

    @property
    def derived(self) -> DerivedCache:
        """The cache of decoded values (feature values are objects in it)."""
        return self._derived

    def warm_scalars(self, resource: RtdcResource) -> None:
        """Warm the values of every scalar feature of `resource` (`Warmer.warm_scalars`)."""
        self._warmer.warm_scalars(resource)

    # -- RT-DC resources ----------------------------------------------------------------------

    def rtdc(self, dataset: Dataset, resource: Resource) -> RtdcResource:
        """An opened RT-DC resource, with the features its intra-dataset basins offer."""
        return self._with_upstream(resource, self._own_rtdc(dataset, resource))

    def _own_rtdc(self, dataset: Dataset, resource: Resource) -> RtdcResource:
        """An opened RT-DC resource, its own files' features (single-flight): kept for the
        life of the mount once it has its condensed file; without, opened again after
        `recheck` seconds (see the module's docstring)."""
        rid = resource.id
        with self._lock:
            ready = self._ready(rid)
            if ready is not None:
                return ready
            gate = self._opening.setdefault(rid, threading.Lock())
            earlier = self._opened.get(rid)
        if earlier is None:
            self._failures.check(rid)
        with gate:
            with self._lock:
                ready = self._ready(rid)
                if ready is not None:
                    return ready
                earlier = self._opened.get(rid)
            if earlier is None:
                self._failures.check(rid)  # while this one waited, another failed
            try:
                opened = self._open_rtdc(dataset, resource, self._early_future(rid))
            except Exception as exc:  # also OSError, h5py's: whatever fails, `earlier` serves
                if isinstance(exc, ServerError):
                    self._failures.remember(rid, exc)
                if earlier is None:
                    raise
                log.info("resource %s: looking again for its condensed file: %s", rid, exc)
                opened = earlier  # served as it was; looked at again after `recheck`
            finally:
                with self._lock:  # what a next attempt finds early is its own
                    self._early.pop(rid, None)
            if earlier is not None and opened is not earlier and not _more(opened, earlier):
                _close(opened)  # nothing new: readers keep the one they have
                opened = earlier
            with self._lock:
                closed = self._closed
                if not closed:
                    if earlier is not None and earlier is not opened:
                        self._retired.append(earlier)
                    self._opened[rid] = opened
                    if not opened.complete():
                        self._unsettled[rid] = time.monotonic()
                    else:
                        self._unsettled.pop(rid, None)
            if closed:  # the mount closed while this was opened: nothing would close it
                if opened is not earlier:
                    _close(opened)
                raise TransientError(f"resource {rid}: the mount is closing")
            return opened

    def _ready(self, resource_id: str) -> RtdcResource | None:
        """The opened resource unless it is to be opened (again); call with the lock held."""
        opened = self._opened.get(resource_id)
        since = self._unsettled.get(resource_id)
        if since is not None and time.monotonic() - since >= self._recheck:
            return None
        return opened

    def has_condensed(self, resource_id: str) -> bool:
        """Whether the resource is open with its condensed file and its original (its logs
        are final: doc/DCOR.md §7)."""
        with self._lock:
            return resource_id in self._opened and resource_id not in self._unsettled

    def settled(self, resource_id: str) -> bool:
        """Whether the resource is open with its own files and joined with its upstreams'
        (nothing more to come)."""
        with self._lock:
            return self._settled(resource_id)

    def _settled(self, resource_id: str) -> bool:
        """`settled`; call with the lock held."""
        return (
            resource_id in self._opened
            and resource_id not in self._unsettled
            and resource_id not in self._partial
        )

    def settled_rtdc(self, resource_id: str) -> RtdcResource | None:
        """Never blocks: what `rtdc` answers for a `settled` resource (its join with its
        upstreams kept for good), else None."""
        with self._lock:
            if not self._settled(resource_id):
                return None
            own = self._opened[resource_id]
            return own if self._alone(own) else self._kept(resource_id, own)

    def _alone(self, own: RtdcResource) -> bool:
        """Whether nothing is joined to an opened resource: without its condensed file (which
        names the upstreams) or without DCOR's API."""
        return own.source("condensed") is None or self._catalog is None or self._api is None

    def _kept(self, resource_id: str, own: RtdcResource) -> RtdcResource | None:
        """`own`'s join kept for good, else None; call with the lock held."""
        joined = self._joined.get(resource_id)
        if joined is not None and joined[0] is own and joined[1] is None:
            return joined[2]
        return None

    def _with_upstream(self, resource: Resource, own: RtdcResource) -> RtdcResource:
        """`own` joined with the resources its condensed file's intra-dataset basins name
        (doc/DCOR.md §3): each opened as itself (its own files only, so basins that name each
        other are no cycle), private ones with the token. Kept once every upstream opened with
        its condensed file and its original; an upstream that cannot be opened now is left out
        of this answer only, one whose original is refused for now (doc/DCOR.md §2) offers its
        condensed file's."""
        if self._alone(own):
            return own
        with self._lock:
            kept = self._kept(resource.id, own)
            joined = self._joined.get(resource.id)
        if kept is not None:
            return kept
        condensed = own.source("condensed")
        assert condensed is not None and self._catalog is not None and self._api is not None
        obj = condensed.remote.obj
        host = urlsplit(self._api.base_url).netloc
        basins = upstream.parsed(
            self.remembered(
                answers.intra_basins(obj.identity),
                lambda deadline: upstream.intra_basins(
                    condensed.arrays([BASINS], deadline=deadline)[BASINS],
                    own_id=resource.id,
                    host=host,
                ),
            )
        )
        found, complete = [], True
        for basin in basins:
            try:
                up_dataset, up_resource = self._catalog.resource(basin.resource_id)
                other = self._own_rtdc(up_dataset, up_resource)
                found.append((basin, other))
                # its original refused for now: its features from it are still to come
                complete = complete and other.source("resource") is not None
            except DcorfsError as exc:
                log.info("resource %s: basin %s not usable: %s", resource.id, basin, exc)
                complete = False
        # kept for good only when no upstream may be opened again (one without its condensed
        # file is); until then the same join while its openings are the same (its files keep
        # their inodes and page cache from one listing to the next)
        complete = complete and all(up.source("condensed") is not None for _, up in found)
        ups = tuple(up for _, up in found)
        made = None
        if joined is not None and joined[0] is own and _same(joined[1], ups):
            made = joined[2]
        if made is None:
            made = own.with_upstream(found) if found else own
        with self._lock:
            kept = self._kept(resource.id, own)
            if kept is not None:
                return kept  # kept for good by a call side by side with this one
            self._joined[resource.id] = (own, None if complete else ups, made)
            if complete:
                self._partial.discard(resource.id)
            else:
                self._partial.add(resource.id)
        return made

    def _early_future(self, resource_id: str) -> concurrent.futures.Future[Served | None]:
        with self._lock:
            return self._early.setdefault(resource_id, concurrent.futures.Future())

    def served_early(
        self,
        resource_id: str,
        loading: concurrent.futures.Future[Any],
        *,
        timeout: float | None = None,
    ) -> Served | None:
        """Blocking, while `loading` (whatever opens the resource) runs: the features its
        condensed file serves, with their value objects, as soon as that file is described
        (before the original is); None when `loading` ends first, nothing is served early,
        or `timeout` seconds pass first (0: never blocks, on the event loop).
        A reader looks for one of them: all their values are warmed (`Warmer.warm_objects`)."""
        with self._lock:
            if resource_id in self._opened:  # nothing to wait for (and nothing to leave)
                return None
        early = self._early_future(resource_id)
        concurrent.futures.wait(
            [early, loading], timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        if loading.done() or not early.done():
            return None
        served = early.result()
        if served is not None:
            self._warmer.warm_objects([values for _, values in served.values()])
        return served

    def _open_rtdc(
        self,
        dataset: Dataset,
        resource: Resource,
        early: concurrent.futures.Future[Served | None],
    ) -> RtdcResource:
        """Open an RT-DC resource; `early` is given what its condensed file serves as soon as
        that is known (see `served_early`)."""
        # the API answers a resource directory needs, asked side by side rather than one round
        # trip after another: logs and tables are remembered (single-flight) for the tree
        catalog = self._catalog
        metadata = None
        located = self._pools.ask.submit(self._objects.locate, dataset, resource)
        if catalog is not None:
            self._pools.ask.submit(catalog.dcserv, resource.id, "tables")
            metadata = catalog.dcserv(resource.id, "metadata")
        keys = located.result()
        if "resource" not in keys:
            raise ProtocolError(f"dcserv offers no resource basin for {resource.id}")
        condensed_made = None
        # when both must be described, a large original after the condensed file, whose
        # layouts are read ahead (`prefetch.original_after_condensed`)
        large = prefetch.original_after_condensed(resource.size)
        if "condensed" in keys:  # side by side with the original
            # logs are final once the condensed file exists (doc/DCOR.md §7): asked as soon
            # as it is found (not after it is described: the listing waits for them)
            found = None
            if catalog is not None:
                found = functools.partial(self._ask_logs, catalog, resource.id)
            condensed_made = self._pools.ask.submit(
                self._described,
                "condensed",
                keys["condensed"],
                None,
                None,
                ahead=large,
                found=found,
            )
            stated = _stated_events(metadata)
            if stated:
                warm = functools.partial(self._warmer.warm_condensed, early, events=stated)
                condensed_made.add_done_callback(warm)
        original: RtdcSource | None = None
        refused: AccessDenied | None = None
        try:
            original = self._described(
                "resource",
                keys["resource"],
                resource.size,
                resource.etag,
                after=condensed_made if large else None,
            )
        except AccessDenied as exc:
            if dataset.private:
                raise
            refused = exc
        condensed = None
        if condensed_made is not None:
            try:
                condensed = condensed_made.result()
            except (NotFound, ProtocolError, AccessDenied) as exc:
                # not made yet or never (anonymous S3 answers 403 for a key that does not
                # exist, presigned 404: doc/DCOR.md §1): the original alone, looked at again
                log.info(
                    "resource %s: no condensed file (yet), serving the original's features, "
                    "looking again in %.0f s: %s",
                    resource.id,
                    self._recheck,
                    exc,
                )
        if refused is not None:
            # DCOR tags an upload public=true in a background job (doc/DCOR.md §2): until then
            # the store refuses anonymous reads. The condensed file alone serves meanwhile (as
            # dclab's client does; with dcserv's metadata, logs and tables), nothing is
            # remembered: opened again after `recheck`, without it on the next access
            if catalog is None:
                condensed = None
            log.warning(
                "resource %s of public dataset %s: the object store refuses its file for now "
                "(not yet made public by DCOR?); %s: %s",
                resource.id,
                dataset.name,
                f"its condensed file serves, looking again in {self._recheck:.0f} s"
                if condensed is not None
                else "trying again on the next access",
                refused,
            )
            if condensed is None:
                raise AccessDenied(
                    f"resource {resource.id}: the object store refuses its file for now"
                ) from refused
        opened = original or condensed
        assert opened is not None
        if metadata is None:  # without dcserv: the file's own, remembered like its features
            obj = opened.remote.obj
            experiment = self.remembered(
                answers.experiment(obj.identity),
                functools.partial(_experiment, opened),
            )
            metadata = {"experiment": experiment}
        events = _event_count(metadata, opened)
        return RtdcResource(original, condensed, events, self._derived, workers=self._workers)

    def _ask_logs(self, catalog: Catalog, resource_id: str) -> None:
        """Once the condensed file is found: dcserv's logs, final now (in the background)."""
        with contextlib.suppress(RuntimeError):  # shut down: the mount is closing
            self._pools.ask.submit(catalog.dcserv, resource_id, "logs")

    def _described(
        self,
        kind: str,
        key: str,
        size: int | None,
        etag: str | None,
        *,
        ahead: bool = False,
        after: concurrent.futures.Future[RtdcSource] | None = None,
        found: Callable[[], None] | None = None,
    ) -> RtdcSource:
        """A source with its features: remembered for this version of its object, or read
        from the file (which opens it). If it is read now: `ahead`, the layouts of its event
        data are read too (`RtdcSource.layouts_ahead`: reading its features later needs no
        HDF5; a file read from memory in the same opening of its bytes as its features);
        `after`, another file is described first (what HDF5 reads first
        of this one is fetched meanwhile); `found`, called once the file is known to exist
        (identified: probed, or remembered), before it is described."""
        source = self._source(kind, key, size, etag)
        if found is not None:
            found()
        remembered_as = answers.features(source.remote.obj.identity)

        def scan(deadline: float) -> Any:
            if after is not None:
                source.fetch_structure(deadline)
                # at most half the time left: the rest is this file's own
                left = max(0.0, deadline - time.monotonic())
                concurrent.futures.wait([after], timeout=left / 2)
            # a condensed file's basins are read next when upstreams are joined
            basins = kind == "condensed" and self._catalog is not None and self._api is not None
            # and its synthesized file's outline when its directory is listed
            found = describe(source.scan(deadline, basins=basins, outline=True, layouts=ahead))
            if ahead:
                try:  # only saves time later: a failure is left to the reads that need them
                    source.layouts_ahead(deadline)
                except DcorfsError as exc:
                    log.debug("%s: layouts not read ahead: %s", key, exc)
            return found

        value = self.remembered(remembered_as, scan)
        source.features = described(value, source.kind)
        return source

    def _source(self, kind: str, key: str, size: int | None, etag: str | None) -> RtdcSource:
        """A source of the `kind` object at `key`, opened when first needed (its features
        may be remembered): then the places where HDF5 keeps its structure are fetched in
        parallel first, instead of as a chain of small misses while h5py walks the file (a
        small file whole: what h5py reads of it is most of it anyway)."""
        whole = prefetch.whole_size(kind)
        obj = self._objects.identify(key, size, etag, head=whole)
        ranges = prefetch.structure_ranges(kind, obj.size)

        def prepare(deadline: float) -> None:
            self._cache.ensure(obj, ranges, deadline=deadline)

        first_read = None
        if prefetch.condensed_whole_on_first_read(kind, obj.size):
            # once one scalar feature is read, fetch them all in the background
            first_read = functools.partial(self._warmer.fetch_whole_later, obj)
        remote = RemoteFile(self._cache, obj, timeout=self._timeout)
        return RtdcSource(
            remote,
            kind=kind,
            prepare=prepare,
            first_read=first_read,
            whole=obj.size <= whole,
            workers=self._workers,
        )

    def texts(self, dataset: Dataset, resource: Resource) -> Texts:
        """Metadata, logs and tables of an RT-DC resource: dcserv's answers, or without DCOR's
        API made from its files (once; remembered with the identities of the original and of
        the condensed file, whose logs come once it exists: doc/DCOR.md §7)."""
        if self._catalog is not None:
            rid = resource.id
            return Texts(
                metadata=self._catalog.dcserv(rid, "metadata"),
                logs=self._catalog.dcserv(rid, "logs", settled=self.has_condensed(rid)) or {},
                tables=self._catalog.dcserv(rid, "tables") or {},
            )
        opened = self.rtdc(dataset, resource)
        original = opened.source("resource")
        assert original is not None
        obj = original.remote.obj
        condensed = opened.source("condensed")
        made_from = "-" if condensed is None else condensed.remote.obj.etag
        made = self.remembered(
            answers.file_texts(obj.key, obj.etag, made_from),
            lambda deadline: file_texts(opened, deadline=deadline),
        )
        return Texts(metadata=made["metadata"], logs=made["logs"], tables=made["tables"])

    def remembered(self, key: str, make: Callable[[float], Any]) -> Any:
        """A JSON value derived from immutable resource data: made once (`make(deadline)`),
        then kept with the API answers (also for later mounts and offline use)."""
        return self._memo.get(key, make, max_age=FOREVER)

    # -- other resources ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the opened resources (after the pools were shut down: `Pools.close`). Openings
        under way are given `CLOSE_WAIT` seconds to end first, so that what they learned (a
        description read over the network) is remembered for the next mount."""
        until = time.monotonic() + CLOSE_WAIT
        with self._lock:
            gates = list(self._opening.values())
        for gate in gates:
            if gate.acquire(timeout=max(0.0, until - time.monotonic())):
                gate.release()
        with self._lock:
            self._closed = True
            opened, self._opened = dict(self._opened), {}
            retired, self._retired = self._retired, []
        for resource in [*opened.values(), *retired]:
            _close(resource)


def _more(opened: RtdcResource, earlier: RtdcResource) -> bool:
    """Whether `opened` has an own file `earlier` lacks."""
    return any(
        opened.source(kind) is not None and earlier.source(kind) is None for kind in OWN_SOURCES
    )


def _close(resource: RtdcResource) -> None:
    try:
        resource.close()
    except (DcorfsError, OSError) as exc:
        log.debug("closing a resource: %s", exc)


def _same(kept: tuple[RtdcResource, ...] | None, ups: tuple[RtdcResource, ...]) -> bool:
    """Whether a join kept for now was made of exactly these upstream openings."""
    if kept is None or len(kept) != len(ups):
        return False
    return all(a is b for a, b in zip(kept, ups, strict=True))


def _experiment(original: RtdcSource, deadline: float) -> dict[str, Any]:
    """The `experiment` section of the original file's own metadata (root attributes), as
    JSON (opens the file)."""
    attrs = original.attrs(["/"], deadline=deadline)["/"]
    return {
        name.split(":", 1)[1]: json_value(value)
        for name, value in attrs.items()
        if name.startswith("experiment:")
    }


def _stated_events(metadata: Any) -> int:
    """The event count dcserv's metadata states, or 0."""
    try:
        return max(0, int(metadata["experiment"]["event count"]))
    except (KeyError, TypeError, ValueError):
        return 0


def _event_count(metadata: Any, source: RtdcSource) -> int:
    """dclab's event count of a resource (`featurerule.event_count`)."""
    count = event_count(_stated_events(metadata), source.features)
    if count is None:
        raise ProtocolError("resource has no events")
    return count
