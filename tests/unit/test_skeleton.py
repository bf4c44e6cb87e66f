"""The HDF5 skeleton builder and the file made of parts, without a mount."""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcorfs.fs.content import PartsContent, RowContent, StaticContent
from dcorfs.hdf5 import skeleton
from dcorfs.hdf5.capi import HDF5CallError
from dcorfs.hdf5.skeleton import GAP, LIBVER, Skeleton, Spec, build

H5DUMP = shutil.which("h5dump")


def sample_specs(events: int = 50) -> tuple[dict[str, object], list[Spec], dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    data = {
        "events/deform": rng.random(events),
        "events/index": np.arange(1, events + 1, dtype=np.uint32),
        "events/trace/fl1_raw": rng.integers(-100, 100, (events, 17)).astype(np.int16),
        "events/image": rng.integers(0, 255, (events, 8, 12)).astype(np.uint8),
    }
    log = np.array([b"line one", b"line two"], dtype="S100")
    table = np.zeros((3, 1), dtype=[("time", "<f8"), ("flow", "<f8")])
    table["time"] = [[1.0], [2.0], [3.0]]
    specs = [
        Spec("logs/acquisition", log.dtype, log.shape, {}, log),
        Spec("tables/monitor", table.dtype, table.shape, {"COLOR_time": "red"}, table),
    ]
    for path, values in data.items():
        attrs = {"CLASS": np.bytes_(b"IMAGE")} if path == "events/image" else {"min": 0.0}
        specs.append(
            Spec(path, values.dtype, values.shape, attrs, gap_before=path == "events/image")
        )
    attrs = {"experiment:event count": events, "setup:medium": "CellCarrier"}
    return attrs, specs, data


def materialize(skeleton: Skeleton, data: dict[str, np.ndarray]) -> bytes:
    out = bytearray(skeleton.size)
    for offset, run in skeleton.runs:
        out[offset : offset + len(run)] = run
    for path, (offset, length) in skeleton.extents.items():
        raw = np.ascontiguousarray(data[path]).tobytes()
        assert len(raw) == length
        out[offset : offset + length] = raw
    return bytes(out)


def test_the_skeleton_plus_the_data_is_the_file(tmp_path: Path) -> None:
    attrs, specs, data = sample_specs()
    skeleton = build(attrs, specs)
    path = tmp_path / "made.h5"
    path.write_bytes(materialize(skeleton, data))
    with h5py.File(path, "r") as made:
        assert made.attrs["setup:medium"] == "CellCarrier"
        assert made.attrs["experiment:event count"] == 50
        for name, values in data.items():
            stored = made[name]
            assert stored.chunks is None and stored.compression is None
            assert stored.dtype == values.dtype and np.array_equal(stored[()], values)
        assert made["events/image"].attrs["CLASS"] == b"IMAGE"
        assert list(made["logs/acquisition"][()]) == [b"line one", b"line two"]
        assert made["tables/monitor"]["time"][:, 0].tolist() == [1.0, 2.0, 3.0]
        assert made["tables/monitor"].attrs["COLOR_time"] == "red"
        assert "dcorfs-gap" not in made
    if H5DUMP:  # the HDF5 1.10 tools of Debian read it
        dumped = subprocess.run(
            [H5DUMP, "-d", "/events/index", str(path)], capture_output=True, text=True, check=True
        ).stdout
        assert "(0): 1, 2, 3, 4," in dumped


def h5py_written(
    attrs: dict[str, Any], specs: list[Spec], groups: list[str]
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The file (written bytes, zeros elsewhere) and extents that h5py's high-level API
    makes when asked what `build` asks of libhdf5 directly."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver=LIBVER, locking=False) as out:
        out.attrs.update(attrs)
        for path in groups:
            out.require_group(path)
        lazy = []
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_LATE)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        for spec in specs:
            parent, _, name = spec.path.rpartition("/")
            where = out.require_group(parent) if parent else out
            if spec.data is not None:
                made = where.create_dataset(name, data=spec.data)
            else:
                made = where.create_dataset(name, shape=spec.shape, dtype=spec.dtype, dcpl=dcpl)
                lazy.append((spec, made))
            made.attrs.update(spec.attrs)
        gap = out.create_dataset("dcorfs-gap", shape=(GAP,), dtype="u1", dcpl=dcpl)
        gap_made = False
        for spec, made in lazy:
            if spec.gap_before and not gap_made:
                gap[0] = 0
                gap_made = True
            if made.size:
                made[(0,) * made.ndim] = 0
        extents = {
            spec.path: (made.id.get_offset(), made.id.get_storage_size())
            for spec, made in lazy
            if made.id.get_offset() is not None
        }
        del out["dcorfs-gap"]
    return buffer.getvalue(), extents


def skeleton_bytes(skeleton: Skeleton) -> bytes:
    """The skeleton's file with zeros in its extents."""
    out = bytearray(skeleton.size)
    for offset, run in skeleton.runs:
        out[offset : offset + len(run)] = run
    return bytes(out)


def test_the_build_is_byte_for_byte_what_h5py_writes() -> None:
    attrs, specs, _ = sample_specs()
    specs.append(Spec("events/empty", np.dtype("<f8"), (0,), {"note": ["a", "b"]}))
    skeleton = build(attrs, specs, ["events", "logs", "tables", "logs/empty"])
    image, extents = h5py_written(attrs, specs, ["events", "logs", "tables", "logs/empty"])
    assert skeleton.extents == extents
    assert skeleton_bytes(skeleton) == image.ljust(skeleton.size, b"\0")


kinds = st.sampled_from(["<f8", "<f4", ">f8", "<i2", "<u4", "u1", "|b1", "<i8"])
shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)  # () too: a scalar dataset
attr_values = st.one_of(
    st.floats(allow_nan=False),
    st.integers(-(2**40), 2**40),
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=12),
    st.lists(st.text("abc", max_size=3), min_size=1, max_size=3),
    st.booleans(),
    st.binary(max_size=8).filter(lambda b: b"\0" not in b),  # (NUL: test_structure)
    st.lists(st.floats(allow_nan=False), min_size=1, max_size=4).map(np.array),
    st.integers(0, 255).map(np.uint8),
)
attr_names = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\0/."), min_size=1, max_size=6
)
spec_lists = st.lists(
    st.tuples(
        kinds,
        shapes,
        st.dictionaries(attr_names, attr_values, max_size=4),
        st.booleans(),
    ),
    max_size=8,
)


