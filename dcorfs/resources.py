"""Opening resources: where their objects are → object identities → opened .rtdc sources.

For every object (a resource's file, its condensed file) this finds a stable identity
(bucket/key, ETag, size), registers a URL that works with the `Locator` (with a way to renew
it), and remembers identity and URLs in the metadata store, so a later mount can serve cached
bytes with the server gone. Opened resources are kept for the life of the mount once they
have their condensed file (see below); one opened again is retired, never closed before the
mount ends (readers may still hold it).

Where the objects are: the URLs dcserv's `basins` hand out, or, with an S3 `ObjectStore`
(`--s3-endpoint`), DCOR's object layout on that endpoint, read directly. Directly means
anonymously for public datasets and signed with S3 credentials for any; a private dataset
without S3 credentials keeps dcserv's presigned URLs. Either way an object has the same
identity, so cached blocks serve both paths. Without DCOR's API (`--s3-only`) metadata, logs
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

from . import upstream
from .blockcache import BlockCache, ObjectId
from .catalog import Catalog, Dataset, Resource
from .dcserv import (
    BUCKET_TEMPLATE,
    Basin,
    DcorApi,
    Locator,
    Renew,
    parse_basins,
    resource_key,
)
from .derived import DerivedCache
from .errors import (
    AccessDenied,
    DcorfsError,
    Moved,
    NotFound,
    ProtocolError,
    ServerError,
    TransientError,
    redact_url,
)
from .failures import Failures
from .filetexts import file_texts, json_value
from .http import Http
from .metastore import FOREVER, Memo
from .rtdc import (
    OWN_SOURCES,
    RemoteFile,
    RtdcResource,
    RtdcSource,
    condensed_features,
    describe,
    described,
    register_rows,
)
from .s3 import ObjectStore
from .structure import Feature

log = logging.getLogger(__name__)
T = TypeVar("T")
HEAD = 256 << 10  # first bytes of every RT-DC object fetched on open (HDF5 metadata)
TAIL = 1 << 20  # last bytes too: writers that grow a file leave object headers at its end
# objects up to this size are fetched whole on open: uploaded files (mostly event data) …
WHOLE = {"resource": 1 << 20, "condensed": 4 << 20}  # … and condensed ones (all scalars)
CONDENSED_PREFETCH = 64 << 20  # condensed files up to this size: fetched whole on first read
SCALARS_PREFETCH = 8 << 20  # all scalar values of a resource, up to this size: warmed together
MAX_REDIRECTS = 5  # hops followed from a link resource's URL to its file
LINK_AGE = 300.0  # seconds a link's size and ETag are trusted (the other site may change it)
ROUTE_LIFETIME = 600.0  # assumed life of a download-route URL (DCOR: ≥ 3600 s); renewed on 403
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
Listed = Callable[[str], tuple[int, str] | None]  # bucket/key -> (size, ETag) if listed
Served = dict[str, tuple[Feature, ObjectId]]  # feature name -> (feature, its values)


@dataclass(frozen=True)
class Texts:
    """What a resource directory shows besides features, in dcserv's shapes."""

    metadata: Any
    logs: dict[str, Any]
    tables: dict[str, Any]


