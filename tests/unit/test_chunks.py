"""Chunks decoded without h5py (`hdf5.chunks`) equal h5py's values, bit for bit: over every
dataset of the field's files and over generated files of every dtype, shape, chunking and
filter pipeline the module decodes; damaged chunks are refused, never served; a read of event
data needs neither h5py's lock nor h5py."""

from __future__ import annotations

import io
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import pytest
from h5py._objects import phil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.identity import ObjectId
from dcorfs.errors import ProtocolError
from dcorfs.hdf5 import chunks
from dcorfs.hdf5.chunks import ChunkError, Codec, fletcher32, fletcher32_numpy, rows
from dcorfs.hdf5.rtdc import RemoteFile, RtdcSource

from ..conftest import FIXTURE_FILES, needs_fixtures


def stored_chunks(data: bytes, dataset: h5py.Dataset) -> list[tuple[int, bytes, int]]:
    """(first row, stored bytes, filter mask) of each chunk, in order."""
    found: list[tuple[int, bytes, int]] = []
    dataset.id.chunk_iter(
        lambda info: found.append(
            (
                info.chunk_offset[0],
                data[info.byte_offset : info.byte_offset + info.size],
                info.filter_mask,
            )
        )
    )
    return sorted(found, key=lambda piece: piece[0])