@settings(max_examples=40, deadline=None)
@given(spec_lists, st.dictionaries(st.text("xyz:", min_size=1, max_size=5), attr_values))
def test_any_build_is_byte_for_byte_what_h5py_writes(
    made: list[tuple[str, tuple[int, ...], dict[str, Any], bool]], attrs: dict[str, Any]
) -> None:
    specs = [
        Spec(f"events/f{i}", np.dtype(kind), shape, spec_attrs, gap_before=gap)
        for i, (kind, shape, spec_attrs, gap) in enumerate(made)
    ]
    skeleton = build(attrs, specs, ["events"])
    image, extents = h5py_written(attrs, specs, ["events"])
    assert skeleton.extents == extents
    assert skeleton_bytes(skeleton) == image.ljust(skeleton.size, b"\0")


def test_layout_metadata_first_then_scalars_then_a_hole_then_images() -> None:
    attrs, specs, _ = sample_specs()
    skeleton = build(attrs, specs)
    extents = skeleton.extents
    first_data = min(offset for offset, _ in extents.values())
    assert skeleton.runs[0][0] == 0 and len(skeleton.runs[0][1]) > 1000
    for offset, run in skeleton.runs:  # all structure lies before the data (the rest: zeros)
        assert offset + len(run.rstrip(b"\0")) <= first_data or not run.strip(b"\0")
    scalars_end = max(
        o + n for p, (o, n) in extents.items() if p.count("/") == 1 and "image" not in p
    )
    assert extents["events/image"][0] - scalars_end >= GAP
    # runs never overlap an extent, and everything lies within the file
    for offset, run in skeleton.runs:
        assert offset + len(run) <= skeleton.size
        for start, length in extents.values():
            assert offset + len(run) <= start or start + length <= offset


def test_the_build_is_deterministic_and_survives_json() -> None:
    attrs, specs, _ = sample_specs()
    first = build(attrs, specs)
    assert build(attrs, specs) == first
    assert Skeleton.from_json(first.to_json()) == first