class Resources:
    """Opened RT-DC resources and plain objects of one mount."""

    def __init__(
        self,
        *,
        api: DcorApi | None,
        catalog: Catalog | None,
        memo: Memo,
        http: Http,
        locator: Locator,
        cache: BlockCache,
        derived: DerivedCache,
        timeout: float,
        store: ObjectStore | None = None,
        listed: Listed | None = None,
        recheck: float = 300.0,
        bucket_template: str = BUCKET_TEMPLATE,
    ) -> None:
        """`api` and `catalog`: DCOR's API, None without it (then `store` is needed);
        `store`: objects read directly; `listed`: sizes and ETags known from bucket listings;
        `recheck`: seconds after which what may still change (a condensed file that did not
        exist) is looked at again; `bucket_template`: how the server names a circle's bucket
        (doc/DCOR.md §10)."""
        if (api is None or catalog is None) and store is None:
            raise ValueError("without DCOR's API, resources need an object store")
        self._api = api
        self._catalog = catalog
        self._store = store
        self._listed = listed
        self._template = bucket_template
        self._memo = memo
        self._http = http
        self._locator = locator
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
        self._warming: set[ObjectId] = set()  # values warmed (or being warmed)
        self._early: dict[str, concurrent.futures.Future[Served | None]] = {}
        self._failures = Failures()  # resources the server fails on (doc/DCOR.md §8)
        self._warm = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="warm")
        self._ask = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="ask")
        self._prepare = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="prepare")
        # CPU work (building synthesized files) apart, so it never queues behind network work
        self._build = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="build")
        # listings a reader waits for, apart from those made ahead of readers (`prepare`)
        self._listing = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="listing")
        self._pools = (self._warm, self._ask, self._prepare, self._build, self._listing)

    @property
    def derived(self) -> DerivedCache:
        """The cache of decoded values (feature values are objects in it)."""
        return self._derived

    def _deadline(self) -> float:
        return time.monotonic() + self._timeout

    # -- object identities ------------------------------------------------------------------

    def _direct(self, dataset: Dataset) -> bool:
        """Whether the dataset's objects are read from the object store: with S3 credentials
        or without DCOR's API always, anonymously only for public datasets (DCOR's private
        objects are not anonymously readable: dcserv's presigned URLs are)."""
        store = self._store
        return store is not None and (store.signed or self._api is None or not dataset.private)

    def _key(self, resource: Resource, artifact: str = "resource") -> str:
        """The bucket/key of a resource's object (its identity)."""
        return resource_key(resource.circle_id, resource.id, artifact, self._template)

    def _place(self, key: str) -> str:
        """Register the object store's URL of `key` (renewed by signing it again)."""
        store = self._store
        assert store is not None
        url, lifetime = store.url(key)
        self._locator.register(key, url, lifetime=lifetime, renew=lambda _: store.url(key))
        return key

    def _locate(self, dataset: Dataset, resource: Resource) -> dict[str, str]:
        """The keys of the resource's objects by kind, their URLs registered."""
        if self._direct(dataset):
            return {
                kind: self._place(self._key(resource, kind)) for kind in ("resource", "condensed")
            }
        return {kind: basin.key for kind, basin in self._basins(resource.id).items()}

    def _dcor(self) -> DcorApi:
        if self._api is None:
            raise ProtocolError("this mount has no DCOR API")
        return self._api

    def _basins(self, resource_id: str) -> dict[str, Basin]:
        """The resource's basins by kind; URLs registered with the locator."""

        def ask(deadline: float) -> Any:
            answer = self._dcor().dcserv(resource_id, "basins", deadline=deadline)
            return {"asked": time.time(), "basins": answer, "growing": _growing(answer)}

        answer = self._memo.get(f"basins:{resource_id}", ask, max_age=self._basins_age)
        age = time.time() - float(answer["asked"])  # presigned URLs age while stored
        found = {}
        for basin in parse_basins(answer["basins"]):
            found[basin.kind] = basin
            lifetime = None if basin.lifetime is None else basin.lifetime - age
            self._locator.register(
                basin.key, basin.url, lifetime=lifetime, renew=self._renew(resource_id, basin.kind)
            )
        return found

    def _basins_age(self, answer: Any) -> float:
        """How long dcserv's basins answer is kept: for good, unless its condensed basin has
        no `features` (its object does not exist yet; they come once it does, doc/DCOR.md §7):
        judged when asked (this is called on every use of the remembered answer)."""
        try:
            growing = answer["growing"]
            if not isinstance(growing, bool):  # remembered before it was judged when asked
                growing = _growing(answer["basins"])
        except (KeyError, TypeError):
            return self._recheck
        return self._recheck if growing else FOREVER

    def _renew(self, resource_id: str, kind: str) -> Renew:
        def renew(deadline: float) -> tuple[str, float | None]:
            for basin in self._dcor().basins(resource_id, deadline=deadline):
                if basin.kind == kind:
                    return basin.url, basin.lifetime
            raise NotFound(f"{kind} of resource {resource_id} is no longer offered")

        return renew

    def _identify(
        self,
        key: str,
        size: int | None,
        etag: str | None,
        *,
        head: int = HEAD,
        max_age: float = FOREVER,
    ) -> ObjectId:
        """Identity of an object: from CKAN's record or a bucket listing when they have size
        and ETag, else probed (the probe brings the object's first `head` bytes into the
        cache as well)."""
        if (size is None or etag is None) and self._listed is not None:
            size, etag = self._listed(key) or (None, None)
        if size is not None and etag is not None:
            return ObjectId(key=key, etag=etag, size=size)

        def ask(deadline: float) -> Any:
            url = self._locator.url(key, deadline=deadline)
            headers = self._locator.headers(key)
            try:
                info = self._http.probe(url, head=head, headers=headers, deadline=deadline)
            except (AccessDenied, Moved) as exc:
                url = self._locator.renew(key, deadline=deadline, cause=exc)
                info = self._http.probe(url, head=head, headers=headers, deadline=deadline)
            self._cache.admit(ObjectId(key=key, etag=info.etag, size=info.size), info.head)
            return {"size": info.size, "etag": info.etag}

        info = self._memo.get(f"object:{key}", ask, max_age=max_age)
        return ObjectId(key=key, etag=str(info["etag"]), size=int(info["size"]))

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
            return (
                resource_id in self._opened
                and resource_id not in self._unsettled
                and resource_id not in self._partial
            )

    def _with_upstream(self, resource: Resource, own: RtdcResource) -> RtdcResource:
        """`own` joined with the resources its condensed file's intra-dataset basins name
        (doc/DCOR.md §3): each opened as itself (its own files only, so basins that name each
        other are no cycle), private ones with the token. Kept once every upstream opened with
        its condensed file and its original; an upstream that cannot be opened now is left out
        of this answer only, one whose original is refused for now (doc/DCOR.md §2) offers its
        condensed file's."""
        condensed = own.source("condensed")
        if condensed is None or self._catalog is None or self._api is None:
            return own
        with self._lock:
            joined = self._joined.get(resource.id)
            if joined is not None and joined[0] is own and joined[1] is None:
                return joined[2]  # kept for good
        obj = condensed.remote.obj
        host = urlsplit(self._api.base_url).netloc
        basins = upstream.parsed(
            self.remembered(
                f"rtdc-intra-basins:v1:{obj.identity.hex()}",
                lambda deadline: upstream.intra_basins(
                    condensed.arrays(["basins"], deadline=deadline)["basins"],
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
        self, resource_id: str, loading: concurrent.futures.Future[Any]
    ) -> Served | None:
        """Blocking, while `loading` (whatever opens the resource) runs: the features its
        condensed file serves, with their value objects, as soon as that file is described
        (before the original is); None when `loading` ends first or nothing is served early."""
        with self._lock:
            if resource_id in self._opened:  # nothing to wait for (and nothing to leave)
                return None
        early = self._early_future(resource_id)
        concurrent.futures.wait([early, loading], return_when=concurrent.futures.FIRST_COMPLETED)
        if loading.done() or not early.done():
            return None
        return early.result()

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
        located = self._ask.submit(self._locate, dataset, resource)
        if catalog is not None:
            self._ask.submit(catalog.dcserv, resource.id, "tables")
            metadata = catalog.dcserv(resource.id, "metadata")
        keys = located.result()
        if "resource" not in keys:
            raise ProtocolError(f"dcserv offers no resource basin for {resource.id}")
        condensed_made = None
        if "condensed" in keys:  # side by side with the original
            condensed_made = self._ask.submit(
                self._described, "condensed", keys["condensed"], None, None
            )
            if catalog is not None:  # logs are final once the condensed file exists (§7)
                ask_logs = functools.partial(self._ask_logs, catalog, resource.id)
                condensed_made.add_done_callback(ask_logs)
            stated = _stated_events(metadata)
            if stated:
                warm = functools.partial(self._warm_condensed, early, events=stated)
                condensed_made.add_done_callback(warm)
        original: RtdcSource | None = None
        refused: AccessDenied | None = None
        try:
            original = self._described("resource", keys["resource"], resource.size, resource.etag)
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
                f"rtdc-experiment:v1:{obj.identity.hex()}",
                functools.partial(_experiment, opened),
            )
            metadata = {"experiment": experiment}
        events = _event_count(metadata, opened)
        return RtdcResource(original, condensed, events, self._derived)

    def _ask_logs(
        self, catalog: Catalog, resource_id: str, made: concurrent.futures.Future[RtdcSource]
    ) -> None:
        """Once the condensed file is described: dcserv's logs, final now (in the background)."""
        if made.cancelled() or made.exception() is not None:
            return
        with contextlib.suppress(RuntimeError):  # shut down: the mount is closing
            self._ask.submit(catalog.dcserv, resource_id, "logs")

    def _described(self, kind: str, key: str, size: int | None, etag: str | None) -> RtdcSource:
        """A source with its features: remembered for this version of its object, or read
        from the file (which opens it)."""
        source = self._source(kind, key, size, etag)
        # v2: with the contour group (v1 descriptions did not say whether a file has one)
        remembered_as = f"rtdc-features:v2:{source.remote.obj.identity.hex()}"
        value = self.remembered(remembered_as, lambda d: describe(source.scan(d)))
        source.features = described(value, source.kind)
        return source

    def _source(self, kind: str, key: str, size: int | None, etag: str | None) -> RtdcSource:
        """A source of the `kind` object at `key`, opened when first needed (its features
        may be remembered): then the places where HDF5 keeps its structure are fetched in
        parallel first, instead of as a chain of small misses while h5py walks the file (a
        small file whole: what h5py reads of it is most of it anyway)."""
        whole = WHOLE.get(kind, WHOLE["resource"])
        obj = self._identify(key, size, etag, head=whole)
        ranges = metadata_ranges(obj.size, whole)

        def prepare(deadline: float) -> None:
            self._cache.ensure(obj, ranges, deadline=deadline)

        first_read = None
        if kind == "condensed" and obj.size <= CONDENSED_PREFETCH:
            # once one scalar feature is read, fetch them all in the background
            first_read = functools.partial(self._warm.submit, self._prefetch, obj)
        remote = RemoteFile(self._cache, obj, timeout=self._timeout)
        return RtdcSource(
            remote, kind=kind, prepare=prepare, first_read=first_read, whole=obj.size <= whole
        )

    def warm_scalars(self, resource: RtdcResource) -> None:
        """Bring the values of every scalar feature of `resource` into memory in the
        background, once, when they are small enough: what the disk cache holds read in
        parallel, in one task, the others decoded side by side."""
        self._warm_objects([resource.rows_object(f.name) for f in resource.scalar_features()])

    def _warm_condensed(
        self,
        early: concurrent.futures.Future[Served | None],
        made: concurrent.futures.Future[RtdcSource],
        *,
        events: int,
    ) -> None:
        """As soon as the condensed file is described (called when that is done, in any
        thread), the features it serves are known (`served_early`) and their values warmed
        like `warm_scalars`: side by side with describing the original, which the listing of
        a resource directory waits for (it names the original's features too)."""
        if made.cancelled() or made.exception() is not None:
            _publish(early, None)
            return  # reported by whoever waits for it
        source = made.result()
        served = {
            f.name: (f, register_rows(self._derived, source, f))
            for f in condensed_features(source, events)
        }
        _publish(early, served)
        self._warm_objects([obj for _, obj in served.values()])

    def _warm_objects(self, objects: list[ObjectId]) -> None:
        if sum(obj.size for obj in objects) > SCALARS_PREFETCH:
            return
        with self._lock:  # each once (a resource's scalars are warmed from two places)
            objects = [obj for obj in objects if obj not in self._warming]
            self._warming.update(objects)
        if not objects:
            return
        try:
            self._warm.submit(self._warm_values, objects)
        except RuntimeError:  # shut down: the mount is closing
            log.debug("not warming %d objects: closing", len(objects))

    def _warm_values(self, objects: list[ObjectId]) -> None:
        for obj in self._derived.recall_stored(objects):
            self._warm.submit(self._ensure_values, obj)

    def _ensure_values(self, obj: ObjectId) -> None:
        try:
            self._derived.ensure(obj, [(0, obj.size)], deadline=self._deadline())
        except DcorfsError as exc:
            log.debug("warming %s: %s", obj.key, exc)

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
            f"file-texts:{obj.key}:{obj.etag}:{made_from}",
            lambda deadline: file_texts(opened, deadline=deadline),
        )
        return Texts(metadata=made["metadata"], logs=made["logs"], tables=made["tables"])

    def is_hdf5(self, dataset: Dataset, resource: Resource) -> bool:
        """Whether the resource's object starts like an HDF5 file (an .rtdc) — for resources
        found in buckets, which carry no file name."""
        key = self._key(resource)
        if self._direct(dataset) and not self._locator.known(key):
            self._place(key)
        obj = self._identify(key, resource.size, resource.etag)
        if obj.size < len(HDF5_SIGNATURE):
            return False
        head = self._cache.read(obj, 0, len(HDF5_SIGNATURE), deadline=self._deadline())
        return head == HDF5_SIGNATURE

    def _prefetch(self, obj: ObjectId) -> None:
        try:
            self._cache.ensure(obj, [(0, obj.size)], deadline=self._deadline())
        except DcorfsError as exc:
            log.debug("prefetch of %s: %s", obj.key, exc)

    def prepare(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` (opening resources ahead of readers) in a worker of the mount's pool for
        that; it must not wait for other work of this pool."""
        return self._prepare.submit(fn)

    def listing(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` (listing a resource directory a reader waits for) in a worker of the
        mount's pool for that: not behind the resources opened ahead of readers (`prepare`);
        it must not wait for other work of this pool."""
        return self._listing.submit(fn)

    def build(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` (making a synthesized file) in a worker of the mount's pool for that; it
        must not wait for other work of this pool."""
        return self._build.submit(fn)

    def remembered(self, key: str, make: Callable[[float], Any]) -> Any:
        """A JSON value derived from immutable resource data: made once (`make(deadline)`),
        then kept with the API answers (also for later mounts and offline use)."""
        return self._memo.get(key, make, max_age=FOREVER)

    # -- other resources ------------------------------------------------------------------------

    def plain(self, dataset: Dataset, resource: Resource) -> ObjectId:
        """A non-RT-DC resource as an object: a link's external URL (its identity, asked
        without the token, looked at again after LINK_AGE: it may change), a file on the
        site's disk through DCOR's download route (with the token: that is the DCOR host),
        or the S3 object from the object store (see `_direct`), the public S3 URL or the
        download route's redirect (doc/DCOR.md §6)."""
        link = resource.link
        if link is not None:
            if not self._locator.known(link):
                self._locator.register(link, link, lifetime=None, renew=self._follow(link))
            return self._identify(link, None, None, max_age=LINK_AGE)
        if resource.on_site_disk:
            api = self._dcor()
            route = api.route(dataset.id, resource.id, resource.name)
            if not self._locator.known(route):
                self._locator.register(route, route, lifetime=None, headers=api.auth_headers())
            return self._identify(route, resource.size, None)
        key = self._key(resource)
        if not self._locator.known(key):
            if self._direct(dataset):
                self._place(key)
            elif resource.s3_url and not dataset.private:
                self._locator.register(key, resource.s3_url, lifetime=None)
            else:

                def renew(deadline: float) -> tuple[str, float | None]:
                    url = self._dcor().download_url(
                        dataset.id, resource.id, resource.name, deadline=deadline
                    )
                    return url, ROUTE_LIFETIME

                self._locator.register(key, "", lifetime=0.0, renew=renew)
        return self._identify(key, resource.size, resource.etag)

    def _follow(self, link: str) -> Renew:
        """Where a link resource's URL leads now: links often redirect (DOIs, repositories'
        download URLs), and object reads do not follow redirects; without the token (the
        link is not DCOR's host). Its identity stays the link's URL."""

        def renew(deadline: float) -> tuple[str, float | None]:
            url = link
            for _ in range(MAX_REDIRECTS):
                target = self._http.redirect(url, deadline=deadline)
                if target == url:
                    return url, ROUTE_LIFETIME
                url = target
            raise ProtocolError(f"link {redact_url(link)}: more than {MAX_REDIRECTS} redirects")

        return renew

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._closed = True
            opened, self._opened = dict(self._opened), {}
            retired, self._retired = self._retired, []
        for resource in [*opened.values(), *retired]:
            _close(resource)


def _growing(basins: Any) -> bool:
    """Whether dcserv's basins answer will grow: its condensed basin has no `features`."""
    try:
        parsed = parse_basins(basins)
    except (ProtocolError, KeyError, TypeError):
        return True
    return any(b.kind == "condensed" and b.features is None for b in parsed)


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


def _publish(early: concurrent.futures.Future[Served | None], served: Served | None) -> None:
    """Give an opening attempt's `early` future its answer (once; a later attempt has its own)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        early.set_result(served)


def metadata_ranges(size: int, whole: int) -> list[tuple[int, int]]:
    """Byte ranges of an HDF5 object fetched when it is opened."""
    if size <= whole:
        return [(0, size)]
    return [(0, HEAD), (max(HEAD, size - TAIL), size)]


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
    count = _stated_events(metadata)
    if count > 0:
        return count
    lengths = [f.shape[0] for f in source.features.values()]
    if not lengths:
        raise ProtocolError("resource has no features")
    return max(set(lengths), key=lengths.count)
