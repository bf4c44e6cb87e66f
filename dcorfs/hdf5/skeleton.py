"""The structure of an HDF5 file whose large datasets are filled in later, built locally.

`build` lets libhdf5 write a complete file into a sparse scratch file in memory (the file,
its groups and small datasets through h5py; lazy datasets and attributes, by the dozen,
through `capi`, making the calls h5py makes, the same bytes): groups, attributes, small
datasets with their data, and contiguous, uncompressed datasets whose storage is allocated
but never written. What was written is the `Skeleton`: the file's size, the written byte
runs, and the byte extent of every lazy dataset. Any byte of the file is then either in a
run, in one lazy dataset's extent (C-order values of that dataset), or zero. HDF5 itself lays
the file out, so the result is valid by construction; the format is capped at HDF5 1.10
(`libver`) so older readers (h5dump of Debian's hdf5-tools) open it.

The scratch file is written by libhdf5's own POSIX driver (`sec2`, h5py's default), with
its aggregation of metadata and small data and its sieve buffer off (the bytes are those
h5py's file-object driver writes), in `/dev/shm` where files can be made there and it has
`SHM_FREE` bytes free (else in the system's temporary directory); it is unlinked as soon as
libhdf5 has it open, and its runs are read back through the file's holes
(`SEEK_DATA`/`SEEK_HOLE`), skipping the lazy extents and whole pages of zeros. Written
through a Python file object (h5py's `fileobj` driver) every one of libhdf5's ~120 writes of
a small resource's file went through Python: a build took 5.1 ms instead of 4.45
(doc/ARCHITECTURE.md, "Speed"). A scratch file whose process was killed between its making
and libhdf5's opening it is removed by the next process to build, once `STALE`.

Layout: all metadata and small data come first (lazy datasets are created with late
allocation and allocated only after every object exists), then the lazy datasets in the
order given. A hole of `GAP` bytes precedes the first dataset marked `gap_before`, so that
the kernel's read-ahead past the small datasets does not pull in image data. The build is
deterministic (no timestamps): the same input gives the same bytes, wherever the scratch
file lies (the bytes are libhdf5's; only which zeros a run holds may differ).
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import errno
import functools
import os
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import h5py
import numpy as np
from h5py._objects import phil

from . import capi, h5attrs

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


SHM = Path("/dev/shm")
SHM_FREE = 32 << 20  # bytes free in /dev/shm to build there (20,000 contours' build: ~7 MB)
STALE = 600.0  # seconds after which a scratch file left by a process killed mid-build goes
_PREFIX = "dcorfs-skeleton-"
_ZERO_PAGE = bytes(PAGE)


@functools.cache
def _usable(where: str) -> bool:
    """Whether files can be made in directory `where`; looked at once per process and
    directory, when the scratch files that killed processes left there are removed."""
    try:
        fd, name = tempfile.mkstemp(dir=where, prefix=_PREFIX)
    except OSError:
        return False
    os.close(fd)
    Path(name).unlink()
    _sweep(Path(where))
    return True


def _sweep(where: Path) -> None:
    """Remove scratch files older than `STALE` (named, between their making and libhdf5's
    opening them, when their process was killed)."""
    with contextlib.suppress(OSError):
        for path in where.glob(_PREFIX + "*"):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > STALE:
                    path.unlink()


def scratch_dir() -> str:
    """Where the next scratch file goes: `/dev/shm` (memory) where files can be made there
    and it has `SHM_FREE` bytes free now, else the system's temporary directory."""
    if _usable(str(SHM)):
        with contextlib.suppress(OSError):
            found = os.statvfs(SHM)
            if found.f_bavail * found.f_frsize >= SHM_FREE:
                return str(SHM)
    fallback = tempfile.gettempdir()
    _usable(fallback)  # (swept once, as /dev/shm is)
    return fallback


@contextlib.contextmanager
def _scratch() -> Iterator[tuple[str, int]]:
    """A new empty file: its name (for libhdf5 to open, then unlink) and a descriptor
    to read it back, closed (and the name removed, if still there) on leaving."""
    fd, name = tempfile.mkstemp(dir=scratch_dir(), prefix=_PREFIX)
    try:
        yield name, fd
    finally:
        os.close(fd)
        Path(name).unlink(missing_ok=True)


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


