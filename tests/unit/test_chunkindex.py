"""The chunk index read ahead (hdf5/chunkindex.py): every byte h5py reads to list a dataset's
chunks was fetched before, a level of the B-tree per batch; layouts it does not read are
said so, never guessed."""

from __future__ import annotations

import io
from collections.abc import Sequence

import h5py
import numpy as np
import pytest

from dcorfs.hdf5.chunkindex import NotFollowed, index_nodes


class Recording(io.BytesIO):
    """A file object that remembers the byte ranges read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[tuple[int, int]] = []

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        start = self.tell()
        n = super().readinto(buffer)
        self.reads.append((start, start + n))
        return n


def write(**kwargs: object) -> bytes:
    """An HDF5 file of chunked datasets (written in steps, as acquisition software does)."""
    buffer = io.BytesIO()
    libver = kwargs.pop("libver", "earliest")
    with h5py.File(buffer, "w", libver=libver) as h5:  # type: ignore[arg-type]
        events = h5.create_group("events")
        deep = events.create_dataset(
            "deep", shape=(0,), maxshape=(None,), chunks=(10,), dtype="f4", **kwargs
        )
        image = events.create_dataset(
            "image", shape=(0, 8, 5), maxshape=(None, 8, 5), chunks=(3, 8, 5), dtype="u1"
        )
        rng = np.random.default_rng(0)
        for _ in range(50):  # 50,000 values in 5,000 chunks: a B-tree of three levels
            deep.resize(deep.shape[0] + 1000, axis=0)
            deep[-1000:] = rng.random(1000)
            image.resize(image.shape[0] + 20, axis=0)
            image[-20:] = rng.integers(0, 255, (20, 8, 5))
        events.create_dataset("plain", data=np.arange(10))
        events.create_dataset("unwritten", shape=(100,), chunks=(10,), dtype="f8")
    return buffer.getvalue()


def prefetch(data: bytes, name: str) -> tuple[list[list[tuple[int, int]]], int]:
    """The batches of ranges `index_nodes` fetches for dataset `events/<name>`, and the
    number of nodes it found."""
    with h5py.File(io.BytesIO(data), "r") as h5:
        events = h5["events"]
        header = events.id.links.get_info(name.encode()).u
    batches: list[list[tuple[int, int]]] = []

    def read(offset: int, size: int) -> bytes:
        return data[offset : offset + size]

    def fetch(ranges: Sequence[tuple[int, int]]) -> None:
        batches.append(list(ranges))

    return batches, index_nodes(read, fetch, header)


def walked(data: bytes, name: str) -> list[tuple[int, int]]:
    """The byte ranges h5py reads to list the chunks of `events/<name>` (file already open)."""
    recording = Recording(data)
    with h5py.File(recording, "r") as h5:
        dataset = h5["events"][name]
        recording.reads.clear()
        dataset.id.chunk_iter(lambda info: None)
        return list(recording.reads)


def covered(ranges: list[tuple[int, int]], by: list[tuple[int, int]]) -> bool:
    return all(any(a <= start and stop <= b for a, b in by) for start, stop in ranges)


@pytest.mark.parametrize(
    ("kwargs", "levels"),
    [({}, 3), ({"track_order": True}, 3)],  # object headers of version 1, and of version 2
    ids=["header v1", "header v2"],
)
def test_what_h5py_reads_to_list_the_chunks_was_fetched_a_level_at_a_time(
    kwargs: dict[str, object], levels: int
) -> None:
    data = write(**kwargs)
    for name, depth in (("deep", levels), ("image", 2)):
        batches, nodes = prefetch(data, name)
        assert len(batches) == depth, (name, [len(b) for b in batches])
        assert [len(b) for b in batches][0] == 1  # the root
        assert nodes == sum(len(b) for b in batches) > 1
        reads = walked(data, name)
        assert reads and covered(reads, [r for batch in batches for r in batch]), name


def test_layouts_it_does_not_read_are_said_so() -> None:
    data = write()
    with pytest.raises(NotFollowed, match="chunked"):
        prefetch(data, "plain")  # contiguous
    assert prefetch(data, "unwritten") == ([], 0)  # chunked, no chunk written: no index yet
    with pytest.raises(NotFollowed, match="version 3"):
        prefetch(write(libver="latest"), "deep")  # version 4: chunks indexed otherwise
    broken = bytearray(data)
    batches, _ = prefetch(data, "deep")
    root = batches[0][0][0]
    broken[root : root + 4] = b"XXXX"
    with pytest.raises(NotFollowed, match="no B-tree node"):
        prefetch(bytes(broken), "deep")
    with pytest.raises(NotFollowed, match="superblock"):
        index_nodes(lambda offset, size: bytes(size), lambda ranges: None, 0)
