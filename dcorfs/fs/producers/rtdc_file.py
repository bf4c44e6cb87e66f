"""The synthesized `.rtdc` of a resource (README, "Formats"): one self-contained HDF5 file,
read lazily.

The file holds the original's root attributes (metadata; byte strings decoded to text), its
logs and tables, and under `/events` every feature the resource directory shows (scalar
features of the condensed file included), each with the attributes of the dataset it comes
from, plus `/events/trace/<name>`. `contour` and basins are left out (dclab derives contours
from `mask`; every feature is in the file itself). Event data are contiguous and uncompressed:
the HDF5 structure (`skeleton.build`) is made once per resource, without any event data, and
every byte range of a feature's extent is served by the same lazy reads (and cached decoded
values) as its `.npy` file.
`mask` is stored as uint8 0/255, as RT-DC writers store it.

Datasets are ordered scalars, traces, image-like; a hole separates scalars from the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ...cache import answers
from ...errors import ProtocolError
from ...hdf5.rtdc import OWN_SOURCES, Outline, RtdcResource
from ...hdf5.skeleton import Skeleton, Spec, build
from ...hdf5.structure import TRACE_PREFIX, Feature
from ..content import FileContent, PartsContent, StaticContent
from .npy import feature_values

Remake = Callable[[float], Any]  # make(deadline) -> a JSON value
LAYOUT_VERSION = 1  # part of the cache key of skeletons: bump when the layout changes


def _stored_dtype(feature: Feature) -> np.dtype:
    return np.dtype(np.uint8) if feature.name == "mask" else feature.dtype


class StoredMask:
    """A mask's values as the file stores them: bool bytes (0/1) as uint8 0/255, same size."""

    def __init__(self, values: FileContent) -> None:
        self._values = values
        self.size = values.size

    @staticmethod
    def _stored(data: bytes) -> bytes:
        stored: np.ndarray = np.frombuffer(data, np.uint8) * np.uint8(255)
        return stored.tobytes()

    def read(self, offset: int, length: int, *, deadline: float) -> bytes:
        return self._stored(self._values.read(offset, length, deadline=deadline))

    def peek(self, offset: int, length: int) -> bytes | None:
        data = self._values.peek(offset, length)
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


def specs(resource: RtdcResource, outline: Outline) -> list[Spec]:
    """The datasets of the synthesized file: logs, tables, then the lazy event data."""
    made = [
        Spec(f"{group}/{n}", a.data.dtype, a.data.shape, a.attrs, a.data)
        for group, arrays in (("logs", outline.logs), ("tables", outline.tables))
        for n, a in (arrays or {}).items()
    ]
    features = sorted(resource.features.values(), key=_order)
    first_large = next((f.name for f in features if not f.scalar), None)
    made += [
        Spec(
            "events/" + f.name,
            _stored_dtype(f),
            f.shape,
            outline.feature_attrs.get(f.name, {}),
            gap_before=f.name == first_large,
        )
        for f in features
    ]
    return made


def _skeleton_key(resource_id: str, resource: RtdcResource) -> str:
    """The key a skeleton is remembered under: it changes with the features (for instance
    when DCOR's condensed file appears after a first mount), with the own files the outline
    (root attributes, logs, tables) is read from (the original, once the store no longer
    refuses it: doc/DCOR.md §2) and with the layout version."""
    sources = [kind for kind in OWN_SOURCES if resource.source(kind) is not None]
    features = [(f.name, f.dtype.str, f.shape, f.source) for f in resource.features.values()]
    # both files (the usual case): the key of earlier versions, whose skeletons stay valid
    described = repr(features) if sources == list(OWN_SOURCES) else repr((sources, features))
    digest = hashlib.blake2b(described.encode(), digest_size=8).hexdigest()
    return answers.skeleton(resource_id, LAYOUT_VERSION, digest)


def _build_skeleton(resource: RtdcResource, *, deadline: float) -> Skeleton:
    """Blocking (reads attributes, logs and tables of the source files)."""
    outline = resource.outline(deadline=deadline)
    attrs = {name: _text(value) for name, value in outline.attrs.items()}
    groups = ["events"] + [
        name
        for name, arrays in (("logs", outline.logs), ("tables", outline.tables))
        if arrays is not None
    ]
    return build(attrs, specs(resource, outline), groups)


def rtdc_content(
    resource_id: str, resource: RtdcResource, remember: Callable[[str, Remake], Any]
) -> PartsContent:
    """The synthesized file; blocking the first time (its skeleton is built, then kept with
    `remember(key, make)`, e.g. `Resources.remembered`)."""
    skeleton = Skeleton.from_json(
        remember(
            _skeleton_key(resource_id, resource),
            lambda deadline: _build_skeleton(resource, deadline=deadline).to_json(),
        )
    )
    parts: list[tuple[int, FileContent]] = [(o, StaticContent(b)) for o, b in skeleton.runs]
    for name, feature in resource.features.items():
        extent = skeleton.extents.get("events/" + name)
        if extent is None:
            continue
        offset, length = extent
        if feature.row_bytes * feature.shape[0] != length:
            raise ProtocolError(f"skeleton does not fit feature {name} ({length} bytes)")
        parts.append((offset, stored_values(resource, feature)))
    return PartsContent(skeleton.size, parts)
