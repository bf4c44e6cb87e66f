"""Reading remote .rtdc (HDF5) files through the block cache: features, layout, event slices.

`RemoteFile` is the file object h5py reads through: every read becomes `BlockCache.read`, so
only the blocks HDF5 touches cross the network. `RtdcSource` describes one opened file (its
features with dtype and shape, and where each feature's chunks lie). `RtdcResource` is the
union of a resource's original file and DCOR's condensed file: scalar features come from the
condensed file when it has them (it is small, and it holds what dclab computes, e.g. a float64
`time` where the original's is defective), everything else from the original; with
`with_upstream`, also the features another resource of its dataset offers through an
intra-dataset basin (doc/DCOR.md §3).

Values equal what dclab reads: `mask` is boolean, everything else keeps its stored dtype
(little-endian). h5py serializes all HDF5 calls behind one lock; before decoding a slice we
make sure its raw chunks are in the cache (`BlockCache.ensure`, outside that lock), so the
lock is not held across network waits for event data; then the chunks are decoded without
h5py (`chunks`: the codecs' own libraries, off its lock and the GIL, so reads decode side by
side on every core), or through h5py for datasets whose pipeline `chunks` does not know.
Those chunks are kept in memory only and dropped once decoded (what is kept of event data are
their decoded values, see `RtdcResource`): written to disk they cost half the CPU time of a
cold sequential read.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import copy
import functools
import gc
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import h5py
import hdf5plugin  # noqa: F401  (registers the Zstd filter of modern .rtdc files)
import numpy as np
from h5py._objects import phil

from ..cache.blockcache import BlockCache
from ..cache.derived import DerivedCache, derived_id
from ..cache.identity import ObjectId
from ..cache.prefetch import HEADER_GUESS, STRUCTURE, decoded_block
from ..cache.slots import Block
from ..errors import ProtocolError
from .chunkindex import Fetch, NotFollowed, Read, index_nodes
from .chunks import ChunkError, Codec, DatasetLike, rows
from .featurerule import FACT_ATTRS, checked, file_facts, innate, shown
from .fileobj import SeekableFile
from .groupindex import root_header, symbol_tables
from .structure import (
    BASINS,
    CONTOUR,
    GROUPS,
    H5PY_ERRORS,
    Array,
    Feature,
    file_image,
    h5py_failure,
    member_names,
    read_arrays,
    read_attributes,
    read_features,
)
from .upstream import UpstreamBasin
from .workers import INLINE, HDF5Workers

log = logging.getLogger(__name__)
T = TypeVar("T")

OWN_SOURCES = ("resource", "condensed")  # the kinds of a resource's own files
# files opened on our file objects and not closed yet: closed at exit, while Python still runs
# (libhdf5 closes what is left open when the process ends, and its close of a file on a Python
# file object calls into an interpreter that is gone: a crash at exit, e.g. when a resource's
# opening finished in the background after the mount closed its resources)
_OPEN: weakref.WeakSet[RtdcSource] = weakref.WeakSet()


class CycleCollector:
    """Collects reference cycles in one thread of its own, with h5py's global lock held.

    Design note (a deadlock): h5py holds its global lock (`phil`) while it calls our file
    object (`RemoteFile.readinto`), which takes the block cache's locks (and logging's). Python
    runs the cycle collector in whichever thread allocates once a threshold is passed, and an
    h5py object freed there takes `phil`. So a thread holding a block-cache lock may start
    collecting, wait for `phil` and never get it, because the thread holding `phil` waits for
    that block-cache lock: every worker of the mount hangs for good (h5py#2019). Failed reads
    make such cycles all the time (exceptions whose tracebacks hold h5py objects). Hence the
    daemon switches automatic collection off and collects here, every `interval` seconds,
    taking `phil` first, in the same order as the readers (phil, then our locks).
    """

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gc", daemon=True)
        self._was_enabled = gc.isenabled()

    def start(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._thread.start()

    def stop(self) -> None:
        """No join: the thread may wait for `phil` held by a read that is still running."""
        self._stop.set()
        if self._was_enabled:
            gc.enable()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            collect_cycles()


def collect_cycles() -> int:
    """`gc.collect()` of the generations that are due, as the automatic collector would
    choose them, with h5py's global lock held (see `CycleCollector`). A full collection
    every time would hold that lock for long in a daemon with many objects: measured a third
    of the time h5py could work while `ls -lR` opened resources."""
    generation = _due_generation()
    if generation is None:
        return 0
    with phil:
        return gc.collect(generation)


def _due_generation() -> int | None:
    """The oldest generation whose collection is due (gc's own thresholds), or None."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    due = [g for g in range(3) if thresholds[g] and counts[g] > thresholds[g]]
    return max(due) if due else None


class RemoteFile(SeekableFile):
    """A read-only, seekable file object over a cached remote object."""

    def __init__(self, cache: BlockCache, obj: ObjectId, *, timeout: float) -> None:
        super().__init__()
        self._cache = cache
        self.obj = obj
        self._timeout = timeout
        self._local = threading.local()

    @contextmanager
    def deadline(self, deadline: float) -> Iterator[None]:
        """Reads by this thread inside the block end at `deadline` (else `DeadlineExceeded`)."""
        previous = getattr(self._local, "deadline", None)
        self._local.deadline = deadline
        try:
            yield
        finally:
            self._local.deadline = previous

    def _deadline(self) -> float:
        value = getattr(self._local, "deadline", None)
        return float(value) if value is not None else time.monotonic() + self._timeout

    def ensure(self, ranges: list[tuple[int, int]], *, deadline: float, disk: bool = True) -> None:
        """Have these byte ranges in the cache (fetched outside h5py's lock); `disk=False`: in
        memory only (see `BlockCache.ensure`)."""
        self._cache.ensure(self.obj, ranges, deadline=deadline, disk=disk)

    def forget(self, ranges: list[tuple[int, int]]) -> None:
        """Drop these byte ranges from the memory cache (see `BlockCache.forget`)."""
        self._cache.forget(self.obj, ranges)

    def end(self) -> int:
        return self.obj.size

    def read_all(self, deadline: float) -> bytes:
        """The whole object (blocking: network)."""
        data = self._cache.read(self.obj, 0, self.obj.size, deadline=deadline)
        return data if isinstance(data, bytes) else bytes(data)

    def read_range(self, start: int, stop: int, deadline: float) -> Block:
        """Bytes [start, stop) of the object (blocking unless they are in the cache)."""
        return self._cache.read(self.obj, start, stop, deadline=deadline)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        stop = min(self._pos + len(buffer), self.obj.size)
        if stop <= self._pos:
            return 0
        data = self._cache.read(self.obj, self._pos, stop, deadline=self._deadline())
        n = len(data)
        memoryview(buffer).cast("B")[:n] = data
        self._pos += n
        return n


@dataclass
class Outline:
    """What a copy of a resource's file needs besides event data (see `RtdcResource.outline`)."""

    attrs: dict[str, Any]  # root attributes (metadata)
    feature_attrs: dict[str, dict[str, Any]]
    logs: dict[str, Array] | None  # None: the file has no such group
    tables: dict[str, Array] | None


@dataclass
class _Layout:
    """Byte ranges of a dataset's storage by first event: chunk starts and (offset, size),
    each chunk's filter mask, and how to decode its chunks without h5py (None: with h5py)."""

    starts: list[int]
    spans: list[tuple[int, int]]
    rows: int  # events per chunk (contiguous: 0)
    row_bytes: int
    masks: list[int]
    codec: Codec | None


class _Keeping:
    """The sources that keep parts of an outline read ahead (`RtdcSource.scan`), oldest
    first: at most `KEPT_OUTLINES`, the oldest forget theirs (a resource opened but never
    listed, or whose synthesized file was remembered, would keep them for the mount's life)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[int, weakref.ref[RtdcSource]] = {}

    def add(self, source: RtdcSource) -> None:
        with self._lock:
            self._sources.pop(id(source), None)
            self._sources[id(source)] = weakref.ref(source)
            evicted = []
            while len(self._sources) > KEPT_OUTLINES:
                evicted.append(self._sources.pop(next(iter(self._sources)))())
        for old in evicted:
            if old is not None:
                old.forget_outline()


# A listed dataset's resources are all scanned ahead (the mount's `prepare` pool) while their
# builds trail behind in the same HDF5 worker's queue: the sources waiting for their build can
# be most of the dataset's. 64 dropped a quarter of the outlines of 100 small resources on a
# slow hour, read again from the files for their builds (doc/ARCHITECTURE.md, "Speed"). A
# source keeps 0.3–35 KB (pickled) of attributes, logs and tables in the fixtures.
KEPT_OUTLINES = 512
_KEEPING = _Keeping()


class RtdcSource:
    """One remote .rtdc file: its features and how to read event slices of them.

    The HDF5 file is opened on first need (`open`): a source whose features are known already
    (remembered from an earlier mount, see `Resources`) may never open it at all, when every
    byte asked for is in the cache of decoded data."""

    def __init__(
        self,
        remote: RemoteFile,
        *,
        kind: str,
        prepare: Callable[[float], object] | None = None,
        first_read: Callable[[], object] | None = None,
        whole: bool = False,
        workers: HDF5Workers = INLINE,
    ) -> None:
        self.remote = remote
        self._workers = workers  # where a small file's structure is read (`_structure`)
        self.kind = kind
        self.features: dict[str, Feature] = {}  # set by `scan` or by whoever remembers them
        self._prepare = prepare  # fetches what HDF5 reads on open, before it does (blocking)
        self._first_read = first_read  # called once, before the first read of event data
        self._whole = whole  # small, fetched whole on open: its structure read from memory
        self._h5: h5py.File | None = None
        self._opening = threading.Lock()
        self._layouts: dict[str, _Layout | None] = {}
        self._all_layouts_read = False  # (every dataset's under `events`: `layouts_ahead`)
        self._kept: dict[str, dict[str, Array] | None] = {}  # groups read ahead (`scan`)
        self._kept_attrs: dict[str, dict[str, Any]] = {}  # attributes read ahead (`scan`)
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        """Whether the HDF5 file was opened (`open`)."""
        return self._h5 is not None

    def fetch_structure(self, deadline: float) -> None:
        """Fetch what HDF5 reads first of the file (see `prepare`), without opening it: network
        only, no h5py (blocking)."""
        if self._prepare is not None:
            self._prepare(deadline)

    def open(self, deadline: float) -> h5py.File:
        """The HDF5 file, opened on the first call (blocking: network)."""
        with self._opening:
            if self._h5 is None:
                self.fetch_structure(deadline)
                with self._reading(
                    "the HDF5 structure", deadline, failure="is not a readable HDF5 file"
                ):
                    self._h5 = h5py.File(self.remote, "r", locking=False)
                _OPEN.add(self)
                self._fetch_headers(self._h5, deadline)
            return self._h5

    def _fetch_headers(self, h5: h5py.File, deadline: float) -> None:
        """Have the object headers of what an .rtdc reader walks (features, logs, tables) in
        the cache: one parallel batch per level of groups (their addresses are in the links
        of the level above), instead of h5py's chain of one miss per object."""
        read, fetch = self._walk_io(deadline)
        for level in STRUCTURE:
            self._fetch_links(self._group_headers(h5, level, read, deadline), read, fetch)
            ranges = []
            with self.remote.deadline(deadline), contextlib.suppress(*H5PY_ERRORS):
                for path in level:  # (a hint: what fails here fails again, reported, later)
                    group = h5.get(path)
                    if not isinstance(group, h5py.Group):
                        continue
                    names: list[bytes] = []
                    group.id.links.iterate(names.append)
                    for name in names:
                        address = _header_address(group, name)
                        if address is not None:
                            ranges.append((address, address + HEADER_GUESS))
            self.remote.ensure(ranges, deadline=deadline)

    def _group_headers(
        self, h5: h5py.File, paths: Sequence[str], read: Read, deadline: float
    ) -> list[int]:
        """The object header addresses of these groups: the root's from the superblock, the
        others' from the links of their parents (listed, so cached, by the level before)."""
        found = []
        for path in paths:
            address = None
            if path == "/":
                with contextlib.suppress(NotFollowed):
                    address = root_header(read)
            else:
                parent, _, name = path.rpartition("/")
                with self.remote.deadline(deadline), contextlib.suppress(*H5PY_ERRORS):
                    group = h5.get(parent or "/")
                    if isinstance(group, h5py.Group) and name in group:
                        address = _header_address(group, name.encode())
            if address is not None:
                found.append(address)
        return found

    def _walk_io(self, deadline: float) -> tuple[Read, Fetch]:
        """How `chunkindex` and `groupindex` read the file (through the cache) and fetch
        batches of ranges into it."""

        def read(offset: int, size: int) -> bytes:
            data = self.remote.read_range(offset, offset + size, deadline)
            return data if isinstance(data, bytes) else bytes(data)

        def fetch(ranges: Sequence[tuple[int, int]]) -> None:
            self.remote.ensure(list(ranges), deadline=deadline)

        return read, fetch

    def _fetch_links(self, headers: list[int], read: Read, fetch: Fetch) -> None:
        """Have the link storage of these groups (their object headers' addresses) in the
        cache, a level of their B-trees at a time (`groupindex`), before h5py lists them one
        miss after another."""
        if not headers:
            return
        try:
            symbol_tables(read, fetch, headers)
        except NotFollowed as exc:
            log.debug("%s: groups' links left to h5py: %s", self.remote.obj.key, exc)

    def _fetch_index(self, data: h5py.Dataset, deadline: float) -> None:
        """Have the index of a dataset's chunks in the cache, fetched a level of its B-tree at
        a time (`chunkindex`), before h5py walks it one node after another."""
        address = None
        # (a hint: what fails here fails again, reported, when h5py reads it)
        with self.remote.deadline(deadline), contextlib.suppress(*H5PY_ERRORS):
            parent, _, name = data.name.rpartition("/")
            address = _header_address(data.file[parent or "/"], name.encode())
        if address is None:
            return
        try:
            index_nodes(*self._walk_io(deadline), address)
        except NotFollowed as exc:
            log.debug("%s of %s: chunk index left to h5py: %s", data.name, self.remote.obj.key, exc)

    @property
    def _in_memory(self) -> bool:
        """Whether its structure is read from an in-memory copy (see `_structure`)."""
        return self._whole and not self.is_open

    def _structure(self, what: str, deadline: float, op: Callable[..., T], *args: Any) -> T:
        """`op(fid, *args)` on the file, to read its structure (features, attributes, logs,
        tables, layouts): a small file (`whole`) not opened yet in an HDF5 worker process, on
        an in-memory copy of its bytes (listing it never opens it through the cache, nor
        holds h5py's lock or the GIL here); any other one opened (`open`), for good, under
        `_reading(what)`."""
        data = self.image(deadline)
        if data is not None:
            where = self.remote.obj.key
            found = self._workers.run(on_image, data, where, what, op, *args, deadline=deadline)
            return cast(T, found)
        h5 = self.open(deadline)
        with self._reading(what, deadline):
            return op(h5.id, *args)

    def image(self, deadline: float) -> bytes | None:
        """Its bytes, when its structure is read from an in-memory copy (a small file not
        opened: see `_structure`), else None (blocking: network)."""
        if not self._in_memory:
            return None
        if self._prepare is not None:
            self._prepare(deadline)
        return self.remote.read_all(deadline)

    def scan(
        self,
        deadline: float,
        *,
        basins: bool = False,
        outline: bool = False,
        layouts: bool = False,
    ) -> dict[str, Feature]:
        """The features of the file that dclab shows (`featurerule.innate`). A file read from
        memory may have more read in the same call (one call to an HDF5 worker, or one
        opening of its bytes, instead of several), kept until the first `arrays` or `attrs`
        that asks for them: `basins`, its basins (`Resources` asks for them next, to join a
        resource with its upstreams); `outline`, what a resource's outline takes from it
        (`outline_parts`: its synthesized file is built when its directory is listed;
        dropped after that build, or when more than `KEPT_OUTLINES` sources keep theirs, the
        oldest first); `layouts`, the layouts of its event data (as `layouts_ahead` reads
        them, which then reads nothing; another file's are read by `layouts_ahead`)."""
        where = self.remote.obj.key
        if not (basins or outline or layouts) or not self._in_memory:
            return self._structure("the features", deadline, scan_file, self.kind, where)
        groups: tuple[str, ...] = (BASINS,) if basins else ()
        more = [*groups, *(["the outline"] if outline else []), *(["layouts"] if layouts else [])]
        features, attrs, arrays, found = self._structure(
            ", ".join(["the features", *more]),
            deadline,
            scan_ahead,
            self.kind,
            where,
            Ahead(outline, groups, layouts),
        )
        with self._lock:
            self._kept.update(arrays)
            self._kept_attrs.update(attrs)
        if found is not None:
            self._keep(found)
            self._all_layouts_read = True
        if attrs:
            _KEEPING.add(self)
        return features

    def forget_outline(self) -> None:
        """Drop what was read ahead for an outline (`scan`) and not asked for."""
        with self._lock:
            self._kept_attrs.clear()
            for group in GROUPS:
                self._kept.pop(group, None)

    def kept(self, paths: Sequence[str], groups: Sequence[str]) -> bool:
        """Whether the attributes of `paths` and the datasets of `groups` were read ahead
        (`scan`): asking for them then costs no call."""
        with self._lock:
            return all(p in self._kept_attrs for p in paths) and all(
                g in self._kept for g in groups
            )

    def attrs(self, paths: Sequence[str], *, deadline: float) -> dict[str, dict[str, Any]]:
        """The attributes of objects ("/", "events/deform" …) by path; those h5py cannot
        read are left out (with a warning)."""
        with self._lock:
            found = {p: self._kept_attrs.pop(p) for p in paths if p in self._kept_attrs}
        missing = [path for path in paths if path not in found]
        if missing:
            where = self.remote.obj.key
            found.update(self._structure("attributes", deadline, attrs_of, missing, where))
        return found

    def arrays(
        self, groups: Sequence[str], *, deadline: float
    ) -> dict[str, dict[str, Array] | None]:
        """The datasets of groups (`logs`, `tables`) with their attributes, read whole; None
        for a group the file does not have."""
        with self._lock:
            if all(group in self._kept for group in groups):
                return {group: self._kept.pop(group) for group in groups}
        if not self._in_memory:
            self._fetch_arrays(groups, deadline=deadline)
        where = self.remote.obj.key
        return self._structure(", ".join(groups), deadline, arrays_of, list(groups), where)

    def dataset(self, name: str, deadline: float) -> h5py.Dataset:
        return self.open(deadline)["events/" + name]

    @contextmanager
    def _reading(self, what: str, deadline: float, *, failure: str = "") -> Iterator[None]:
        """Reads by h5py under `deadline`; our own errors (network) come out as they are,
        h5py's as a ProtocolError: `<key>: cannot read <what>`, or `<key> <failure>`."""
        with self.remote.deadline(deadline):
            try:
                yield
            except H5PY_ERRORS as exc:
                said = f" {failure}" if failure else f": cannot read {what}"
                raise h5py_failure(exc, f"{self.remote.obj.key}{said}") from None

    reading = _reading  # for readers of groups of their own (`hdf5.contour`)

    def _fetch_arrays(self, groups: Sequence[str], *, deadline: float) -> None:
        """Have the data of the datasets of these groups in the cache, in one parallel batch
        (rather than one miss after another while they are read)."""
        h5 = self.open(deadline)
        ranges = []
        with self.remote.deadline(deadline):
            for path in groups:
                group = h5.get(path)
                if isinstance(group, h5py.Group):
                    ranges += _data_ranges(group)
        self.remote.ensure(ranges, deadline=deadline)

    def _layout(self, name: str, deadline: float) -> _Layout | None:
        with self._lock:
            if name in self._layouts:
                return self._layouts[name]
        # a small file (`whole`) never opened: the layouts of all its event data at once, from
        # its in-memory copy, so that reading its features does not keep it open in HDF5
        # (~1 MB of HDF5's own per open file: a reader of many small resources' scalars kept
        # every one of them open)
        found = self._all_layouts(deadline) if self._in_memory else {}
        if name not in found:
            data = self.dataset(name, deadline)
            self._fetch_index(data, deadline)
            found[name] = _layout_of(data, name, self.remote.obj.key)
        self._keep(found)
        with self._lock:
            return self._layouts[name]

    def _keep(self, found: dict[str, _Layout | None]) -> None:
        with self._lock:
            for key, layout in found.items():
                self._layouts.setdefault(key, layout)

    def layouts_ahead(self, deadline: float) -> None:
        """The layouts of all its event data now (from the in-memory copy of a small file),
        so that reading its features later needs no HDF5 (nor waits for h5py's lock); nothing
        when they were read already (`scan`)."""
        if self._all_layouts_read:
            return
        self._keep(self._all_layouts(deadline))
        self._all_layouts_read = True

    def _all_layouts(self, deadline: float) -> dict[str, _Layout | None]:
        """The layouts of every dataset under `events` (`_structure`: of a small file not
        opened, from its in-memory copy)."""
        where = self.remote.obj.key
        return self._structure("the layout of its event data", deadline, layouts_of, where)

    def raw_ranges(
        self, name: str, start: int, stop: int, *, deadline: float
    ) -> list[tuple[int, int]]:
        """The byte ranges of the stored data that hold events [start, stop) of `name`."""
        layout = self._layout(name, deadline)
        if layout is None:
            return []
        if layout.rows == 0:  # contiguous
            offset = layout.spans[0][0]
            return [(offset + start * layout.row_bytes, offset + stop * layout.row_bytes)]
        first = max(0, bisect.bisect_right(layout.starts, start) - 1)
        last = bisect.bisect_left(layout.starts, stop)
        return [(off, off + size) for off, size in layout.spans[first:last]]

    def read(self, name: str, start: int, stop: int, *, deadline: float) -> np.ndarray:
        """Events [start, stop) of a feature, decoded, in the dtype `features[name]` states."""
        feature = self.features[name]
        hook, self._first_read = self._first_read, None
        if hook is not None:
            hook()
        with self._reading(name, deadline):
            ranges = self.raw_ranges(name, start, stop, deadline=deadline)
            layout = self._layout(name, deadline)
        # in memory only: what is kept of event data are their decoded values (derived blocks)
        self.remote.ensure(ranges, deadline=deadline, disk=False)
        values = None
        if layout is not None and layout.codec is not None and stop > start:
            values = self._decoded(name, layout, start, stop, deadline=deadline)
        if values is None:
            with self._reading(name, deadline):
                values = self.dataset(name, deadline)[start:stop]
        # decoded: the chunks are not needed again, except the first and last (they may hold
        # events of the next slices too)
        self.remote.forget(ranges[1:-1])
        return np.ascontiguousarray(values, dtype=feature.dtype)

    def _decoded(
        self, name: str, layout: _Layout, start: int, stop: int, *, deadline: float
    ) -> np.ndarray | None:
        """Events [start, stop) of `name` decoded from its chunks without h5py (`chunks`);
        None when a chunk does not decode (h5py then reads them, and says what is wrong)."""
        feature = self.features[name]
        first = max(0, bisect.bisect_right(layout.starts, start) - 1)
        last = bisect.bisect_left(layout.starts, stop)
        pieces = [
            (layout.starts[i], self.remote.read_range(off, off + size, deadline), layout.masks[i])
            for i, (off, size) in enumerate(layout.spans[first:last], start=first)
        ]
        out = np.empty((stop - start, *feature.shape[1:]), dtype=feature.dtype)
        assert layout.codec is not None
        try:
            rows(layout.codec, pieces, start, stop, out)
        except ChunkError as exc:
            log.warning("%s of %s: %s; reading it through h5py", name, self.remote.obj.key, exc)
            return None
        return out

    def close(self) -> None:
        with self._opening:
            if self._h5 is not None:
                self._h5.close()
            _OPEN.discard(self)


@atexit.register
def _close_left_open() -> None:
    """Close the files still open (run at exit, after the worker pools were joined)."""
    for source in list(_OPEN):
        with contextlib.suppress(Exception):
            source.close()


def on_image(data: bytes, where: str, what: str, op: Callable[..., T], *args: Any) -> T:
    """`op(fid, *args)` on an HDF5 file opened from its bytes in memory (in an HDF5 worker:
    see `RtdcSource._structure`); h5py's errors as a ProtocolError naming `where`."""
    try:
        fid = file_image(data)
    except H5PY_ERRORS as exc:
        raise h5py_failure(exc, f"{where} is not a readable HDF5 file") from None
    try:
        with phil:  # no network inside: h5py's lock taken once, not per call
            return op(fid, *args)
    except H5PY_ERRORS as exc:
        raise h5py_failure(exc, f"{where}: cannot read {what}") from None
    finally:
        fid.close()


def scan_file(fid: h5py.h5f.FileID, kind: str, where: str) -> dict[str, Feature]:
    """The features of an opened file that dclab shows (`featurerule.innate`)."""
    found = read_features(fid, kind=kind, where=where)
    if not checked(found):
        return found
    root = read_attributes(fid, "/", where=where, only=FACT_ATTRS)
    return innate(found, file_facts(root, member_names(fid, "logs")))


def parts_of(
    fid: h5py.h5f.FileID, paths: list[str], groups: list[str], where: str
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Array] | None]]:
    """The attributes of `paths` and the datasets of `groups` of one opened file (parts of
    an outline)."""
    return attrs_of(fid, paths, where), arrays_of(fid, groups, where)


