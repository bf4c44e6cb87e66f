"""One contract over every kind of file content (`dcorfs.fs.content.FileContent`): static, rows,
parts, object, read-ahead, `.npy`, `features.tsv` and the synthesized `.rtdc`, each against its
reference bytes. The contract: the size is known up front; any read of [offset, offset+length)
gives exactly the reference's bytes there (cut at the end); `peek` gives them or None;
`read_pieces` joins to them; reads from several threads at once agree.

The `.rtdc` kinds are made from a generated measurement read through the real block cache; the
transport (the fetch function) reads a local file.
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest

from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.derived import DerivedCache
from dcorfs.cache.identity import ObjectId
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.fs.content import FileContent, PartsContent, RowContent, StaticContent, read_pieces
from dcorfs.fs.producers.npy import npy_content
from dcorfs.fs.producers.passthrough import ObjectContent
from dcorfs.fs.producers.rtdc_file import rtdc_content
from dcorfs.fs.producers.tsv import tsv_content
from dcorfs.fs.readahead import Prefetcher
from dcorfs.hdf5.rtdc import RemoteFile, RtdcResource, RtdcSource

TRUTH = np.random.default_rng(5).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
Made = tuple[FileContent, bytes]  # a content and its reference bytes


def later() -> float:
    return time.monotonic() + 60


def local_cache(data: bytes, block_size: int = 4096) -> tuple[BlockCache, ObjectId]:
    obj = ObjectId(key="local/object", etag="e1", size=len(data))

    def fetch(obj: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        return data[start:stop]  # the transport boundary: a local file's bytes

    return BlockCache(fetch=fetch, store=None, block_size=block_size, parallel=4), obj


@pytest.fixture(scope="module")
def measurement(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("contents") / "m.rtdc"
    return write_rtdc(path, SampleSpec(events=40, seed=61, image_shape=(20, 30)))


@pytest.fixture(scope="module")
def resource(measurement: Path) -> Iterator[RtdcResource]:
    cache, obj = local_cache(measurement.read_bytes())
    source = RtdcSource(RemoteFile(cache, obj, timeout=60), kind="resource")
    source.features = source.scan(later())
    derived = DerivedCache(store=None, block_size=5000, memory_bytes=64 << 20)
    opened = RtdcResource(source, None, 40, derived)
    yield opened
    opened.close()


def static() -> Made:
    return StaticContent(TRUTH[:5000]), TRUTH[:5000]


def rows() -> Made:
    made = RowContent(b"header", row_bytes=7, count=1000, rows=lambda a, b, d: TRUTH[a * 7 : b * 7])
    return made, b"header" + TRUTH[:7000]


def parts() -> Made:
    size = 20_000
    inner = [(100, StaticContent(TRUTH[:900])), (5000, StaticContent(TRUTH[1000:9000]))]
    reference = bytearray(size)
    reference[100:1000] = TRUTH[:900]
    reference[5000:13000] = TRUTH[1000:9000]
    return PartsContent(size, inner), bytes(reference)  # holes between parts read as zeros


def object_() -> Made:
    cache, obj = local_cache(TRUTH, block_size=3000)
    return ObjectContent(cache, obj), TRUTH


@pytest.fixture(scope="module")
def prefetcher() -> Iterator[Prefetcher]:
    made = Prefetcher(budget_bytes=1 << 20, workers=2, stream=4096, initial=4096)
    yield made
    made.close()


def read_ahead(prefetcher: Prefetcher) -> Made:
    made, reference = parts()
    return prefetcher.wrap(made), reference


def npy(resource: RtdcResource, measurement: Path) -> list[Made]:
    made = []
    with h5py.File(measurement, "r") as h5:
        for name in ("deform", "image", "mask", "trace/fl1_raw"):
            values = np.asarray(h5["events"][name][:])
            if name == "mask":
                values = values.astype(bool)
            buffer = io.BytesIO()
            np.save(buffer, values)
            made.append((npy_content(resource, resource.features[name]), buffer.getvalue()))
    return made


def tsv(resource: RtdcResource, measurement: Path) -> Made:
    made = tsv_content(resource)
    reference = made.read(0, made.size, deadline=later())
    table = pd.read_csv(io.BytesIO(reference), sep="\t")
    with h5py.File(measurement, "r") as h5:
        for name in table.columns:  # the reference bytes are the right table
            stored = h5["events"][name][:]
            assert np.array_equal(table[name].to_numpy().astype(stored.dtype), stored), name
    return made, reference


def synthesized(resource: RtdcResource, measurement: Path) -> Made:
    def remember(key: str, make: Callable[[float], Any]) -> Any:
        return make(later())

    made = rtdc_content("local-resource", resource, remember)
    reference = made.read(0, made.size, deadline=later())
    with (
        h5py.File(io.BytesIO(reference), "r") as ours,
        h5py.File(measurement, "r") as source,
    ):
        for name in ("deform", "image", "trace/fl1_raw"):  # the reference bytes are the file
            assert np.array_equal(ours["events"][name][:], source["events"][name][:]), name
    return made, reference


KINDS = ["static", "rows", "parts", "object", "read-ahead", "npy", "tsv", "synthesized"]


@pytest.fixture(params=KINDS)
def made(
    request: pytest.FixtureRequest,
    resource: RtdcResource,
    measurement: Path,
    prefetcher: Prefetcher,
) -> list[Made]:
    kind = request.param
    simple = {"static": static, "rows": rows, "parts": parts, "object": object_}
    if kind in simple:
        return [simple[kind]()]
    if kind == "read-ahead":
        return [read_ahead(prefetcher)]
    if kind == "npy":
        return npy(resource, measurement)
    if kind == "tsv":
        return [tsv(resource, measurement)]
    return [synthesized(resource, measurement)]


def ranges(size: int, seed: int) -> list[tuple[int, int]]:
    """Edges, the whole, past the end, empty, and random ranges (some in sequence, as a
    streaming reader asks: read-ahead is then at work)."""
    rng = random.Random(seed)
    found = [(0, size), (0, 1), (size - 1, 1), (size, 10), (size - 3, 100), (5, 0)]
    found += [(rng.randrange(size), rng.randrange(1, 70_000)) for _ in range(40)]
    offset = 0
    while offset < size:
        found.append((offset, 4096))
        offset += 4096
    return found


def test_reads_are_the_reference_bytes(made: list[Made]) -> None:
    for content, reference in made:
        assert content.size == len(reference)
        for offset, length in ranges(content.size, seed=len(reference)):
            expected = reference[offset : offset + length]
            got = content.read(offset, length, deadline=later())
            assert got == expected, (offset, length)
            joined = b"".join(read_pieces(content, offset, length, deadline=later()))
            assert joined == expected, (offset, length)
            peeked = content.peek(offset, length)
            assert peeked is None or peeked == expected, (offset, length)


def same_bytes(content: FileContent, reference: bytes, part: tuple[int, int]) -> bool:
    offset, length = part
    return content.read(offset, length, deadline=later()) == reference[offset : offset + length]


def test_reads_from_threads_at_once_agree(made: list[Made]) -> None:
    for content, reference in made:
        check = functools.partial(same_bytes, content, reference)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert all(pool.map(check, ranges(content.size, seed=7)))
