"""The synthesized `.rtdc` of a resource (README, "Formats"): one self-contained HDF5 file,
read lazily.

The file holds the original's root attributes (metadata; byte strings decoded to text), its
logs and tables, and under `/events` every feature the resource directory shows (scalar
features of the condensed file included), each with the attributes of the dataset it comes
from, plus `/events/trace/<name>` and, when the original file has one, `/events/contour/<i>`, one
(n_i, 2) dataset of points per event as dclab writes it, served from the bytes of
`contour/points.npy` (HDF5 lays them back to back: one part covers them all; an event
without points has no storage). Basins are left out (every feature is in the file itself).
Event data are contiguous and uncompressed:
the HDF5 structure (`skeleton.build`) is made once per resource, without any event data, and
every byte range of a feature's extent is served by the same lazy reads (and cached decoded
values) as its `.npy` file.
`mask` is stored as uint8 0/255, as RT-DC writers store it.

Datasets are ordered scalars, traces, image-like; a hole separates scalars from the rest.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ...cache import answers
from ...errors import ProtocolError
from ...hdf5.contour import GROUP, Contour, contour_of, register_points
from ...hdf5.rtdc import OWN_SOURCES, Outline, RtdcResource
from ...hdf5.skeleton import Skeleton, Spec, build
from ...hdf5.structure import TRACE_PREFIX, Feature
from ..content import Buffer, FileContent, PartsContent, StaticContent
from .npy import feature_values
from .passthrough import ObjectContent

Remake = Callable[[float], Any]  # make(deadline) -> a JSON value
LAYOUT_VERSION = 2  # part of the cache key of skeletons: bump when the layout changes
MAX_CONTOUR_EVENTS = 100_000  # contours of more events are left out (see `_contour`)
log = logging.getLogger(__name__)


def _stored_dtype(feature: Feature) -> np.dtype:
    return np.dtype(np.uint8) if feature.name == "mask" else feature.dtype


class StoredMask:
    """A mask's values as the file stores them: bool bytes (0/1) as uint8 0/255, same size."""

    def __init__(self, values: FileContent) -> None:
        self._values = values
        self.size = values.size

    @staticmethod
    def _stored(data: Buffer) -> bytes:
        stored: np.ndarray = np.frombuffer(data, np.uint8) * np.uint8(255)
        return stored.tobytes()

    def read(self, offset: int, length: int, *, deadline: float) -> bytes:
        return self._stored(self._values.read(offset, length, deadline=deadline))

    def peek(self, offset: int, length: int, *, disk: bool = False) -> Buffer | None:
        data = self._values.peek(offset, length, disk=disk)
        return None if data is None else self._stored(data)


def stored_values(resource: RtdcResource, feature: Feature) -> FileContent:
    """Events as stored in the file: as in the .npy file, except `mask`."""
    values = feature_values(resource, feature)
    return StoredMask(values) if feature.name == "mask" else values


def _order(feature: Feature) -> tuple[int, str]:
    """Scalars first, then traces, then image-like features; by name within each."""
    if feature.scalar:
        return 0, feature.name
    return (1 if feature.name.startswith(TRACE_PREFIX) else 2), feature.name


def _text(value: Any) -> Any:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def specs(
    features: dict[str, Feature],
    outline: Outline,
    contour: tuple[np.dtype, np.ndarray] | None = None,
) -> list[Spec]:
    """The datasets of the synthesized file: logs, tables, then the lazy event data, the
    contour's last (`contour`: its dtype and offsets)."""
    made = [
        Spec(f"{group}/{n}", a.data.dtype, a.data.shape, a.attrs, a.data)
        for group, arrays in (("logs", outline.logs), ("tables", outline.tables))
        for n, a in (arrays or {}).items()
    ]
    ordered = sorted(features.values(), key=_order)
    first_large = next((f.name for f in ordered if not f.scalar), None)
    made += [
        Spec(
            "events/" + f.name,
            _stored_dtype(f),
            f.shape,
            outline.feature_attrs.get(f.name, {}),
            gap_before=f.name == first_large,
        )
        for f in ordered
    ]
    if contour is not None:
        dtype, offsets = contour
        lengths = np.diff(offsets)
        made += [
            Spec(f"{GROUP}/{i}", dtype, (int(n), 2), gap_before=i == 0 and first_large is None)
            for i, n in enumerate(lengths)
        ]
    return made


def _joined(extents: dict[str, tuple[int, int]], events: int) -> dict[str, tuple[int, int]]:
    """The extents with those of the contour's datasets as one, `events/contour`, when they
    lie back to back in event order (as HDF5 allocates them): the remembered skeleton then
    does not list one per event."""
    mine = [extents[name] for i in range(events) if (name := f"{GROUP}/{i}") in extents]
    if not mine or any(b[0] != a[0] + a[1] for a, b in itertools.pairwise(mine)):
        return extents
    joined = {path: e for path, e in extents.items() if not path.startswith(GROUP + "/")}
    joined[GROUP] = (mine[0][0], mine[-1][0] + mine[-1][1] - mine[0][0])
    return joined


class _Window:
    """Bytes [start, start + size) of another content."""

    def __init__(self, content: FileContent, start: int, size: int) -> None:
        self._content = content
        self._start = start
        self.size = size

    def read(self, offset: int, length: int, *, deadline: float) -> Buffer:
        length = max(0, min(length, self.size - offset))
        return self._content.read(self._start + offset, length, deadline=deadline)

    def peek(self, offset: int, length: int, *, disk: bool = False) -> Buffer | None:
        length = max(0, min(length, self.size - offset))
        return self._content.peek(self._start + offset, length, disk=disk)