def outline_parts(kind: str, features: dict[str, Feature]) -> tuple[list[str], list[str]]:
    """The paths whose attributes and the groups whose datasets a resource's outline takes
    from its file of `kind` with these features, when it has both files (as
    `featurerule.shown` takes features: scalar ones from the condensed file, the others
    but the contour from the original, whose root attributes, logs and tables are taken
    too)."""
    scalar = kind == "condensed"
    paths = [
        "events/" + name for name, f in features.items() if f.scalar == scalar and name != CONTOUR
    ]
    return (paths, []) if scalar else (["/", *paths], list(GROUPS))


@dataclass(frozen=True)
class Ahead:
    """What `scan_ahead` reads besides the features: the outline's parts, the datasets of
    these groups, the layouts of the event data."""

    outline: bool
    groups: tuple[str, ...]
    layouts: bool


def scan_ahead(
    fid: h5py.h5f.FileID, kind: str, where: str, ahead: Ahead
) -> tuple[
    dict[str, Feature],
    dict[str, dict[str, Any]],
    dict[str, dict[str, Array] | None],
    dict[str, _Layout | None] | None,
]:
    """`scan_file`, the datasets of `ahead.groups`, with `ahead.outline` the attributes and
    groups its outline takes (`outline_parts`: none where reading them fails, they are read
    again when asked for) and with `ahead.layouts` those of its event data (`layouts_of`;
    else None; None too where reading them fails) on one opened file (see
    `RtdcSource.scan`)."""
    features = scan_file(fid, kind, where)
    arrays = arrays_of(fid, ahead.groups, where)
    attrs: dict[str, dict[str, Any]] = {}
    if ahead.outline:
        paths, more = outline_parts(kind, features)
        try:
            attrs, parts = parts_of(fid, paths, more, where)
        except (ProtocolError, *H5PY_ERRORS) as exc:
            log.debug("%s: outline not read ahead: %s", where, exc)
        else:
            arrays.update(parts)
    layouts = None
    if ahead.layouts:
        try:
            layouts = layouts_of(fid, where)
        except (ProtocolError, *H5PY_ERRORS) as exc:  # left to `layouts_ahead`, which reports it
            log.debug("%s: layouts not read with its features: %s", where, exc)
    return features, attrs, arrays, layouts


