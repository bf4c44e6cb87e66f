"""The `contour` feature: `contour/points.npy` + `contour/offsets.npy` and `events/contour` in
the synthesized .rtdc, through real mounts, against what dclab reads from the local file; and
the pieces (offsets, byte ranges to events, the skeleton's contour datasets) without mounts."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dclab
import h5py
import numpy as np
import pytest

from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.derived import DerivedCache
from dcorfs.cache.identity import ObjectId
from dcorfs.devserver.datadir import write_json
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.devserver.server import DevServer
from dcorfs.errors import ProtocolError
from dcorfs.fs.content import StaticContent
from dcorfs.fs.producers.rtdc_file import _joined, contour_parts
from dcorfs.hdf5.contour import (
    GROUP,
    Contour,
    _packed,
    _unpacked,
    contour_of,
    events_of,
    offsets_of,
    register_points,
)
from dcorfs.hdf5.rtdc import RemoteFile, RtdcResource, RtdcSource
from dcorfs.hdf5.skeleton import Spec, build

from ..conftest import FIXTURES, ServerProcess, resource_dir, rtdc_entries
from ..mounts import eventually, mounted, needs_fuse, remembered_keys

FIELD = FIXTURES / "calibration_beads_47.rtdc"
needs_field = pytest.mark.skipif(
    not FIELD.is_file(), reason=f"field fixture {FIELD.name} not found in {FIXTURES}"
)
H5DUMP = "" if shutil.which("h5dump") else "hdf5-tools (h5dump) not installed"
WARNINGS = pytest.mark.filterwarnings(
    "ignore::dclab.rtdc_dataset.config.WrongConfigurationTypeWarning"
)

# -- the pieces ---------------------------------------------------------------------------------


def test_offsets_start_at_zero_and_sum_the_lengths() -> None:
    offsets = offsets_of(np.array([3, 0, 5, 1]))
    assert offsets.dtype == np.int64
    assert offsets.tolist() == [0, 3, 3, 8, 9]
    assert offsets_of(np.zeros(0, np.int64)).tolist() == [0]


def test_a_byte_range_names_the_events_that_cover_it() -> None:
    offsets = offsets_of(np.array([3, 0, 5, 1]))  # points of events: 0-2, -, 3-7, 8
    assert events_of(offsets, 0, 9) == (0, 4)
    assert events_of(offsets, 0, 1) == (0, 1)
    assert events_of(offsets, 2, 4) == (0, 3)  # the empty event 1 lies in between
    assert events_of(offsets, 3, 4) == (2, 3)  # not the empty event 1 at the same offset
    assert events_of(offsets, 8, 9) == (3, 4)
    leading = offsets_of(np.array([0, 0, 2]))
    assert events_of(leading, 0, 1) == (2, 3)


def test_remembered_lengths_come_back_and_are_checked() -> None:
    lengths = np.array([50, 61, 0, 7], dtype=np.int64)
    packed = _packed(lengths)
    assert isinstance(packed["lengths"], str)  # JSON
    assert np.array_equal(_unpacked(packed, 4), lengths)
    with pytest.raises(Exception, match="4 events"):
        _unpacked(packed, 5)


def _contours(lengths: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 250, (n, 2)).astype(np.int64) for n in lengths]


def _assembled(lengths: list[int], *, split: bool) -> tuple[bytes, list[np.ndarray]]:
    """A file built as the synthesized .rtdc builds its contour (skeleton + parts)."""
    contours = _contours(lengths)
    offsets = offsets_of(np.array(lengths))
    dtype = np.dtype("<i8")
    specs = [Spec(f"{GROUP}/{i}", dtype, (n, 2)) for i, n in enumerate(lengths)]
    skeleton = build({}, specs, ["events"])
    extents = skeleton.extents if split else _joined(skeleton.extents, len(lengths))
    assert (GROUP in extents) is not split
    points = np.concatenate(contours) if contours else np.zeros((0, 2), dtype)
    parts = contour_parts(extents, offsets, 16, StaticContent(points.tobytes()))
    data = bytearray(skeleton.size)
    for offset, run in skeleton.runs:
        data[offset : offset + len(run)] = run
    for offset, part in parts:
        data[offset : offset + part.size] = part.read(0, part.size, deadline=0)
    return bytes(data), contours


@pytest.mark.parametrize("split", [False, True])
def test_skeleton_contour_datasets_hold_the_points(split: bool) -> None:
    lengths = [5, 0, 12, 1, 0, 30]  # events without points: no storage, no extent
    data, contours = _assembled(lengths, split=split)
    with h5py.File(io.BytesIO(data), "r") as h5:
        group = h5[GROUP]
        assert len(group) == len(lengths)
        for i, expected in enumerate(contours):
            assert group[str(i)].shape == (lengths[i], 2)
            assert np.array_equal(group[str(i)][()], expected)


def test_contour_parts_refuse_a_skeleton_that_does_not_fit() -> None:
    offsets = offsets_of(np.array([2, 3]))
    points = StaticContent(bytes(16 * 5))
    with pytest.raises(Exception, match="does not fit"):
        contour_parts({GROUP: (4096, 16 * 4)}, offsets, 16, points)
    with pytest.raises(Exception, match="event 1"):
        contour_parts({f"{GROUP}/0": (4096, 32)}, offsets, 16, points)


class _Fetches:
    """A local file as a remote object: counts the fetches."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls = 0

    def __call__(self, obj: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        self.calls += 1
        return self.data[start:stop]


@WARNINGS
def test_points_are_read_across_odd_block_boundaries(tmp_path: Path) -> None:
    path = write_rtdc(
        tmp_path / "c.rtdc",
        SampleSpec(events=50, seed=4, images=False, traces=False, contour=True),
    )
    fetches = _Fetches(path.read_bytes())
    obj = ObjectId(key="lab/c.rtdc", etag="1", size=len(fetches.data))
    remote = BlockCache(fetch=fetches, store=None, block_size=4096)
    derived = DerivedCache(store=None, block_size=1000)  # not a multiple of a point's 16 bytes
    source = RtdcSource(RemoteFile(remote, obj, timeout=30), kind="resource")
    try:
        source.features = source.scan(time.monotonic() + 30)
        assert source.features["contour"].shape == (50, 2)
        resource = RtdcResource(source, None, 50, derived)
        assert "contour" not in resource.features  # not a feature of one row per event
        contour = contour_of(resource)
        assert contour is not None and contour.events == 50
        remembered: dict[str, Any] = {}

        def remember(key: str, make: Any) -> Any:
            return remembered.setdefault(key, make(time.monotonic() + 30))

        offsets = contour.offsets(remember)
        assert list(remembered) == [contour.remembered_as()]
        assert np.array_equal(contour.offsets(remember), offsets)  # from what is remembered
        points = register_points(derived, contour, offsets)
        expected = _expected(str(path))
        assert points.size == 16 * sum(len(c) for c in expected)
        for start in (0, 999, 1000, 5003):  # reads of any bytes, blocks made on demand
            got = derived.read(points, start, points.size, deadline=time.monotonic() + 30)
            assert got == np.concatenate(expected).tobytes()[start:]
        assert contour_of(RtdcResource(source, None, 51, derived)) is None  # fewer than events
        assert Contour(source, contour.dtype, 30).offsets(remember).shape == (31,)  # cut
    finally:
        source.close()
        derived.close()
        remote.close()


@WARNINGS
def test_a_contour_without_an_events_dataset_is_one_clear_error(tmp_path: Path) -> None:
    path = write_rtdc(
        tmp_path / "c.rtdc", SampleSpec(events=8, seed=4, images=False, traces=False, contour=True)
    )
    with h5py.File(path, "a") as h5:
        del h5[f"{GROUP}/3"]
    data = path.read_bytes()
    obj = ObjectId(key="lab/c.rtdc", etag="1", size=len(data))
    remote = BlockCache(fetch=_Fetches(data), store=None, block_size=4096)
    source = RtdcSource(RemoteFile(remote, obj, timeout=30), kind="resource")
    try:
        source.features = source.scan(time.monotonic() + 30)
        contour = Contour(source, source.features["contour"].dtype, 8)
        with pytest.raises(ProtocolError, match=r"lab/c.rtdc: events/contour has no dataset 3 "):
            contour.lengths(time.monotonic() + 30)
    finally:
        source.close()
        remote.close()


# -- through a mount ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("contour-data")
    write_json(root / "dcor.json", {"users": {}})
    generated = root / "lab" / "contours"
    write_json(generated / "dataset.json", {"title": "Contours"})
    write_rtdc(  # as files written before masks were stored: the contour only
        generated / "C001_data.rtdc",
        SampleSpec(events=70, seed=21, images=False, traces=False, contour=True),
    )
    write_rtdc(
        generated / "C002_data.rtdc",
        SampleSpec(events=45, seed=22, traces=False, contour=True, image_shape=(40, 120)),
    )
    if FIELD.is_file():
        field = root / "lab" / "field"
        write_json(field / "dataset.json", {"title": "From the field"})
        (field / FIELD.name).symlink_to(FIELD)
    with DevServer(root):  # condensed (as DCOR does) before the server process serves it
        pass
    return root


@pytest.fixture(scope="module")
def contour_server(contour_data: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(contour_data)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def contour_mount(
    contour_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("contour-mount")
    with mounted(root / "mnt", contour_server.url, root / "cache") as mnt:
        yield mnt


def _entry(server: ServerProcess, dataset: str, name: str) -> dict[str, Any]:
    for entry in rtdc_entries(server):
        if entry["dataset"] == dataset and entry["name"] == name:
            return entry
    raise LookupError(f"{dataset}/{name} is not served")


CASES = [
    pytest.param(("contours", "C001_data.rtdc"), id="contour-only"),
    pytest.param(("contours", "C002_data.rtdc"), id="contour-and-mask"),
    pytest.param(("field", FIELD.name), id="field-fixture", marks=needs_field),
]


def _expected(path: str) -> list[np.ndarray]:
    with dclab.new_dataset(path) as ds:
        assert "contour" in ds.features_innate
        return [np.asarray(ds["contour"][i]) for i in range(len(ds))]


@needs_fuse
@pytest.mark.fuse
@WARNINGS
@pytest.mark.parametrize("case", CASES)
def test_points_and_offsets_hold_every_events_contour(
    contour_mount: Path, contour_server: ServerProcess, case: tuple[str, str]
) -> None:
    entry = _entry(contour_server, *case)
    directory = resource_dir(contour_mount, entry)
    assert "contour" in {p.name for p in directory.iterdir()}
    assert not (directory / "contour.npy").exists()
    assert sorted(p.name for p in (directory / "contour").iterdir()) == [
        "offsets.npy",
        "points.npy",
    ]
    expected = _expected(entry["path"])
    points = np.load(directory / "contour" / "points.npy")
    offsets = np.load(directory / "contour" / "offsets.npy")
    assert offsets.dtype == np.int64 and offsets.shape == (len(expected) + 1,)
    assert offsets[0] == 0 and points.shape == (offsets[-1], 2)
    assert points.dtype == expected[0].dtype
    for i, contour in enumerate(expected):
        assert np.array_equal(points[offsets[i] : offsets[i + 1]], contour), i
    # read again, memory-mapped (the values now from the cache)
    mapped = np.load(directory / "contour" / "points.npy", mmap_mode="r")
    assert np.array_equal(mapped[-5:], expected[-1][-5:])


def _synthesized(mnt: Path, entry: dict[str, Any]) -> Path:
    directory = resource_dir(mnt, entry)
    return directory / f"{directory.name}.rtdc"


@needs_fuse
@pytest.mark.fuse
@WARNINGS
@pytest.mark.parametrize("case", CASES)
def test_dclab_reads_the_contour_of_the_synthesized_file(
    contour_mount: Path, contour_server: ServerProcess, case: tuple[str, str]
) -> None:
    entry = _entry(contour_server, *case)
    expected = _expected(entry["path"])
    with dclab.new_dataset(_synthesized(contour_mount, entry)) as ours:
        assert "contour" in ours.features_innate
        assert len(ours["contour"]) == len(expected)
        for i, contour in enumerate(expected):
            mine = np.asarray(ours["contour"][i])
            assert mine.dtype == contour.dtype and np.array_equal(mine, contour), i
        if "mask" in ours.features_innate:  # the contour agrees with the mask it came with
            with dclab.new_dataset(entry["path"]) as source:
                assert np.array_equal(ours["mask"][0], source["mask"][0])


@needs_fuse
@pytest.mark.fuse
@pytest.mark.skipif(bool(H5DUMP), reason=H5DUMP or "ok")
@pytest.mark.parametrize("case", CASES)
def test_h5dump_reads_the_synthesized_structure(
    contour_mount: Path, contour_server: ServerProcess, case: tuple[str, str]
) -> None:
    entry = _entry(contour_server, *case)
    dumped = subprocess.run(
        ["h5dump", "-H", str(_synthesized(contour_mount, entry))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert dumped.returncode == 0, dumped.stderr
    assert 'GROUP "contour"' in dumped.stdout and 'DATASET "0"' in dumped.stdout


@WARNINGS
@pytest.mark.parametrize("case", CASES[:1])
def test_dclab_dcor_client_reads_the_contour_the_devserver_serves(
    contour_server: ServerProcess, case: tuple[str, str]
) -> None:
    """The generated contour-only file, as dclab's own DCOR client reads it from the devserver
    (the devserver is faithful for it)."""
    entry = _entry(contour_server, *case)
    expected = _expected(entry["path"])
    host = contour_server.url.split("://", 1)[1]
    with dclab.new_dataset(entry["id"], host=host, use_ssl=False) as remote:
        assert "contour" in remote.features
        for i in (0, 1, len(expected) - 1):
            assert np.array_equal(remote["contour"][i], expected[i]), i


def test_listing_a_dataset_does_not_build_the_rtdc_of_resources_with_a_contour(
    contour_server: ServerProcess, tmp_path: Path
) -> None:
    """Preparing a listed dataset's resources opens them (their features are remembered) but
    leaves the synthesized `.rtdc` of a resource with a contour (its build reads every
    event's number of points) to whoever looks at it."""
    dataset = _entry(contour_server, "contours", "C001_data.rtdc")["dataset"]
    cache = tmp_path / "cache"
    with mounted(tmp_path / "mnt", contour_server.url, cache) as mnt:
        assert list((mnt / "datasets" / dataset).iterdir())
        # both files of both resources described
        assert eventually(lambda: len(remembered_keys(cache, "rtdc-features:")) >= 4)
        time.sleep(2.0)  # a build would have been started with the opening
        assert remembered_keys(cache, "rtdc-skeleton:") == []
        listed = {p.name for p in (mnt / "datasets" / dataset / "C001_data").iterdir()}
        assert "C001_data.rtdc" in listed  # whoever lists the directory has it built
        assert len(remembered_keys(cache, "rtdc-skeleton:")) == 1