def _created(scratch: str) -> h5py.h5f.FileID:
    """The file `scratch` made anew, as h5py's `File(scratch, "w", libver=LIBVER,
    locking=False)` makes it (its file creation and access properties), but with libhdf5's
    aggregation of metadata and of small raw data off and no sieve buffer: its POSIX driver
    has them (h5py's file-object driver has not), and they would place pieces of metadata
    after the lazy datasets' storage, and write 64 KiB of zeros from the first element of
    each lazy dataset."""
    low, high = (getattr(h5py.h5f, "LIBVER_" + bound.upper()) for bound in LIBVER)
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    fapl.set_libver_bounds(low, high)
    fapl.set_file_locking(False, True)
    fapl.set_meta_block_size(0)
    fapl.set_sieve_buf_size(0)
    capi.no_small_data_blocks(fapl.id)
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_obj_track_times(False)
    return h5py.h5f.create(scratch.encode(), h5py.h5f.ACC_TRUNC, fapl=fapl, fcpl=fcpl)


def _write(
    scratch: str, attrs: dict[str, Any], specs: list[Spec], groups: list[str]
) -> dict[str, tuple[int, int]]:
    """Write the file `scratch` (made empty; unlinked once libhdf5 has it open); returns the
    extent (offset, length) of each allocated lazy dataset. Each step holds h5py's lock
    (`capi`); `build` may hold it throughout."""
    with h5py.File(_created(scratch)) as out:
        Path(scratch).unlink()  # libhdf5 holds it open: nothing is left if this process dies
        with phil:
            h5attrs.write(out, attrs)
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
                    h5attrs.write(where.create_dataset(name, data=spec.data), spec.attrs)
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
    # h5py's lock taken once, not per call; but not for a build of many datasets (a
    # contour's, one per event: 7 s for 20,000), which would keep every other h5py read of
    # the mount waiting that long (per call: measured no slower)
    lock = phil if len(specs) <= MANY else contextlib.nullcontext()
    with _scratch() as (name, fd):
        with lock:
            extents = _write(name, attrs, specs, groups or [])
        size = os.fstat(fd).st_size
        runs = _runs(fd, size, sorted(extents.values()))
    return Skeleton(size, runs, extents)


def _data(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (start, stop) of each stretch of a file that is not a hole, within `size`."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from here on
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) and pos == 0:
                yield 0, size  # a filesystem that cannot tell: all of it
                return
            raise
        pos = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start < pos:
            yield start, pos


def _runs(fd: int, size: int, extents: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    """The written bytes of the file, in runs, minus the lazy extents, whole pages of zeros
    (a filesystem without holes has the gap's) and each run's trailing zeros (bytes in no
    run read as zeros)."""
    starts = [offset for offset, _ in extents]
    out: list[tuple[int, bytes]] = []
    for start, stop in _data(fd, size):
        pos = start
        while pos < stop:
            i = bisect.bisect_right(starts, pos) - 1  # the last extent starting at or before pos
            if i >= 0 and pos < extents[i][0] + extents[i][1]:
                pos = extents[i][0] + extents[i][1]
                continue
            end = min(stop, extents[i + 1][0]) if i + 1 < len(extents) else stop
            out.extend(_nonzero(pos, os.pread(fd, end - pos, pos)))
            pos = end
    return out


def _nonzero(offset: int, data: bytes) -> Iterator[tuple[int, bytes]]:
    """`data` (at `offset` in the file) cut where whole pages of zeros are, each piece
    without its trailing zeros."""
    begin = 0
    for page in range(-offset % PAGE, len(data), PAGE):
        if data[page : page + PAGE] == _ZERO_PAGE:
            piece = data[begin:page].rstrip(b"\0")
            if piece:
                yield offset + begin, piece
            begin = page + PAGE
    piece = data[begin:].rstrip(b"\0")
    if piece:
        yield offset + begin, piece