def attrs_of(fid: h5py.h5f.FileID, paths: list[str], where: str) -> dict[str, dict[str, Any]]:
    """The attributes of objects of an opened file by path (see `RtdcSource.attrs`)."""
    return {path: read_attributes(fid, path, where=where) for path in paths}


def arrays_of(
    fid: h5py.h5f.FileID, groups: Sequence[str], where: str
) -> dict[str, dict[str, Array] | None]:
    """The datasets of groups of an opened file (see `RtdcSource.arrays`)."""
    return {group: read_arrays(fid, group, where=where) for group in groups}


def layouts_of(fid: h5py.h5f.FileID, where: str) -> dict[str, _Layout | None]:
    """The layouts of every dataset under `events` of an opened file (by path below it, each
    object once, as `Group.visititems` names them); one h5py cannot read is left out
    (`RtdcSource._layout` reports it when it is read), as is one whose name is not UTF-8
    (no feature's). Through h5py's low-level objects: its high-level ones cost ~0.3 ms a
    dataset (a condensed file of 50 features: 14 ms)."""
    found: dict[str, _Layout | None] = {}
    try:
        events = h5py.h5o.open(fid, b"events")
    except H5PY_ERRORS:
        return found
    if not isinstance(events, h5py.h5g.GroupID):
        return found
    names: list[bytes] = []
    with contextlib.suppress(*H5PY_ERRORS):
        h5py.h5o.visit(events, names.append)  # (None: goes on)
    for name in names:
        with contextlib.suppress(*H5PY_ERRORS):
            item = h5py.h5o.open(events, name)
            if isinstance(item, h5py.h5d.DatasetID):
                text = name.decode()
                found[text] = _layout_of(_LowDataset(item), text, where)
    return found