def decoded(data: bytes, dataset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    codec = Codec.of(dataset)
    assert codec is not None
    out = np.empty((stop - start, *dataset.shape[1:]), dtype=dataset.dtype)
    rows(codec, stored_chunks(data, dataset), start, stop, out)
    return out


def same(ours: np.ndarray, theirs: np.ndarray) -> bool:
    return ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()


@needs_fixtures
@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_every_dataset_of_the_fields_files_decodes_as_h5py_does(path: Path) -> None:
    data = path.read_bytes()
    checked = []
    with h5py.File(io.BytesIO(data), "r") as h5:

        def visit(name: str, item: Any) -> None:
            if isinstance(item, h5py.Dataset) and Codec.of(item) is not None:
                assert same(decoded(data, item, 0, item.shape[0]), item[...]), name
                checked.append(name)

        h5.visititems(visit)
        event_data = [name for name in checked if name.startswith("events/")]
        assert event_data, "no feature of the file decoded without h5py"


FILTERS: dict[str, dict[str, Any]] = {
    "none": {},
    "gzip": {"compression": "gzip", "compression_opts": 4},
    "shuffle+gzip": {"compression": "gzip", "shuffle": True},
    "zstd": dict(hdf5plugin.Zstd()),
    "shuffle+zstd": {**dict(hdf5plugin.Zstd()), "shuffle": True},
    "fletcher32": {"fletcher32": True},
    "fletcher32+shuffle+zstd": {**dict(hdf5plugin.Zstd()), "shuffle": True, "fletcher32": True},
    "gzip+fletcher32": {"compression": "gzip", "fletcher32": True},
}
DTYPES = ["u1", "<i2", ">i2", "<i4", "<i8", "<u4", "<f4", ">f4", "<f8", ">f8", "?"]


@st.composite
def datasets(draw: st.DrawFn) -> tuple[bytes, str, int, int]:
    """A file with one chunked dataset (its bytes), the pipeline's name and a slice of it."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    events = draw(st.integers(1, 300))
    shape = (events, *draw(st.sampled_from([(), (3,), (4, 5)])))
    values = draw(
        hnp.arrays(dtype, shape, elements={"allow_nan": True} if dtype.kind == "f" else None)
    )
    per_chunk = draw(st.integers(1, max(1, events)))
    pipeline = draw(st.sampled_from(sorted(FILTERS)))
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_dataset("x", data=values, chunks=(per_chunk, *shape[1:]), **FILTERS[pipeline])
    start = draw(st.integers(0, events - 1))
    stop = draw(st.integers(start + 1, events))
    return buffer.getvalue(), pipeline, start, stop


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_generated_datasets_decode_as_h5py_does(made: tuple[bytes, str, int, int]) -> None:
    data, pipeline, start, stop = made
    with h5py.File(io.BytesIO(data), "r") as h5:
        dataset = h5["x"]
        assert same(decoded(data, dataset, start, stop), dataset[start:stop]), pipeline


def test_a_chunk_written_without_its_filter_decodes_by_its_mask() -> None:
    """A chunk whose filter mask says the compression was skipped (libhdf5 does so when a
    filter is optional and fails) is taken as stored."""
    values = np.arange(40, dtype="<i4").reshape(4, 10)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        dataset = h5.create_dataset(
            "x", shape=(8, 10), dtype="<i4", chunks=(4, 10), compression="gzip"
        )
        dataset[:4] = values
        dataset.id.write_direct_chunk((4, 0), (values + 100).tobytes(), filter_mask=1)
    data = buffer.getvalue()
    with h5py.File(io.BytesIO(data), "r") as h5:
        assert [mask for _, _, mask in stored_chunks(data, h5["x"])] == [0, 1]
        assert same(decoded(data, h5["x"], 0, 8), h5["x"][...])


@pytest.mark.parametrize("checksum", ["native", "numpy", "fletcher32"])
def test_fletcher32_is_hdf5s(checksum: str) -> None:
    """The checksum libhdf5 writes (read back from a file it wrote), for even and odd
    lengths, a chunk's size, and 0 for no bytes: libhdf5's own function, NumPy's, and the
    one `fletcher32` picks."""
    functions: dict[str, Callable[[Any], int]] = {
        "native": _native_of,
        "numpy": fletcher32_numpy,
        "fletcher32": fletcher32,
    }
    compute = functions[checksum]
    sizes = (1, 2, 3, 721, 1_040_001)
    randoms = [np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8) for n in sizes]
    # sums that are multiples of 0xffff: the end-around carry keeps them 0xffff, not 0
    for payload in [*randoms, np.full(2, 0xFF, np.uint8), np.full(6, 0xFF, np.uint8)]:
        size = payload.size
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as h5:
            h5.create_dataset("x", data=payload, chunks=(size,), fletcher32=True)
        data = buffer.getvalue()
        with h5py.File(io.BytesIO(data), "r") as h5:
            ((_, stored, _),) = stored_chunks(data, h5["x"])
        assert stored[:-4] == payload.tobytes()
        assert compute(stored[:-4]) == int.from_bytes(stored[-4:], "little")
    assert fletcher32(b"") == 0 and fletcher32_numpy(b"") == 0
    assert compute(bytes(10)) == 0


def _native_of(data: Any) -> int:
    """libhdf5's function itself on these bytes (it must be found: `test_native_is_found`)."""
    native = chunks._native()
    assert native is not None
    raw = np.frombuffer(data, dtype=np.uint8)
    return int(native(raw.ctypes.data, raw.size))


def test_native_is_found() -> None:
    """On Linux (h5py's wheels and Debian's libhdf5 alike export it) libhdf5's function is
    found and passes its probes: otherwise every chunk's checksum silently costs 5× more."""
    if sys.platform != "linux":
        pytest.skip("only Linux builds of libhdf5 are known here to export it")
    assert chunks._native() is not None


def test_fletcher32_native_agrees_with_numpy() -> None:
    """libhdf5's function gives NumPy's values for random bytes of many lengths, whatever
    buffer holds them and wherever in it they start (a block of the cache is a slice)."""
    if chunks._native() is None:
        pytest.skip("libhdf5 of this h5py exports no H5_checksum_fletcher32: NumPy's is used")
    rng = np.random.default_rng(7)
    for n in [*range(1, 40), 1023, 2048, 2049, 1_040_000, 1_040_001]:
        payload = rng.integers(0, 256, n + 3, dtype=np.uint8)
        body = payload[3:]
        expected = fletcher32_numpy(body.copy())
        assert _native_of(body) == expected
        assert fletcher32(body) == expected  # (an array whose data start 3 bytes in)
        assert fletcher32(body.tobytes()) == expected
        assert fletcher32(memoryview(payload.tobytes())[3:]) == expected
        assert fletcher32(memoryview(payload.tobytes()).toreadonly()[3:]) == expected
    words = rng.integers(0, 1 << 16, 1001, dtype=np.uint16)  # a multi-byte dtype: its bytes
    assert fletcher32(words) == fletcher32_numpy(words.tobytes())
    with pytest.raises(BufferError):  # not contiguous: refused, never read past
        fletcher32(memoryview(np.arange(10, dtype=np.uint8))[::2])


def test_a_native_function_that_disagrees_is_not_used() -> None:
    """A function that does not give HDF5's values for the probes (byte-swapped, or without
    the end-around carry) is refused; the real one passes."""
    swapped: Callable[[bytes, int], int] = lambda data, n: int.from_bytes(  # noqa: E731
        fletcher32_numpy(data).to_bytes(4, "little")[::-1], "little"
    )
    no_carry: Callable[[bytes, int], int] = lambda data, n: fletcher32_numpy(data) % 0xFFFF  # noqa: E731
    assert not chunks._agrees(swapped)
    assert not chunks._agrees(no_carry)
    assert chunks._agrees(lambda data, n: fletcher32_numpy(data))
    native = chunks._native()
    if native is not None:
        assert chunks._agrees(native)


@pytest.mark.parametrize(
    ("pipeline", "cut"),
    [
        ("fletcher32+shuffle+zstd", False),
        ("gzip+fletcher32", False),
        ("zstd", True),
        ("gzip", True),
    ],
)
def test_a_damaged_chunk_is_refused_not_served(pipeline: str, cut: bool) -> None:
    """A flipped bit under a checksum, a chunk cut short under any codec. (Without a checksum a
    flipped bit may decode to other values: h5py then reads them too.)"""
    values = np.linspace(0, 1, 2000, dtype="<f8")
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_dataset("x", data=values, chunks=(2000,), **FILTERS[pipeline])
    data = bytearray(buffer.getvalue())
    with h5py.File(io.BytesIO(bytes(data)), "r") as h5:
        codec = Codec.of(h5["x"])
        ((_, stored, mask),) = stored_chunks(bytes(data), h5["x"])
    assert codec is not None
    damaged = bytearray(stored[: len(stored) // 2] if cut else stored)
    if not cut:
        damaged[len(damaged) // 2] ^= 0x10
    with pytest.raises(ChunkError):
        codec.decode(bytes(damaged), mask)


def test_pipelines_not_decoded_here_are_left_to_h5py() -> None:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.create_dataset("lzf", data=np.arange(100.0), chunks=(10,), compression="lzf")
        h5.create_dataset("contiguous", data=np.arange(100.0))
        h5.create_dataset("across", data=np.zeros((10, 8)), chunks=(5, 4))
        h5.create_dataset("text", data=np.array([b"a", b"bc"] * 5), chunks=(5,))
    with h5py.File(io.BytesIO(buffer.getvalue()), "r") as h5:
        assert all(Codec.of(h5[name]) is None for name in h5)


def local_source(data: bytes) -> RtdcSource:
    obj = ObjectId(key="local/x", etag="e", size=len(data))
    cache = BlockCache(fetch=lambda o, a, b, d: data[a:b], store=None, block_size=1 << 16)
    source = RtdcSource(RemoteFile(cache, obj, timeout=60), kind="resource")
    source.features = source.scan(time.monotonic() + 60)
    return source


def measurement(compression: dict[str, Any]) -> bytes:
    """An .rtdc file dclab's rule shows `deform` and `image` of (see test_featurerule)."""
    rng = np.random.default_rng(7)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.attrs["experiment:event count"] = 50
        events = h5.create_group("events")
        events.create_dataset(
            "deform", data=rng.random(50, dtype="<f4"), chunks=(16,), **compression
        )
        events.create_dataset(
            "image",
            data=rng.integers(0, 255, (50, 8, 9), dtype="u1"),
            chunks=(16, 8, 9),
            **compression,
        )
        events.create_dataset("lzf", data=rng.random(50), chunks=(16,), compression="lzf")
    return buffer.getvalue()


def test_reads_of_event_data_need_neither_h5pys_lock_nor_h5py() -> None:
    """Once a feature's chunk table is known, its events decode while another thread holds
    h5py's lock (through h5py they would wait for it); a pipeline not decoded here still
    reads through h5py."""
    data = measurement(FILTERS["fletcher32+shuffle+zstd"])
    source = local_source(data)
    deadline = time.monotonic() + 60
    try:
        with h5py.File(io.BytesIO(data), "r") as h5:
            truth = {name: h5["events"][name][...] for name in ("deform", "image", "lzf")}
        for name in ("deform", "image"):
            source.read(name, 0, 1, deadline=deadline)  # the chunk table, read once
        results: dict[str, np.ndarray] = {}

        def read() -> None:
            for name in ("deform", "image"):
                results[name] = source.read(name, 5, 37, deadline=deadline)

        with phil:
            reader = threading.Thread(target=read)
            reader.start()
            reader.join(30)
            assert not reader.is_alive(), "the read waited for h5py's lock"
        for name in ("deform", "image"):
            assert same(results[name], truth[name][5:37])
        assert same(source.read("lzf", 3, 50, deadline=deadline), truth["lzf"][3:50])
    finally:
        source.close()


def test_a_damaged_chunk_read_through_a_source_is_an_error_not_wrong_values() -> None:
    data = bytearray(measurement(FILTERS["fletcher32+shuffle+zstd"]))
    with h5py.File(io.BytesIO(bytes(data)), "r") as h5:
        first = stored_chunks(bytes(data), h5["events/deform"])[0]
        offset = bytes(data).index(first[1])
    data[offset + len(first[1]) // 2] ^= 0x01
    source = local_source(bytes(data))
    try:
        # h5py's error (as dcorfs reports it), after the decoder refused the chunk
        with pytest.raises(ProtocolError, match="cannot read deform"):
            source.read("deform", 0, 10, deadline=time.monotonic() + 60)
    finally:
        source.close()


def test_rows_in_chunks_never_written_are_left_to_h5py() -> None:
    """A chunk never written is not stored: h5py reads the fill value there. The decoder
    refuses such rows (rather than leave them unset), and a source reads them through h5py."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5.attrs["experiment:event count"] = 12
        deform = h5.create_group("events").create_dataset(
            "deform", shape=(12,), dtype="<f4", chunks=(4,), fillvalue=7.0, **FILTERS["zstd"]
        )
        deform[:4] = np.arange(4)
        deform[8:] = np.arange(4)
    data = buffer.getvalue()
    with h5py.File(io.BytesIO(data), "r") as h5:
        truth = h5["events/deform"][...]
        with pytest.raises(ChunkError, match="not all stored"):
            decoded(data, h5["events/deform"], 2, 10)
        assert same(decoded(data, h5["events/deform"], 8, 12), truth[8:])
    source = local_source(data)
    try:
        assert same(source.read("deform", 0, 12, deadline=time.monotonic() + 60), truth)
    finally:
        source.close()
