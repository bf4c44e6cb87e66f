"""What an .rtdc file holds besides event data: features, attributes, logs and tables.

The features (dtype and shape of every dataset under `/events` and `/events/trace`, and of
the contour group `/events/contour`: its number of events and its points' dtype), the
attributes of the root and of each feature, and the datasets of `/logs` and `/tables` read
whole: all that listing a resource and building its synthesized file need. Datasets'
types, shapes and chunks and attributes are read through libhdf5 directly (`capi`,
`h5attrs`: no h5py objects), the rest, and what those calls give up on, with h5py's
low-level API; a small file can be read from an in-memory copy (`file_image`: HDF5's core
driver) instead of through a Python file object.

Errors: a file without `/events` is not an .rtdc file (`ProtocolError`); an attribute, log or
table that cannot be read is left out with a warning; failing to list the features or the
attributes of an object fails the call (h5py's error, or a `ProtocolError` naming the
object). Failures of our own file object (network) come out as they are.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import h5py
import hdf5plugin  # noqa: F401  (logs and tables may be Zstd-compressed)
import numpy as np
from h5py._objects import phil

from ..errors import DcorfsError, ProtocolError
from . import capi, h5attrs

log = logging.getLogger(__name__)

TRACE_PREFIX = "trace/"
EVENT_COUNT = b"experiment:event count"
CONTOUR = "contour"  # a group of one (n_i, 2) dataset of points per event, named "0", "1" …
H5PY_ERRORS = (OSError, ValueError, KeyError, TypeError)  # what h5py raises for a bad file
GROUPS = ("logs", "tables")  # groups of small datasets an .rtdc file may have
BASINS = "basins"  # the group of a file's basins (each a dataset of JSON text lines)
_images = itertools.count()


@dataclass(frozen=True)
class Feature:
    """One feature as the mount shows it: `deform`, `image`, `trace/fl1_raw` …"""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # (N,) or (N, ...)
    source: str  # "resource" or "condensed"
    chunk_rows: int = 0  # events per HDF5 chunk where they are stored (0: not chunked, or
    # not looked at: a scalar feature's values are made whole or in large slices)

    @property
    def scalar(self) -> bool:
        return len(self.shape) == 1

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape[1:])


@dataclass
class Array:
    """A small dataset read whole (a log, a table) with its attributes."""

    data: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)


def h5py_failure(exc: BaseException, message: str) -> DcorfsError:
    """What an error of h5py means: our file object's own (network) error that h5py reports
    as an OSError, or a ProtocolError with `message`."""
    if isinstance(exc.__context__, DcorfsError):
        return exc.__context__
    return ProtocolError(f"{message}: {exc}")


def file_image(data: bytes) -> h5py.h5f.FileID:
    """An HDF5 file opened read-only from its bytes in memory (closed by the caller)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fapl_core(backing_store=False)
    fapl.set_file_image(data)
    # HDF5 takes files of the same name for the same file: each image has a name of its own
    name = f"dcorfs-image-{next(_images)}".encode()
    return h5py.h5f.open(name, h5py.h5f.ACC_RDONLY, fapl=fapl)


def read_features(fid: h5py.h5f.FileID, *, kind: str, where: str) -> dict[str, Feature]:
    """The features of an opened file; `kind` ("resource", "condensed") is their source,
    `where` names the file in messages."""
    try:
        events = h5py.h5o.open(fid, b"events")
    except KeyError:
        events = None
    if not isinstance(events, h5py.h5g.GroupID):
        raise ProtocolError(f"{where} has no /events group (not an .rtdc file)")
    found: dict[str, Feature] = {}
    for name, item in _members(events, where, plain=_plain_feature):
        if name == CONTOUR:  # dclab reads a contour group only
            contour = _contour(item, kind, _stated_events(fid)) if _is_group(item) else None
            if contour is not None:
                found[CONTOUR] = contour
            continue
        data = _as_plain(item)
        if data is not None and data.shape:
            found[name] = _feature_of(name, data, kind)
        elif name == "trace" and _is_group(item):
            for trace, member in _members(item, where, plain=_plain_feature):
                data = _as_plain(member)
                if data is not None and len(data.shape) == 2:
                    found[TRACE_PREFIX + trace] = _feature_of(TRACE_PREFIX + trace, data, kind)
    return found


def _is_group(item: Any) -> bool:
    return isinstance(item, h5py.h5g.GroupID)


def _stated_events(fid: h5py.h5f.FileID) -> int:
    """The file's `experiment:event count` attribute, or 0."""
    try:
        root = h5py.h5o.open(fid, b"/")
        if not h5py.h5a.exists(root, EVENT_COUNT):
            return 0
        return max(0, int(h5attrs.read(root, EVENT_COUNT)))
    except (*H5PY_ERRORS, OverflowError):
        return 0


def _contour(group: h5py.h5g.GroupID, kind: str, stated: int) -> Feature | None:
    """The contour group as a feature of shape (N, 2), each event's points of two coordinates
    in the dtype of the first one's (their numbers of points are read only when asked for,
    see `hdf5.contour`); None when it has no dataset "0" of points. N is the stated event
    count, as dclab takes it (`H5ContourEvent`): counting the group's members would read its
    whole index, scattered through the file, one node after another, on every opening."""
    try:
        first = h5py.h5o.open(group, b"0")
        events = stated or group.get_num_objs()
    except KeyError:
        return None
    if not isinstance(first, h5py.h5d.DatasetID) or first.rank != 2 or first.shape[1] != 2:
        return None
    dtype = first.dtype.newbyteorder("<")
    return Feature(name=CONTOUR, dtype=dtype, shape=(events, 2), source=kind)