class _LowDataset:
    """What `_layout_of` and `Codec.of` ask of a dataset, from its low-level identifier."""

    def __init__(self, dsid: h5py.h5d.DatasetID) -> None:
        self.id = dsid
        self.dtype = dsid.dtype
        self.shape = dsid.shape
        plist = dsid.get_create_plist()
        chunked = plist.get_layout() == h5py.h5d.CHUNKED
        self.chunks: tuple[int, ...] | None = plist.get_chunk() if chunked else None


@dataclass
class _OutlineImages:
    """The files an outline is read from, in memory: (name in messages, bytes) by kind; the
    kind of the file whose root attributes, logs and tables are taken; the paths whose
    attributes are read, by kind; the features (see `RtdcResource._outline_plan`)."""

    images: dict[str, tuple[str, bytes]]
    root: str
    paths: dict[str, list[str]]
    features: list[str]


def _on_outline(plan: _OutlineImages, fn: Callable[..., T], *args: Any) -> T:
    """`fn(outline, *args)`, the outline read from files in memory (in an HDF5 worker: see
    `RtdcResource.with_outline`; each file opened once)."""
    attrs: dict[str, dict[str, Any]] = {}
    arrays: dict[str, dict[str, Array] | None] = {}
    for kind, (where, data) in plan.images.items():
        groups = list(GROUPS) if kind == plan.root else []
        what = ", ".join(["attributes", *groups])
        wanted = plan.paths.get(kind, [])
        found, more = on_image(data, where, what, parts_of, wanted, groups, where)
        attrs.update(found)
        arrays.update(more)
    return fn(_outline(attrs, arrays, plan.features), *args)