def contour_parts(
    extents: dict[str, tuple[int, int]], offsets: np.ndarray, row: int, points: FileContent
) -> list[tuple[int, FileContent]]:
    """Where the contour's points go in the file: one part when its datasets were `_joined`,
    else one per event with points (dataset i holds points [offsets[i], offsets[i + 1]))."""
    joined = extents.get(GROUP)
    if joined is not None:
        if joined[1] != points.size:
            raise ProtocolError(f"skeleton does not fit the contour ({joined[1]} bytes)")
        return [(joined[0], points)]
    parts: list[tuple[int, FileContent]] = []
    for i in range(len(offsets) - 1):
        extent = extents.get(f"{GROUP}/{i}")
        size = int(offsets[i + 1] - offsets[i]) * row
        if extent is None and size == 0:
            continue
        if extent is None or extent[1] != size:
            raise ProtocolError(f"skeleton does not fit the contour of event {i}")
        parts.append((extent[0], _Window(points, int(offsets[i]) * row, size)))
    return parts


def _skeleton_key(
    resource_id: str, resource: RtdcResource, contour: tuple[np.dtype, np.ndarray] | None = None
) -> str:
    """The key a skeleton is remembered under: it changes with the features (for instance
    when DCOR's condensed file appears after a first mount), with the own files the outline
    (root attributes, logs, tables) is read from (the original, once the store no longer
    refuses it: doc/DCOR.md §2) and with the layout version."""
    sources = [kind for kind in OWN_SOURCES if resource.source(kind) is not None]
    features = [(f.name, f.dtype.str, f.shape, f.source) for f in resource.features.values()]
    # both files (the usual case): the key of earlier versions, whose skeletons stay valid
    described = repr(features) if sources == list(OWN_SOURCES) else repr((sources, features))
    if contour is not None:  # its offsets are those of this version of the original
        dtype, offsets = contour
        described += repr((dtype.str, len(offsets) - 1, int(offsets[-1])))
    digest = hashlib.blake2b(described.encode(), digest_size=8).hexdigest()
    return answers.skeleton(resource_id, LAYOUT_VERSION, digest)


def _build_skeleton(
    resource: RtdcResource, contour: tuple[np.dtype, np.ndarray] | None, *, deadline: float
) -> Skeleton:
    """Blocking: the outline (attributes, logs and tables of the source files) read and the
    skeleton built in an HDF5 worker process (`RtdcResource.with_outline`)."""
    return resource.with_outline(skeleton_of, resource.features, contour, deadline=deadline)


def skeleton_of(
    outline: Outline, features: dict[str, Feature], contour: tuple[np.dtype, np.ndarray] | None
) -> Skeleton:
    """The synthesized file's structure (`skeleton.build`; in an HDF5 worker)."""
    attrs = {name: _text(value) for name, value in outline.attrs.items()}
    groups = ["events"] + [
        name
        for name, arrays in (("logs", outline.logs), ("tables", outline.tables))
        if arrays is not None
    ]
    skeleton = build(attrs, specs(features, outline, contour), groups)
    if contour is not None:
        skeleton.extents = _joined(skeleton.extents, len(contour[1]) - 1)
    return skeleton


def rtdc_content(
    resource_id: str, resource: RtdcResource, remember: Callable[[str, Remake], Any]
) -> PartsContent:
    """The synthesized file; blocking the first time (its skeleton is built, then kept with
    `remember(key, make)`, e.g. `Resources.remembered`)."""
    found = _contour(resource, remember)
    contour = None if found is None else (found.dtype, found.offsets(remember))
    skeleton = Skeleton.from_json(
        remember(
            _skeleton_key(resource_id, resource, contour),
            lambda deadline: _build_skeleton(resource, contour, deadline=deadline).to_json(),
        )
    )
    resource.forget_outline()  # (read ahead for a build that was remembered instead)
    parts: list[tuple[int, FileContent]] = [(o, StaticContent(b)) for o, b in skeleton.runs]
    for name, feature in resource.features.items():
        extent = skeleton.extents.get("events/" + name)
        if extent is None:
            continue
        offset, length = extent
        if feature.row_bytes * feature.shape[0] != length:
            raise ProtocolError(f"skeleton does not fit feature {name} ({length} bytes)")
        parts.append((offset, stored_values(resource, feature)))
    if found is not None and contour is not None:
        parts += _contour_values(resource, found, contour[1], skeleton)
    return PartsContent(skeleton.size, parts)


def _contour(resource: RtdcResource, remember: Callable[[str, Remake], Any]) -> Contour | None:
    """The contour the file holds: none past `MAX_CONTOUR_EVENTS` (one dataset per event: the
    structure would take minutes to build and hundreds of MB), nor when its points cannot be
    sized (an event's dataset missing or of another shape): the rest of the file is served
    all the same, and `contour/` still offers the points, or says what is wrong."""
    found = contour_of(resource)
    if found is None:
        return None
    if found.events > MAX_CONTOUR_EVENTS:
        log.warning(
            "%s: contour of %d events not in the synthesized file (at most %d; see contour/)",
            found.source.remote.obj.key,
            found.events,
            MAX_CONTOUR_EVENTS,
        )
        return None
    try:
        found.offsets(remember)
    except ProtocolError as exc:
        log.warning("contour left out of the synthesized file: %s", exc)
        return None
    return found


def _contour_values(
    resource: RtdcResource, contour: Contour, offsets: np.ndarray, skeleton: Skeleton
) -> list[tuple[int, FileContent]]:
    derived = resource.derived
    points = ObjectContent(derived, register_points(derived, contour, offsets))
    return contour_parts(skeleton.extents, offsets, contour.point_bytes, points)
