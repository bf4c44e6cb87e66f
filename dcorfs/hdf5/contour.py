"""The `contour` feature: one outline of (x, y) points per event, of a different length each.

RT-DC files store it as the group `/events/contour` with one (n_i, 2) dataset per event, named
"0", "1" … "N-1" (dclab's `RTDCWriter.write_ragged`); files written before masks were stored
have it as their only segmentation. The mount shows it as two arrays (README, "Formats"):
`contour/points.npy`, all events' points one after another, shape (P, 2) in the stored
integer dtype, and `contour/offsets.npy`, int64 of shape (N + 1,), so that event i is
`points[offsets[i]:offsets[i + 1]]`.

What it costs: the number of points of each event is in that event's dataset's object header,
and in real files these headers lie between the events' (compressed) points, so knowing the
offsets costs about as much as reading the contour region of the file. So they are asked for
only when needed: when the `contour/` directory is first looked into or the synthesized .rtdc
is built (which listing a resource directory does: it shows the file's size), never for a
reader of the resource's other files (opening a resource does not, nor does preparing a listed
dataset's resources: `cache.prefetch.prebuild_synthesized`). The header addresses are
in the group's links: all headers of a resource are fetched in parallel (`RemoteFile.ensure`,
in batches of `LENGTHS_BATCH`), not as N misses one after another under h5py's lock. The
offsets are then remembered (like the features, for this version of the file; as the
zlib-compressed lengths, base64: 1-2 bytes per event) in the metadata store, so a later
mount knows them without touching the file.

The points are a derived object (`dcorfs.derived`): a read of bytes [a, b) of it reads the
datasets of the events those bytes cover (headers, then their chunks, each batch fetched in
parallel before h5py decodes them), like `RtdcSource.read` does for other features.
"""

from __future__ import annotations

import base64
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from ..cache import answers
from ..cache.derived import DerivedCache, derived_id
from ..cache.identity import ObjectId
from ..cache.prefetch import HEADER_GUESS
from ..errors import ProtocolError
from .rtdc import RtdcResource, RtdcSource
from .structure import CONTOUR, Feature

GROUP = "events/" + CONTOUR
LENGTHS_BATCH = 8192  # headers fetched side by side (and datasets open at once) when sizing
Remember = Callable[[str, Callable[[float], Any]], Any]  # `Resources.remembered`


@dataclass(frozen=True)
class Contour:
    """The contour of a resource: `events` events of points of `dtype` from `source`."""

    source: RtdcSource
    dtype: np.dtype
    events: int

    @property
    def point_bytes(self) -> int:
        return 2 * self.dtype.itemsize

    def remembered_as(self) -> str:
        """The key its offsets are remembered under (this version of its file)."""
        return answers.contour_lengths(self.source.remote.obj.identity, self.events)

    def offsets(self, remember: Remember) -> np.ndarray:
        """int64 (events + 1,): event i's points are points[offsets[i]:offsets[i + 1]]
        (blocking the first time: reads every event's header, see the module note)."""
        value = remember(self.remembered_as(), lambda deadline: _packed(self.lengths(deadline)))
        return offsets_of(_unpacked(value, self.events))

    def lengths(self, deadline: float) -> np.ndarray:
        """The number of points of every event, read from the file (blocking: network)."""
        datasets = _Datasets(self.source, self.events)
        batches = range(0, self.events, LENGTHS_BATCH)
        found = [
            datasets.lengths(range(a, min(a + LENGTHS_BATCH, self.events)), deadline)
            for a in batches
        ]
        return np.concatenate(found) if found else np.zeros(0, np.int64)