def _outline(
    attrs: dict[str, dict[str, Any]],
    arrays: dict[str, dict[str, Array] | None],
    features: list[str],
) -> Outline:
    return Outline(
        attrs=attrs["/"],
        feature_attrs={name: attrs["events/" + name] for name in features},
        logs=arrays["logs"],
        tables=arrays["tables"],
    )


def condensed_features(condensed: RtdcSource, events: int) -> list[Feature]:
    """The features of a resource of `events` events whose values come from its condensed
    file (`featurerule.shown`)."""
    return list(shown({}, condensed.features, events).values())


def register_rows(derived: DerivedCache, source: RtdcSource, feature: Feature) -> ObjectId:
    """The derived object holding the values of `feature` of `source` (see `RtdcResource`),
    registered with what decodes them: the same object whoever registers it first."""
    obj = derived_id(
        source.remote.obj,
        f"rows/{feature.name}",
        feature.row_bytes * feature.shape[0],
        facts=(feature.dtype.str, feature.shape),
        block_size=decoded_block(feature.chunk_rows * feature.row_bytes),
    )
    derived.register(obj, functools.partial(_make_rows, source, feature))
    return obj


def _make_rows(
    source: RtdcSource, feature: Feature, start: int, stop: int, deadline: float
) -> memoryview:
    """Bytes [start, stop) of a feature's values, decoded from its source file: a view of
    the decoded rows, not a copy (the cache copies its blocks out of it; a copy here was a
    third of the copying a cold stream does, and of its fresh pages)."""
    row = feature.row_bytes
    first, last = start // row, -(-stop // row)
    values = source.read(feature.name, first, last, deadline=deadline)
    return values.data.cast("B")[start - first * row : stop - first * row]


