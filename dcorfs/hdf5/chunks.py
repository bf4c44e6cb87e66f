"""Decoding HDF5 chunks without h5py: event data decoded off h5py's one lock.

h5py serialises every HDF5 call behind one global lock (`phil`), so decoding event data
through it runs on one core, whatever the number of readers. The chunks of a feature are
plain byte ranges of the file, each the output of the dataset's filter pipeline; this module
runs that pipeline backwards itself, with the codecs' own libraries, which release the GIL
(`zlib`, `zstandard`) — so reads of event data decode side by side on every core.

`Codec.of(dataset)` reads a dataset's pipeline once (with h5py, under its lock); it is None
when any filter, the datatype or the chunk shape is one this module does not decode (then
the reader keeps h5py's path for that dataset). Filters decoded (doc/ARCHITECTURE.md, "One
read"):

- 1, deflate (gzip): `zlib`
- 2, shuffle: the bytes of each element were grouped by position; regrouped with numpy
- 3, fletcher32: HDF5's checksum of the filtered bytes, verified (`ChunkError` on a mismatch,
  also the byte-swapped form HDF5 before 1.6.3 wrote, as libhdf5 accepts it) and stripped;
  computed by libhdf5's own function where the library h5py uses exports it (~5× faster
  than NumPy's, and the GIL given up), else with NumPy
- 32015, Zstd (hdf5plugin's, in modern .rtdc files): `zstandard`

A chunk's filter mask (one bit per filter skipped when it was written) is honoured. Edge
chunks are stored whole and cropped by the caller (`rows`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import zstandard

from . import capi

log = logging.getLogger(__name__)
DEFLATE, SHUFFLE, FLETCHER32, ZSTD = 1, 2, 3, 32015
DECODED = {DEFLATE, SHUFFLE, FLETCHER32, ZSTD}


class ChunkError(ValueError):
    """A chunk that does not decode (corrupt bytes, a checksum mismatch)."""


class DatasetLike(Protocol):
    """What is asked of a dataset here: an h5py `Dataset`, or a lighter stand-in made from
    its low-level identifier (`rtdc.layouts_of`)."""

    @property
    def id(self) -> Any: ...  # h5py.h5d.DatasetID
    @property
    def dtype(self) -> np.dtype[Any]: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def chunks(self) -> tuple[int, ...] | None: ...


@dataclass(frozen=True)
class Codec:
    """How to turn a stored chunk of one dataset back into its values."""

    filters: tuple[tuple[int, tuple[int, ...]], ...]  # (filter id, its values), as written
    dtype: np.dtype  # of the stored elements
    chunk: tuple[int, ...]  # the chunk's shape

    @property
    def nbytes(self) -> int:
        """Bytes of one decoded chunk."""
        return int(np.prod(self.chunk, dtype=np.int64)) * self.dtype.itemsize

    @classmethod
    def of(cls, dataset: DatasetLike) -> Codec | None:
        """The dataset's codec, or None when this module does not decode it (h5py does):
        not chunked, chunked across the values of one event, a datatype that is not a plain
        number, or a filter other than those above."""
        chunks = dataset.chunks
        dtype = dataset.dtype
        if chunks is None or tuple(chunks[1:]) != tuple(dataset.shape[1:]):
            return None
        if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
            return None
        plist = dataset.id.get_create_plist()
        filters = []
        for index in range(plist.get_nfilters()):
            ident, _flags, values, _name = plist.get_filter(index)
            if ident not in DECODED:
                return None
            filters.append((int(ident), tuple(int(v) for v in values)))
        return cls(tuple(filters), np.dtype(dtype), tuple(int(c) for c in chunks))

    def decode(self, raw: bytes | memoryview, mask: int = 0) -> np.ndarray:
        """The values of one stored chunk (its whole shape; `mask`: the chunk's filter
        mask). Releases the GIL in the codecs; raises `ChunkError` on bytes that do not
        decode."""
        data: bytes | memoryview | np.ndarray = raw
        for index in range(len(self.filters) - 1, -1, -1):
            if mask & (1 << index):
                continue  # skipped when this chunk was written
            ident, values = self.filters[index]
            data = _undo(ident, values, data, self.nbytes, self.dtype.itemsize)
        array = np.frombuffer(data, dtype=np.uint8)
        if array.size != self.nbytes:
            raise ChunkError(f"a chunk decoded to {array.size} bytes, not {self.nbytes}")
        return array.view(self.dtype).reshape(self.chunk)


def _undo(
    ident: int,
    values: tuple[int, ...],
    data: bytes | memoryview | np.ndarray,
    nbytes: int,
    itemsize: int,
) -> bytes | memoryview | np.ndarray:
    """Undo one filter."""
    buffer = data.data if isinstance(data, np.ndarray) else data  # its memoryview
    try:
        if ident == ZSTD:
            return zstandard.ZstdDecompressor().decompress(buffer, max_output_size=nbytes)
        if ident == DEFLATE:
            return zlib.decompress(buffer)
    except (zstandard.ZstdError, zlib.error) as exc:
        raise ChunkError(f"a chunk does not decompress: {exc}") from None
    if ident == SHUFFLE:
        return unshuffle(data, values[0] if values else itemsize)
    if ident == FLETCHER32:
        return fletcher32_checked(data)
    raise ChunkError(f"filter {ident} is not decoded here")  # `Codec.of` let it through


def unshuffle(data: bytes | memoryview | np.ndarray, size: int) -> np.ndarray:
    """Undo HDF5's shuffle filter for elements of `size` bytes (trailing bytes that make no
    whole element were left in place)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    count = raw.size // size
    if size <= 1 or count <= 1:
        return raw
    out = np.empty_like(raw)
    whole = count * size
    out[:whole].reshape(count, size)[:] = raw[:whole].reshape(size, count).T
    out[whole:] = raw[whole:]
    return out