def test_huge_lazy_datasets_cost_nothing() -> None:
    events = 2_000_000
    specs = [
        Spec("events/deform", np.dtype("<f4"), (events,)),
        Spec("events/image", np.dtype("u1"), (events, 80, 320), gap_before=True),
    ]
    started = time.monotonic()
    skeleton = build({}, specs)
    elapsed = time.monotonic() - started
    assert skeleton.size > events * 80 * 320
    assert sum(len(run) for _, run in skeleton.runs) < 64 << 10
    assert elapsed < 30, elapsed  # generous: this is about memory and sparseness, not speed


def test_empty_datasets_have_no_extent(tmp_path: Path) -> None:
    skeleton = build({}, [Spec("events/deform", np.dtype("<f8"), (0,))])
    assert skeleton.extents == {}
    path = tmp_path / "empty.h5"
    path.write_bytes(materialize(skeleton, {}))
    with h5py.File(path, "r") as made:
        assert made["events/deform"].shape == (0,)


def parts_reference() -> tuple[PartsContent, bytes]:
    rng = np.random.default_rng(7)
    reference = bytearray(1000)
    head = rng.integers(0, 255, 100).astype(np.uint8).tobytes()
    reference[0:100] = head
    rows = rng.integers(0, 255, 300).astype(np.uint8).tobytes()  # 30 rows of 10 bytes
    reference[400:700] = rows
    tail = b"tail"
    reference[996:1000] = tail
    content = PartsContent(
        1000,
        [
            (
                400,
                RowContent(b"", row_bytes=10, count=30, rows=lambda a, b, d: rows[a * 10 : b * 10]),
            ),
            (0, StaticContent(head)),
            (996, StaticContent(tail)),
        ],
    )
    return content, bytes(reference)


@given(st.integers(0, 1100), st.integers(0, 1100))
def test_parts_read_like_the_bytes_they_stand_for(offset: int, length: int) -> None:
    content, reference = parts_reference()
    assert content.read(offset, length, deadline=0) == reference[offset : offset + length]
    peeked = content.peek(offset, length)
    if peeked is not None:
        assert peeked == reference[offset : offset + length]
    stop = min(offset + length, 1000)
    if stop <= 400 or offset >= 700:  # nothing from the rows: answered without blocking
        assert peeked == reference[offset : offset + length]


def test_parts_read_only_the_rows_asked_for() -> None:
    asked: list[tuple[int, int]] = []

    def rows(first: int, last: int, deadline: float) -> bytes:
        asked.append((first, last))
        return bytes(range(first, last))

    content = PartsContent(100, [(50, RowContent(b"", row_bytes=1, count=20, rows=rows))])
    assert content.read(55, 3, deadline=0) == bytes([5, 6, 7])
    assert asked == [(5, 8)]
    assert content.peek(55, 3) is None  # rows are made in a worker thread, never on peek
    assert content.peek(0, 50) == bytes(50)


def test_a_failing_libhdf5_call_names_what_it_made() -> None:
    """Two datasets of one name: libhdf5 refuses the second, and the error says which."""
    spec = Spec("events/deform", np.dtype("<f8"), (3,))
    with pytest.raises(HDF5CallError, match=r"H5Dcreate2 failed \(deform\)"):
        build({}, [spec, spec])


def test_a_build_of_many_datasets_is_what_h5py_writes_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above `MANY` datasets h5py's lock is taken per dataset, not for the whole build."""
    monkeypatch.setattr(skeleton, "MANY", 3)
    specs = [Spec(f"events/f{i}", np.dtype("<f8"), (4,), {"i": i}) for i in range(8)]
    made = build({"title": "many"}, specs, ["events"])
    image, extents = h5py_written({"title": "many"}, specs, ["events"])
    assert made.extents == extents
    assert skeleton_bytes(made) == image.ljust(made.size, b"\0")


@pytest.fixture
def scratch_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """Builds' scratch files put in a directory of the test's (`/dev/shm` taken to be it)."""

    def put(where: Path) -> None:
        monkeypatch.setattr(skeleton, "SHM", where)
        skeleton._usable.cache_clear()

    yield put
    skeleton._usable.cache_clear()