def describe(features: dict[str, Feature]) -> dict[str, list[Any]]:
    """Features as JSON (to be remembered): name → [dtype, shape] (and events per chunk,
    where looked at)."""
    return {
        name: [f.dtype.str, list(f.shape), *([f.chunk_rows] if f.chunk_rows else [])]
        for name, f in features.items()
    }


def described(value: dict[str, list[Any]], kind: str) -> dict[str, Feature]:
    """The features `describe` gave, of a source of `kind` (remembered by an earlier
    version without events per chunk: 0, blocks of `DECODED_BLOCK`, the blocks it made)."""
    return {
        name: Feature(
            name=name,
            dtype=np.dtype(dtype),
            shape=tuple(shape),
            source=kind,
            chunk_rows=int(rest[0]) if rest else 0,
        )
        for name, (dtype, shape, *rest) in value.items()
    }


def _header_address(group: h5py.Group, name: bytes) -> int | None:
    """Where the object header of a group's member lies (its hard link's address); None for
    a soft or external link."""
    info = group.id.links.get_info(name)
    return int(info.u) if info.type == h5py.h5l.TYPE_HARD else None


def _layout_of(data: DatasetLike, name: str, where: str) -> _Layout | None:
    """Where a dataset's chunks lie and how they are decoded; None when nothing is stored."""
    row_bytes = data.dtype.itemsize * math.prod(data.shape[1:])
    pieces = _storage(data)
    if not pieces:
        return None
    per_chunk = 0 if data.chunks is None else data.chunks[0]
    codec = Codec.of(data)
    if codec is None:
        log.debug("%s of %s: decoded by h5py", name, where)
    return _Layout(
        [p[0] for p in pieces],
        [(p[1], p[2]) for p in pieces],
        per_chunk,
        row_bytes,
        [p[3] for p in pieces],
        codec,
    )