def fletcher32(data: bytes | memoryview | np.ndarray) -> int:
    """HDF5's Fletcher-32 of the bytes: libhdf5's own where it is exported (`_native`; here
    0.29 ms for a chunk of 1.04 MB in one thread, the GIL given up), else `fletcher32_numpy`
    (1.46 ms)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    native = _native()
    if native is None or not raw.size:
        return fletcher32_numpy(raw)
    return int(native(raw.ctypes.data, raw.size))


def fletcher32_numpy(data: bytes | memoryview | np.ndarray) -> int:
    """HDF5's Fletcher-32 (H5checksum.c: 16-bit big-endian words, sums reduced with an
    end-around carry, an odd last byte taken as the high byte of a word), with NumPy.

    Word i of n counts once in the first sum and n - i times in the second; both are formed
    exactly (blocks of `_BLOCK` words weighted by a matrix-vector product in float64, whose
    partial sums stay below 2**53) and reduced modulo 0xffff at the end."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size % 2:
        raw = np.concatenate([raw, np.zeros(1, np.uint8)])
    words = raw.view(">u2")
    n = words.size
    blocks = n // _BLOCK
    head = words[: blocks * _BLOCK].reshape(blocks, _BLOCK).astype(np.float64)
    tail = words[blocks * _BLOCK :].astype(np.int64)
    block_sums = head.sum(axis=1).astype(np.int64)  # each below 2**27
    within = (head @ _WEIGHTS).astype(np.int64)  # each below 2**37
    after = n - _BLOCK * np.arange(1, blocks + 1, dtype=np.int64)  # words after each block
    first = int(block_sums.sum()) + int(tail.sum())
    second = (
        int(np.dot(block_sums, after))
        + int(within.sum())
        + int(np.dot(tail, np.arange(tail.size, 0, -1, dtype=np.int64)))
    )
    if first == 0:  # all words 0 (then both sums are)
        return 0
    # the end-around carry never reduces a non-zero sum to 0 (it gives 0xffff instead)
    return ((second % 0xFFFF or 0xFFFF) << 16) | (first % 0xFFFF or 0xFFFF)


_BLOCK = 1024
_WEIGHTS = np.arange(_BLOCK, 0, -1, dtype=np.float64)  # word j of a block: _BLOCK - j more
# probes of libhdf5's function: odd and even lengths past its inner block of 360 words, sums
# that are multiples of 0xffff (the end-around carry: 0xffff, not 0)
_PROBES = (
    bytes(range(256)) * 3 + b"\xff" * 7,
    bytes(range(256)) * 3 + b"\xff" * 6,
    b"\xff\xff",
    b"\xff" * 6,
)


@functools.cache
def _native() -> Callable[[int, int], int] | None:
    """libhdf5's `H5_checksum_fletcher32(data, len)` from the library h5py uses
    (`capi.released`: the GIL given up, outside h5py's lock), once it gives
    `fletcher32_numpy`'s values for the probes; None where it is not exported (then NumPy
    computes it). libhdf5 exports it (H5_DLL) though it is not in its public headers."""
    function = capi.released(
        "H5_checksum_fletcher32", ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_size_t]
    )
    if function is None:
        log.debug("libhdf5 exports no H5_checksum_fletcher32: Fletcher-32 with NumPy")
        return None
    if not _agrees(function):
        log.warning("libhdf5's H5_checksum_fletcher32 differs from HDF5's; NumPy computes it")
        return None
    return function  # type: ignore[no-any-return]


def _agrees(function: Callable[[bytes, int], int]) -> bool:
    """Whether `function(data, len)` gives `fletcher32_numpy`'s value for every probe."""
    return all(function(probe, len(probe)) == fletcher32_numpy(probe) for probe in _PROBES)


def fletcher32_checked(data: bytes | memoryview | np.ndarray) -> np.ndarray:
    """The bytes before the 4-byte checksum the fletcher32 filter appended, once they match it
    (or the byte-swapped checksum libhdf5 before 1.6.3 wrote)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size < 4:
        raise ChunkError("a chunk too short for its fletcher32 checksum")
    body = raw[:-4]
    stored = int.from_bytes(raw[-4:].tobytes(), "little")
    computed = fletcher32(body)
    swapped = int.from_bytes(
        bytes(computed.to_bytes(4, "little")[i] for i in (1, 0, 3, 2)), "little"
    )
    if stored not in (computed, swapped):
        raise ChunkError("a chunk's fletcher32 checksum does not match its bytes")
    return body


def rows(
    codec: Codec,
    pieces: Sequence[tuple[int, bytes | memoryview, int]],
    start: int,
    stop: int,
    out: np.ndarray,
) -> None:
    """Decode rows [start, stop) into `out` (stop - start rows, any numeric dtype: values are
    converted as numpy converts them) from the chunks holding them: (first row, stored
    bytes, filter mask) of each, in order. `ChunkError` when they do not hold all those rows
    (a chunk never written reads as the dataset's fill value: h5py knows it, this does not)."""
    per_chunk = codec.chunk[0]
    filled = 0
    for first, raw, mask in pieces:
        lo, hi = max(start, first), min(stop, first + per_chunk)
        if lo >= hi:
            continue
        values = codec.decode(raw, mask)
        out[lo - start : hi - start] = values[lo - first : hi - first]
        filled += hi - lo
    if filled != stop - start:
        raise ChunkError(f"rows [{start}, {stop}) are not all stored (chunks never written)")
