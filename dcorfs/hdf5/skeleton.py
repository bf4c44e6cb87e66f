"""The structure of an HDF5 file whose large datasets are filled in later, built locally.

`build` lets libhdf5 write a complete file into a sparse in-memory buffer (the file, its
groups and small datasets through h5py; lazy datasets and attributes, by the dozen, through
`capi`, making the calls h5py makes, the same bytes):
groups, attributes, small datasets with their data, and contiguous, uncompressed datasets
whose storage is allocated but never written. What was written is the `Skeleton`: the file's
size, the written byte runs, and the byte extent of every lazy dataset. Any byte of the file
is then either in a run, in one lazy dataset's extent (C-order values of that dataset), or
zero. HDF5 itself lays the file out, so the result is valid by construction; the format is
capped at HDF5 1.10 (`libver`) so older readers (h5dump of Debian's hdf5-tools) open it.

Layout: all metadata and small data come first (lazy datasets are created with late
allocation and allocated only after every object exists), then the lazy datasets in the
order given. A hole of `GAP` bytes precedes the first dataset marked `gap_before`, so that
the kernel's read-ahead past the small datasets does not pull in image data. The build is
deterministic (no timestamps): the same input gives the same bytes.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import h5py
import numpy as np
from h5py._objects import phil

from . import capi, h5attrs
from .fileobj import SeekableFile

PAGE = 4096
GAP = 1 << 20
LIBVER = ("earliest", "v110")
_GAP_NAME = "dcorfs-gap"
MANY = 1000  # datasets: a build of more does not hold h5py's lock throughout


@dataclass
class Spec:
    """One dataset to create: `data` given (written now) or None (lazy: filled in later)."""

    path: str  # e.g. "events/deform"
    dtype: np.dtype
    shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    data: np.ndarray | None = None
    gap_before: bool = False


@dataclass
class Skeleton:
    size: int
    runs: list[tuple[int, bytes]]  # written bytes, sorted, outside every extent
    extents: dict[str, tuple[int, int]]  # lazy dataset path → (offset, length)

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "runs": [[o, base64.b64encode(zlib.compress(b)).decode()] for o, b in self.runs],
            "extents": {path: list(ext) for path, ext in self.extents.items()},
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Skeleton:
        return cls(
            size=int(value["size"]),
            runs=[(int(o), zlib.decompress(base64.b64decode(b))) for o, b in value["runs"]],
            extents={p: (int(e[0]), int(e[1])) for p, e in value["extents"].items()},
        )


class _SparseBuffer(SeekableFile):
    """A file object that keeps only the pages written to it (the rest reads as zeros)."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: dict[int, bytearray] = {}
        self.size = 0

    def end(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def truncate(self, size: int | None = None) -> int:
        self.size = self._pos if size is None else size
        for index in [i for i in self.pages if i * PAGE >= self.size]:
            del self.pages[index]
        return self.size

    def _spans(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(page index, begin, end) within each page covering [start, stop)."""
        while start < stop:
            index, begin = divmod(start, PAGE)
            end = min(PAGE, begin + stop - start)
            yield index, begin, end
            start += end - begin

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        for index, begin, end in self._spans(self._pos, self._pos + len(view)):
            page = self.pages.setdefault(index, bytearray(PAGE))
            page[begin:end] = view[done : done + end - begin]
            done += end - begin
        self._pos += done
        self.size = max(self.size, self._pos)
        return done

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        stop = min(self._pos + len(view), self.size)
        done = 0
        for index, begin, end in self._spans(self._pos, stop):
            page = self.pages.get(index)
            view[done : done + end - begin] = page[begin:end] if page else bytes(end - begin)
            done += end - begin
        self._pos += done
        return done

    def flush(self) -> None:
        pass


_DCPL: dict[bool, h5py.h5p.PropDCID] = {}  # the properties of lazy datasets, made once


def _lazy_dcpl(scalar: bool) -> h5py.h5p.PropDCID:
    """Contiguous storage, allocated on first write, never filled with a fill value, no
    times: as h5py's `create_dataset` sets them, which for a scalar dataset (shape ()) keeps
    the defaults but the times."""
    if scalar not in _DCPL:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        if not scalar:
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_LATE)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dcpl.set_obj_track_times(False)
        _DCPL[scalar] = dcpl
    return _DCPL[scalar]


class _Lazy:
    """A lazy dataset made through `capi` (its storage allocated by `allocate`), known by
    its identifier `id` (closed by `close`, or by h5py when the file is closed). Made and
    used with h5py's lock held."""

    def __init__(self, parent: h5py.Group, name: str, dtype: np.dtype, shape: tuple[int, ...]):
        self.dtype, self.shape, self.name = dtype, shape, name.encode()
        self._parent = parent
        file_type = h5attrs.types(dtype)[0]
        dcpl = _lazy_dcpl(scalar=not shape).id
        self.id = capi.create_dataset(parent.id.id, self.name, file_type.id, shape, dcpl)

    def dataset(self) -> h5py.Dataset:
        """The dataset as h5py's object (an identifier of its own)."""
        return cast(h5py.Dataset, self._parent[self.name.decode("utf-8", "surrogateescape")])

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        for name, value in attrs.items():
            h5attrs.write_to(self.id, name, value, self.dataset)

    def allocate(self) -> None:
        """Make HDF5 allocate the storage now, by writing the first element: a zero (as
        `dataset[0, …] = 0` would; a scalar dataset's one element)."""
        if all(self.shape):
            zero = np.zeros((1,) * len(self.shape), self.dtype)
            memory_type = h5attrs.types(self.dtype)[1].id
            capi.write_first(
                self.id, len(self.shape), memory_type, zero.ctypes.data, name=self.name
            )

    def extent(self) -> tuple[int, int] | None:
        return capi.extent(self.id, name=self.name)

    def close(self) -> None:
        capi.close_dataset(self.id)


def _set_attrs(obj: Any, attrs: dict[str, Any]) -> None:
    for name, value in attrs.items():
        h5attrs.write(obj, name, value)


def _write(
    buffer: _SparseBuffer, attrs: dict[str, Any], specs: list[Spec], groups: list[str]
) -> dict[str, tuple[int, int]]:
    """Write the file; returns the extent (offset, length) of each allocated lazy dataset.
    Each step holds h5py's lock (`capi`); `build` may hold it throughout."""
    with h5py.File(buffer, "w", libver=LIBVER, locking=False) as out:
        with phil:
            _set_attrs(out, attrs)
        made_groups: dict[str, h5py.Group] = {"": out}

        def group(path: str) -> h5py.Group:
            if path not in made_groups:
                made_groups[path] = out.require_group(path)
            return made_groups[path]

        for path in groups:
            group(path)
        lazy: list[tuple[Spec, _Lazy]] = []
        for spec in specs:
            parent, _, name = spec.path.rpartition("/")
            with phil:
                where = group(parent)
                if spec.data is not None:
                    _set_attrs(where.create_dataset(name, data=spec.data), spec.attrs)
                else:
                    created = _Lazy(where, name, spec.dtype, spec.shape)
                    lazy.append((spec, created))
                    created.set_attrs(spec.attrs)
        with phil:
            gap = _Lazy(out, _GAP_NAME, np.dtype("u1"), (GAP,))
        gap_made = False
        extents = {}
        for spec, created in lazy:
            with phil:  # per dataset (`build` may hold it throughout)
                if spec.gap_before and not gap_made:
                    gap.allocate()
                    gap_made = True
                created.allocate()  # its storage's place is then fixed
                found = created.extent()
                created.close()
            if found is not None:
                extents[spec.path] = found
        with phil:
            gap.close()
        del out[_GAP_NAME]  # its storage stays a hole; no object refers to it
    return extents


def build(attrs: dict[str, Any], specs: list[Spec], groups: list[str] | None = None) -> Skeleton:
    """The skeleton of a file with root attributes `attrs`, the datasets `specs` and
    `groups` (made even when empty)."""
    buffer = _SparseBuffer()
    # all in memory: h5py's lock taken once, not per call; but not for a build of many
    # datasets (a contour's, one per event: 7 s for 20,000), which would keep every other
    # h5py read of the mount waiting that long (per call: measured no slower)
    lock = phil if len(specs) <= MANY else contextlib.nullcontext()
    with lock:
        extents = _write(buffer, attrs, specs, groups or [])
    return Skeleton(buffer.size, _runs(buffer, sorted(extents.values())), extents)


def _runs(buffer: _SparseBuffer, extents: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    """The written pages merged into runs, minus the lazy extents, anything past the end and
    trailing zeros (bytes in no run read as zeros)."""
    runs: list[tuple[int, bytearray]] = []
    for index in sorted(buffer.pages):
        start = index * PAGE
        if runs and runs[-1][0] + len(runs[-1][1]) == start:
            runs[-1][1].extend(buffer.pages[index])
        else:
            runs.append((start, bytearray(buffer.pages[index])))
    starts = [offset for offset, _ in extents]
    out: list[tuple[int, bytes]] = []
    for base, data in runs:
        pos, stop = base, min(base + len(data), buffer.size)
        while pos < stop:
            i = bisect.bisect_right(starts, pos) - 1  # the last extent starting at or before pos
            if i >= 0 and pos < extents[i][0] + extents[i][1]:
                pos = extents[i][0] + extents[i][1]
                continue
            end = min(stop, extents[i + 1][0]) if i + 1 < len(extents) else stop
            piece = bytes(data[pos - base : end - base]).rstrip(b"\0")  # zeros need no storing
            if piece:
                out.append((pos, piece))
            pos = end
    return out