def contour_of(resource: RtdcResource) -> Contour | None:
    """The contour a resource shows: that of its original file, when it has one for each of
    its events (more are cut, as for other features; fewer: none shown)."""
    source = resource.source("resource")
    feature: Feature | None = None if source is None else source.features.get(CONTOUR)
    if source is None or feature is None or feature.shape[0] < resource.events:
        return None
    return Contour(source, feature.dtype, resource.events)


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """Offsets (int64, one more than `lengths`, starting at 0) of consecutive runs."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def events_of(offsets: np.ndarray, first: int, last: int) -> tuple[int, int]:
    """The events [i, j) whose points cover points [first, last) (0 <= first < last <= P)."""
    i = int(np.searchsorted(offsets, first, side="right")) - 1
    j = int(np.searchsorted(offsets, last, side="left"))
    return max(i, 0), min(j, len(offsets) - 1)


def _packed(lengths: np.ndarray) -> dict[str, Any]:
    data = zlib.compress(np.asarray(lengths, dtype="<i8").tobytes())
    return {"lengths": base64.b64encode(data).decode()}


def _unpacked(value: Any, events: int) -> np.ndarray:
    lengths = np.frombuffer(zlib.decompress(base64.b64decode(value["lengths"])), dtype="<i8")
    if lengths.shape != (events,):
        raise ProtocolError(f"remembered contour lengths of {len(lengths)} events, not {events}")
    return lengths


def points_feature(contour: Contour, offsets: np.ndarray) -> Feature:
    """The points as a feature (what `contour/points.npy` holds): shape (P, 2)."""
    points = int(offsets[-1])
    return Feature(f"{CONTOUR}/points", contour.dtype, (points, 2), contour.source.kind)


def register_points(derived: DerivedCache, contour: Contour, offsets: np.ndarray) -> ObjectId:
    """The derived object of the points (C order, little-endian), registered with what reads
    them: the same object whoever registers it first."""
    feature = points_feature(contour, offsets)
    obj = derived_id(
        contour.source.remote.obj,
        f"{CONTOUR}/points",
        feature.row_bytes * feature.shape[0],
        facts=(contour.dtype.str, contour.events, feature.shape),
        block_size=derived.block_size,
    )
    derived.register(obj, _Points(_Datasets(contour.source, contour.events), contour, offsets))
    return obj


@dataclass(frozen=True)
class _Points:
    """Makes bytes [start, stop) of the points: the events they cover, read and joined."""

    datasets: _Datasets
    contour: Contour
    offsets: np.ndarray

    def __call__(self, start: int, stop: int, deadline: float) -> bytes:
        row = self.contour.point_bytes
        first, last = start // row, -(-stop // row)
        i, j = events_of(self.offsets, first, last)
        values = self.datasets.read(range(i, j), self.offsets, deadline)
        base = int(self.offsets[i]) * row
        return bytes(values.data.cast("B")[start - base : stop - base])


class _Datasets:
    """The per-event datasets of a source's contour group: their header addresses (from the
    group's links, read once), their shapes and values, each batch of headers and of data
    fetched in parallel before h5py reads them."""

    def __init__(self, source: RtdcSource, events: int) -> None:
        self._source = source
        self._events = events
        self._lock = threading.Lock()
        self._addresses: list[int] | None = None

    def _group(self, deadline: float) -> h5py.Group:
        h5 = self._source.open(deadline)
        with self._source.reading(CONTOUR, deadline):
            group = h5.get(GROUP)
        if not isinstance(group, h5py.Group):
            raise ProtocolError(f"{self._source.remote.obj.key} has no {GROUP} group")
        return group

    def _headers(self, group: h5py.Group, deadline: float) -> list[int]:
        """Each event's header address (a link's `u`), in event order."""
        with self._lock:
            if self._addresses is not None:
                return self._addresses
        found: dict[bytes, int] = {}

        def seen(name: bytes, info: Any) -> None:
            if info.type == h5py.h5l.TYPE_HARD:
                found[name] = info.u

        with self._source.reading(CONTOUR, deadline):
            group.id.links.iterate(seen, info=True)
        missing = [i for i in range(self._events) if str(i).encode() not in found]
        if missing:
            raise ProtocolError(
                f"{self._source.remote.obj.key}: {GROUP} has no dataset {missing[0]} "
                f"({len(missing)} of {self._events} events missing)"
            )
        addresses = [found[str(i).encode()] for i in range(self._events)]
        with self._lock:
            self._addresses = addresses
        return addresses

    def _opened(self, events: range, deadline: float) -> list[h5py.h5d.DatasetID]:
        """The datasets of these events, their headers fetched first (one parallel batch)."""
        group = self._group(deadline)
        addresses = self._headers(group, deadline)
        wanted = [(addresses[i], addresses[i] + HEADER_GUESS) for i in events]
        self._source.remote.ensure(wanted, deadline=deadline)
        with self._source.reading(CONTOUR, deadline):
            opened = [h5py.h5d.open(group.id, str(i).encode()) for i in events]
            shapes = [data.shape for data in opened]
        for i, shape in zip(events, shapes, strict=True):
            if len(shape) != 2 or shape[1] != 2:
                raise ProtocolError(
                    f"{self._source.remote.obj.key}: {GROUP}/{i} has shape {shape}, not (points, 2)"
                )
        return opened

    def lengths(self, events: range, deadline: float) -> np.ndarray:
        """The number of points of each of these events."""
        opened = self._opened(events, deadline)
        with self._source.reading(CONTOUR, deadline):
            return np.array([data.shape[0] for data in opened], dtype=np.int64)

    def read(self, events: range, offsets: np.ndarray, deadline: float) -> np.ndarray:
        """The points of these events one after another (shape (points, 2), little-endian)."""
        dtype = np.dtype(self._source.features[CONTOUR].dtype)
        opened = self._opened(events, deadline)
        ranges: list[tuple[int, int]] = []
        with self._source.reading(CONTOUR, deadline):
            for data in opened:
                ranges += _stored(data)
        # in memory only: what is kept are the decoded points (the derived object)
        self._source.remote.ensure(ranges, deadline=deadline, disk=False)
        base = int(offsets[events.start])
        values = np.empty((int(offsets[events.stop]) - base, 2), dtype)
        with self._source.reading(CONTOUR, deadline):
            for i, data in zip(events, opened, strict=True):
                first, last = int(offsets[i]) - base, int(offsets[i + 1]) - base
                if data.shape[0] != last - first:
                    raise ProtocolError(
                        f"{self._source.remote.obj.key}: {GROUP}/{i} has {data.shape[0]} "
                        f"points, {last - first} expected"
                    )
                if last > first:  # HDF5 converts to the (little-endian) dtype
                    data.read(h5py.h5s.ALL, h5py.h5s.ALL, values[first:last])
        self._source.remote.forget(ranges[1:-1])
        return values


def _stored(data: h5py.h5d.DatasetID) -> list[tuple[int, int]]:
    """The byte ranges of a dataset's stored data (its chunks', or its contiguous storage)."""
    if data.get_create_plist().get_layout() == h5py.h5d.CHUNKED:
        chunks = [data.get_chunk_info(k) for k in range(data.get_num_chunks())]
        return [
            (c.byte_offset, c.byte_offset + c.size) for c in chunks if c.byte_offset is not None
        ]
    offset = data.get_offset()
    return [] if offset is None else [(offset, offset + data.get_storage_size())]