def _storage(data: DatasetLike) -> list[tuple[int, int, int, int]]:
    """Where a dataset's data lie: (first event, offset, size, filter mask) of each chunk,
    sorted, or of its contiguous storage; [] when nothing is stored."""
    if data.chunks is None:
        offset = data.id.get_offset()
        return [] if offset is None else [(0, offset, data.id.get_storage_size(), 0)]
    chunks: list[tuple[int, int, int, int]] = []
    data.id.chunk_iter(
        lambda info: chunks.append(
            (info.chunk_offset[0], info.byte_offset, info.size, info.filter_mask)
        )
    )
    return sorted(chunks)


def _data_ranges(group: h5py.Group) -> list[tuple[int, int]]:
    """Where the data of a group's datasets lie, as far as h5py can tell (a prefetch hint:
    members it cannot read are left to the reads that follow, which report them)."""
    ranges: list[tuple[int, int]] = []
    with contextlib.suppress(*H5PY_ERRORS):
        for item in group.values():
            if isinstance(item, h5py.Dataset):
                ranges += [(offset, offset + size) for _, offset, size, _ in _storage(item)]
    return ranges


class RtdcResource:
    """A resource's features: the union of its original file and its condensed file.

    The values of each feature are a derived object (`rows_object`): its events as C-order
    bytes in the feature's dtype, decoded from the source file once and kept in the
    `DerivedCache` (on disk, like the blocks of the files themselves)."""

    def __init__(
        self,
        original: RtdcSource | None,
        condensed: RtdcSource | None,
        events: int,
        derived: DerivedCache,
        *,
        workers: HDF5Workers = INLINE,
    ) -> None:
        """One of `original` and `condensed` at least: a public resource's original may be
        refused for now, its condensed file alone serving meanwhile (doc/DCOR.md §2);
        `workers`: where its synthesized file's skeleton is built."""
        self.workers = workers
        if original is None and condensed is None:
            raise ValueError("a resource needs its original or its condensed file")
        self.events = events
        self.derived = derived
        self._sources: dict[str, RtdcSource] = {}
        if original is not None:
            self._sources["resource"] = original
        if condensed is not None:
            self._sources["condensed"] = condensed
        self.features = shown(
            original.features if original is not None else {},
            condensed.features if condensed is not None else {},
            events,
        )
        self._objects = {name: self._register(f) for name, f in self.features.items()}

    def with_upstream(self, upstream: Sequence[tuple[UpstreamBasin, RtdcResource]]) -> RtdcResource:
        """This resource with the features its intra-dataset basins offer besides its own
        (doc/DCOR.md §3), each read from the upstream resource: mapping `same`, the very
        value object of the upstream's own feature (one cache identity); mapped, a derived
        object of the upstream's rows picked through this resource's mapping feature."""
        joined = copy.copy(self)
        joined.features = dict(self.features)
        joined._objects = dict(self._objects)
        joined._sources = dict(self._sources)
        for basin, other in upstream:
            for name, feature in other.features.items():
                if name in joined.features or not basin.offers(name):
                    continue
                kind = f"upstream/{basin.resource_id}/{feature.source}"
                source = other.source(feature.source)
                assert source is not None
                if basin.mapping == "same":
                    if feature.shape[0] != self.events:
                        log.warning("basin %s: %s has other events", basin.resource_id, name)
                        continue
                    obj = other.rows_object(name)
                    shown = replace(feature, source=kind)
                elif basin.mapping in self.features:
                    shown = replace(feature, shape=(self.events, *feature.shape[1:]), source=kind)
                    obj = _register_mapped(self, basin.mapping, other, feature, shown)
                else:
                    continue
                joined._sources[kind] = source
                joined.features[name] = shown
                joined._objects[name] = obj
        joined.features = dict(sorted(joined.features.items()))
        return joined

    def _register(self, feature: Feature) -> ObjectId:
        return register_rows(self.derived, self._sources[feature.source], feature)

    def rows_object(self, name: str) -> ObjectId:
        """The derived object holding the values of feature `name` (see the class note)."""
        return self._objects[name]

    def complete(self) -> bool:
        """Whether both its own files are open (nothing more of its own may come)."""
        return all(kind in self._sources for kind in OWN_SOURCES)

    def source(self, kind: str) -> RtdcSource | None:
        """The opened file of one kind ("resource" or "condensed"), if the resource has it."""
        return self._sources.get(kind)

    def scalar_features(self) -> list[Feature]:
        return [f for f in self.features.values() if f.scalar]

    def event_table(self) -> list[Feature]:
        """The scalar features with a value for every event (`features.tsv`'s columns)."""
        return [f for f in self.scalar_features() if f.shape[0] == self.events]

    def read(self, name: str, start: int, stop: int, *, deadline: float) -> np.ndarray:
        """Events [start, stop) of a feature, in the dtype `features[name]` states."""
        feature = self.features[name]
        stop = min(stop, feature.shape[0])
        start = min(start, stop)
        row = feature.row_bytes
        data = self.derived.read(self._objects[name], start * row, stop * row, deadline=deadline)
        values = np.frombuffer(data, dtype=feature.dtype)
        return values.reshape((stop - start, *feature.shape[1:]))

    def _outline_plan(self) -> tuple[str, dict[str, list[str]]]:
        """What `outline` reads: the kind of the file whose root attributes, logs and tables
        are taken (the original; the condensed file while only it is open), and the paths
        whose attributes are read, by kind of file (a feature's from the file its values
        come from: only those)."""
        root = "resource" if "resource" in self._sources else "condensed"
        paths: dict[str, list[str]] = {kind: [] for kind in self._sources}
        for name, feature in self.features.items():
            paths[feature.source].append("events/" + name)
        paths[root].append("/")
        return root, {kind: wanted for kind, wanted in paths.items() if wanted}

    def outline(self, *, deadline: float) -> Outline:
        """Root attributes, feature attributes, logs and tables as the original file has them
        (see `_outline_plan`)."""
        root, paths = self._outline_plan()
        attrs: dict[str, dict[str, Any]] = {}
        for kind, wanted in paths.items():
            attrs.update(self._sources[kind].attrs(wanted, deadline=deadline))
        arrays = self._sources[root].arrays(GROUPS, deadline=deadline)
        return _outline(attrs, arrays, list(self.features))

    def with_outline(self, fn: Callable[..., T], *args: Any, deadline: float) -> T:
        """`fn(outline, *args)` in an HDF5 worker (`fn` module-level, its arguments plain
        values). The outline is read here (`outline`) when every part of it was read ahead
        (`RtdcSource.scan`: no call), or when a file it comes from is not a small one read
        from memory (through the cache); else in the worker, in the same call, from the
        files' bytes (each opened once)."""
        root, paths = self._outline_plan()
        ahead = all(
            self._sources[kind].kept(paths.get(kind, []), GROUPS if kind == root else [])
            for kind in {root, *paths}
        )
        images = None if ahead else self._images({root, *paths}, deadline)
        if images is not None:  # read in the worker, from the files' bytes
            self.forget_outline()
            plan = _OutlineImages(images, root, paths, list(self.features))
            return cast(T, self.workers.run(_on_outline, plan, fn, *args, deadline=deadline))
        try:
            outline = self.outline(deadline=deadline)
        finally:
            self.forget_outline()  # (what was read ahead and not taken)
        return self.workers.run(fn, outline, *args, deadline=deadline)

    def _images(self, kinds: set[str], deadline: float) -> dict[str, tuple[str, bytes]] | None:
        """(name in messages, bytes) of the files of these kinds, or None where one is not a
        small file read from memory (blocking: network)."""
        images = {}
        for kind in kinds:
            source = self._sources[kind]
            data = source.image(deadline)
            if data is None:
                return None
            images[kind] = (source.remote.obj.key, data)
        return images

    def forget_outline(self) -> None:
        """Its own files drop what they read ahead for its outline (`RtdcSource.scan`)."""
        for kind in OWN_SOURCES:
            source = self._sources.get(kind)
            if source is not None:
                source.forget_outline()

    def close(self) -> None:
        for kind in OWN_SOURCES:  # not those of upstream resources (they close their own)
            source = self._sources.get(kind)
            if source is not None:
                source.close()