def test_a_build_leaves_no_scratch_file_behind_even_when_it_fails(
    tmp_path: Path, scratch_in: Callable[[Path], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch_in(tmp_path)
    attrs, specs, _ = sample_specs()
    made = build(attrs, specs, ["events"])
    assert skeleton.scratch_dir() == str(tmp_path)
    spec = Spec("events/deform", np.dtype("<f8"), (3,))
    with pytest.raises(HDF5CallError):  # failing in libhdf5, the file open (and unlinked)
        build({}, [spec, spec])
    assert list(tmp_path.iterdir()) == []

    def refused(fapl: int) -> None:
        raise HDF5CallError("refused")

    with monkeypatch.context() as patch:  # failing before libhdf5 has the file
        patch.setattr(skeleton.capi, "no_small_data_blocks", refused)
        with pytest.raises(HDF5CallError, match="refused"):
            build(attrs, specs)
    assert list(tmp_path.iterdir()) == []
    image, extents = h5py_written(attrs, specs, ["events"])
    assert made.extents == extents
    assert skeleton_bytes(made) == image.ljust(made.size, b"\0")


@pytest.mark.parametrize("why", ["missing", "full"])
def test_without_a_usable_dev_shm_the_build_is_made_in_the_temporary_directory(
    tmp_path: Path, scratch_in: Callable[[Path], None], monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """Where `/dev/shm` cannot be written, or has too little room at the time of a build."""
    scratch_in(tmp_path / "missing" if why == "missing" else tmp_path)
    if why == "full":
        assert skeleton.scratch_dir() == str(tmp_path)
        monkeypatch.setattr(skeleton, "SHM_FREE", 1 << 62)
    attrs, specs, _ = sample_specs()
    made = build(attrs, specs)
    assert skeleton.scratch_dir() == tempfile.gettempdir()
    image, extents = h5py_written(attrs, specs, [])
    assert made.extents == extents
    assert skeleton_bytes(made) == image.ljust(made.size, b"\0")


def test_scratch_files_left_by_killed_builds_are_removed_once_stale(
    tmp_path: Path, scratch_in: Callable[[Path], None]
) -> None:
    stale, fresh = tmp_path / "dcorfs-skeleton-old", tmp_path / "dcorfs-skeleton-new"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    old = time.time() - skeleton.STALE - 60
    os.utime(stale, (old, old))
    scratch_in(tmp_path)
    assert skeleton.scratch_dir() == str(tmp_path)
    assert sorted(tmp_path.iterdir()) == [fresh]  # (a build under way may own it)


def test_runs_leave_out_extents_and_pages_of_zeros_a_file_without_holes_has(
    tmp_path: Path,
) -> None:
    """Zeros written (as a filesystem without holes reads its gaps) are no run; a run's
    leading zeros within its page stay, its trailing ones go."""
    page = skeleton.PAGE
    data = bytearray(6 * page)
    data[10:20] = b"x" * 10  # page 0
    # page 1: zeros; page 2: data around an extent at [2.5 pages, 3 pages)
    data[2 * page + 5 : 2 * page + 9] = b"abcd"
    data[2 * page + page // 2 : 3 * page] = b"e" * (page // 2)  # the extent's own values
    data[4 * page - 3 : 4 * page + 2] = b"fghij"  # across a page boundary
    path = tmp_path / "file"
    path.write_bytes(bytes(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        runs = skeleton._runs(fd, len(data), [(2 * page + page // 2, page // 2)])
    finally:
        os.close(fd)
    assert runs == [
        (0, bytes(10) + b"x" * 10),
        (2 * page, bytes(5) + b"abcd"),
        (3 * page, bytes(page - 3) + b"fghij"),
    ]


def test_a_filesystem_that_cannot_tell_its_holes_gives_the_same_skeleton(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attrs, specs, _ = sample_specs()
    expected = build(attrs, specs)
    seek = os.lseek

    def no_holes(fd: int, pos: int, how: int) -> int:
        if how == os.SEEK_DATA:
            raise OSError(errno.EINVAL, "not supported")
        return seek(fd, pos, how)

    monkeypatch.setattr(skeleton.os, "lseek", no_holes)
    made = build(attrs, specs)
    assert made.size == expected.size and made.extents == expected.extents
    assert skeleton_bytes(made) == skeleton_bytes(expected)