class _Plain(NamedTuple):
    """A dataset as `_plain_feature` reads it."""

    dtype: np.dtype
    shape: tuple[int, ...]
    chunk_rows: int


def _plain_feature(group: h5py.h5g.GroupID, name: bytes) -> _Plain | None:
    """Member `name` of `group` read through `capi` (no h5py objects) when it is a dataset,
    but the contour group's and the traces' names; else None."""
    if name in (CONTOUR.encode(), b"trace"):
        return None
    with phil:
        found = capi.dataset(group.id, name)
    if found is None:
        return None
    encoded, shape, chunk_rows = found
    return _Plain(h5attrs.dtype_of(encoded), shape, chunk_rows)


def _as_plain(item: Any) -> _Plain | None:
    """A member of a group as `_members` gives it, if it is a dataset of rank 1 or more, as
    `_plain_feature` reads it (through h5py, if `capi` gave up on it); else None."""
    if isinstance(item, _Plain):
        return item
    if not isinstance(item, h5py.h5d.DatasetID) or item.rank < 1:
        return None
    return _Plain(item.dtype, tuple(item.shape), _chunk_rows(item) if item.rank > 1 else 0)


def _feature_of(name: str, data: _Plain, kind: str) -> Feature:
    dtype = np.dtype(bool) if name == "mask" else data.dtype.newbyteorder("<")
    return Feature(
        name=name, dtype=dtype, shape=data.shape, source=kind, chunk_rows=data.chunk_rows
    )


def _chunk_rows(data: h5py.h5d.DatasetID) -> int:
    """Events per chunk of a dataset stored in chunks, else 0."""
    plist = data.get_create_plist()
    return int(plist.get_chunk()[0]) if plist.get_layout() == h5py.h5d.CHUNKED else 0


def _members(
    group: h5py.h5g.GroupID,
    where: str,
    *,
    plain: Callable[[h5py.h5g.GroupID, bytes], Any] | None = None,
) -> list[tuple[str, Any]]:
    """(name, opened object, or None where it cannot be opened: a broken link), in h5py's
    order (by name, or by creation order where the file tracks it); `plain`: what it gives
    for a member instead of opening it, unless None."""
    found = []
    for name in list(group):
        text = name.decode("utf-8", "surrogateescape")
        read = None if plain is None else plain(group, name)
        if read is not None:
            found.append((text, read))
            continue
        try:
            found.append((text, h5py.h5o.open(group, name)))
        except H5PY_ERRORS as exc:
            if isinstance(h5py_failure(exc, where), ProtocolError):
                found.append((text, None))
            else:
                raise
    return found


def member_names(fid: h5py.h5f.FileID, group: str) -> list[str]:
    """The names of a group's members ([] when the file has no such group)."""
    try:
        members = h5py.h5o.open(fid, group.encode())
    except KeyError:
        return []
    if not isinstance(members, h5py.h5g.GroupID):
        return []
    return [name.decode("utf-8", "surrogateescape") for name in members]


def read_attributes(
    fid: h5py.h5f.FileID, path: str, *, where: str, only: Collection[str] | None = None
) -> dict[str, Any]:
    """The attributes of the object at `path` ("/", "events/deform" …) that h5py can read
    (`only`: of these names). The object is opened and its attributes listed through `capi`
    (h5py's object for it made only for a value read through h5py), else through h5py."""
    encoded = path.encode("utf-8", "surrogateescape")
    with h5attrs.listed(fid, encoded) as listed:
        if listed is not None:
            names, read = listed
            return _attributes(read, _only(names, only), path, where)
    try:
        oid = h5py.h5o.open(fid, encoded)
        names = h5attrs.names(oid)
    except H5PY_ERRORS as exc:
        raise h5py_failure(exc, f"{where}: cannot read attributes of {path}") from None
    return _attributes(functools.partial(h5attrs.read, oid), _only(names, only), path, where)


def _only(names: list[bytes], only: Collection[str] | None) -> list[bytes]:
    if only is None:
        return names
    wanted = {name.encode("utf-8", "surrogateescape") for name in only}
    return [name for name in names if name in wanted]


def _attributes(
    read: Callable[[bytes], Any], names: list[bytes], path: str, where: str
) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in names:
        text = name.decode("utf-8", "surrogateescape")
        try:
            found[text] = read(name)
        except (*H5PY_ERRORS, ProtocolError) as exc:  # (ours: from a `capi` call's read)
            _left_out(h5py_failure(exc, f"{where}: cannot read attribute {text!r} of {path}"))
    return found


def read_arrays(fid: h5py.h5f.FileID, group: str, *, where: str) -> dict[str, Array] | None:
    """The datasets of a group (`logs`, `tables`) read whole, with their attributes; None
    when the file has no such group."""
    try:
        members = h5py.h5o.open(fid, group.encode())
    except KeyError:
        return None
    if not isinstance(members, h5py.h5g.GroupID):
        return None
    found: dict[str, Array] = {}
    for name, item in _members(members, where):
        path = f"{group}/{name}"
        try:
            if item is None:
                raise KeyError("cannot open it")
            if not isinstance(item, h5py.h5d.DatasetID):
                continue
            data = np.asarray(h5attrs.dataset_value(item))
            names = h5attrs.names(item)
        except (*H5PY_ERRORS, ProtocolError) as exc:  # (ours: from a `capi` call's read)
            _left_out(h5py_failure(exc, f"{where}: cannot read {path}"), note=" (left out)")
            continue
        found[name] = Array(
            data, _attributes(functools.partial(h5attrs.read, item), names, path, where)
        )
    return found


def _left_out(failure: DcorfsError, *, note: str = "") -> None:
    """Warn about what cannot be read; a failure of our own (network) is raised."""
    if not isinstance(failure, ProtocolError):
        raise failure
    log.warning("%s%s", failure, note)