def _register_mapped(
    resource: RtdcResource, mapping: str, upstream: RtdcResource, feature: Feature, shown: Feature
) -> ObjectId:
    """The derived object of `shown`: the rows of the upstream's `feature` at the indices
    this resource's `mapping` feature (`basinmap0`) holds, registered with what picks them."""
    derived = resource.derived
    obj = derived_id(
        upstream.rows_object(feature.name),
        f"mapped/{mapping}",
        shown.row_bytes * shown.shape[0],
        facts=(resource.rows_object(mapping).etag, shown.dtype.str, shown.shape),
        block_size=derived.block_size,
    )
    derived.register(obj, _Mapped(resource, mapping, upstream, feature))
    return obj


@dataclass(frozen=True)
class _Mapped:
    """Makes bytes [start, stop) of a mapped feature: the upstream's rows read in runs of
    consecutive indices."""

    resource: RtdcResource
    mapping: str
    upstream: RtdcResource
    feature: Feature

    def __call__(self, start: int, stop: int, deadline: float) -> bytes:
        resource, mapping, feature = self.resource, self.mapping, self.feature
        row = feature.row_bytes
        first, last = start // row, -(-stop // row)
        index = resource.read(mapping, first, last, deadline=deadline).astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= feature.shape[0]):
            raise ProtocolError(f"{mapping} points outside the upstream's {feature.name}")
        # a few blocks per read: each is fetched (made) in this thread, never waiting for a
        # worker of the cache's pool, which may be running this very function
        block = resource.derived.size_of(self.upstream.rows_object(feature.name))
        step = max(1, 4 * block // max(1, row))
        parts = []
        run_start = 0
        for i in range(1, len(index) + 1):
            if i == len(index) or index[i] != index[i - 1] + 1 or i - run_start >= step:
                a, b = int(index[run_start]), int(index[i - 1]) + 1
                parts.append(self.upstream.read(feature.name, a, b, deadline=deadline))
                run_start = i
        values = (
            np.concatenate(parts) if parts else np.empty((0, *feature.shape[1:]), feature.dtype)
        )
        data = np.ascontiguousarray(values).data.cast("B")
        return bytes(data[start - first * row : stop - first * row])
