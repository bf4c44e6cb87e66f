"""The synthesized .rtdc through a real mount: h5py, dclab and HDF5 1.10's tools read it."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dclab
import h5py
import hdf5plugin  # noqa: F401  (the sources use the Zstd filter)
import numpy as np
import pytest

from ..conftest import ServerProcess, resource_dir, rtdc_entries
from ..mounts import eventually, mounted, needs_fuse, remembered_keys

pytestmark = [
    needs_fuse,
    pytest.mark.fuse,
    pytest.mark.filterwarnings("ignore::dclab.rtdc_dataset.config.WrongConfigurationTypeWarning"),
]
SKELETON = "rtdc-skeleton:"  # `cache.answers.skeleton`
H5TOOLS = "" if shutil.which("h5dump") and shutil.which("h5ls") else "hdf5-tools not installed"
needs_h5tools = pytest.mark.skipif(bool(H5TOOLS), reason=H5TOOLS or "ok")


@pytest.fixture(scope="module")
def mount(
    devserver_process: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("synthesized-mount")
    with mounted(root / "mnt", devserver_process.url, root / "cache") as mnt:
        yield mnt


def entries(server: ServerProcess) -> list[dict[str, Any]]:
    found = rtdc_entries(server)
    assert len(found) >= 3
    return found


def synthesized(mnt: Path, entry: dict[str, Any]) -> Path:
    directory = resource_dir(mnt, entry)
    return directory / f"{directory.name}.rtdc"


def decoded(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def same(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.names:
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def event_datasets(h5: h5py.File) -> dict[str, h5py.Dataset]:
    found: dict[str, h5py.Dataset] = {}
    h5["events"].visititems(
        lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None
    )
    return {n: d for n, d in found.items() if not n.startswith("contour/")}


def test_h5py_reads_every_dataset_equal_to_the_source(
    mount: Path, devserver_process: ServerProcess
) -> None:
    for entry in entries(devserver_process):
        with (
            h5py.File(synthesized(mount, entry), "r") as ours,
            h5py.File(entry["path"], "r") as source,
            dclab.new_dataset(entry["path"]) as ds,
        ):
            assert {k: decoded(v) for k, v in source.attrs.items()} == dict(ours.attrs)
            mine, theirs = event_datasets(ours), event_datasets(source)
            assert set(theirs) <= set(mine), entry["name"]
            for name, data in mine.items():
                assert data.chunks is None and data.compression is None
                values = data[()]
                if name in theirs and same(values, theirs[name][()]):
                    # the source's attributes (DCOR's condensing may add min/max/mean)
                    for key, value in theirs[name].attrs.items():
                        assert same(data.attrs[key], value), (entry["name"], name, key)
                    continue
                # not in the original, or computed anew by DCOR's condensing (e.g. a
                # defective `time`): what dclab reads from the source
                trace = name.split("/", 1)[1] if name.startswith("trace/") else ""
                expected = np.asarray(ds["trace"][trace][:] if trace else ds[name][:])
                if expected.dtype == bool:  # a mask from an upstream resource (basins)
                    values = values.astype(bool)
                assert same(values, expected), (entry["name"], name)
            for group in ("logs", "tables"):
                for name, data in source.get(group, {}).items():
                    assert same(ours[group][name][()], data[()]), (entry["name"], group, name)
                    assert dict(ours[group][name].attrs) == dict(data.attrs)
            assert "basins" not in ours


def test_dclab_reads_what_it_reads_from_the_source(
    mount: Path, devserver_process: ServerProcess
) -> None:
    checked = 0
    for entry in entries(devserver_process):
        with (
            dclab.new_dataset(synthesized(mount, entry)) as ours,
            dclab.new_dataset(entry["path"]) as source,
        ):
            assert set(source.features) - set(ours.features) <= {"contour"}, entry["name"]
            assert ours.config.as_dict() == source.config.as_dict()
            assert {k: list(ours.logs[k]) for k in ours.logs} == {
                k: list(source.logs[k]) for k in source.logs
            }
            assert sorted(ours.tables) == sorted(source.tables)
            for name in source.tables:
                assert same(ours.tables[name][:], source.tables[name][:])
            for feature in ours.features:
                if feature == "trace":
                    for trace in source["trace"]:
                        assert same(ours["trace"][trace][:], source["trace"][trace][:])
                elif feature != "contour":
                    assert same(ours[feature][:], source[feature][:]), (entry["name"], feature)
                    checked += 1
    assert checked > 50


def test_condensed_only_features_are_in_the_file(
    mount: Path, devserver_process: ServerProcess
) -> None:
    entry = next(e for e in entries(devserver_process) if e["dataset"] == "generated")
    with dclab.new_dataset(entry["path"]) as source, h5py.File(synthesized(mount, entry)) as ours:
        assert "volume" not in source.features_innate
        assert np.array_equal(ours["events/volume"][()], source["volume"][:])


def listing(path: Path) -> dict[str, str]:
    """`h5ls -r`: object path → kind and shape (appendable or not alike)."""
    text = subprocess.run(
        ["h5ls", "-r", str(path)], capture_output=True, text=True, check=True
    ).stdout
    found = {}
    for line in text.splitlines():
        name, kind = line.split(None, 1)
        found[name] = re.sub(r"/(Inf|\d+)", "", kind.strip())
    return found


@needs_h5tools
def test_hdf5_1_10_tools_list_the_same_structure(
    mount: Path, devserver_process: ServerProcess
) -> None:
    for entry in entries(devserver_process):
        path = synthesized(mount, entry)
        ours, source = listing(path), listing(Path(entry["path"]))
        left_out = {n for n in source if n.startswith(("/events/contour", "/basin"))}
        for name, kind in source.items():
            if name not in left_out:
                assert ours.get(name) == kind, (entry["name"], name)
        extra = {n for n in ours if n not in source}
        with dclab.new_dataset(entry["path"]) as ds:  # what DCOR's condensing added
            # or, for a dcnum-processed file, its raw upstream resource (traces as `trace`)
            added = {n.removeprefix("/events/").split("/", 1)[0] for n in extra}
            assert added <= set(ds.features), extra
        header = subprocess.run(
            ["h5dump", "-H", str(path)], capture_output=True, text=True, check=False
        )
        assert header.returncode == 0, header.stderr
        assert all(f'"{n.rsplit("/", 1)[-1]}"' in header.stdout for n in ours if n != "/")


@needs_h5tools
def test_h5dump_prints_the_values(mount: Path, devserver_process: ServerProcess) -> None:
    entry = next(e for e in entries(devserver_process) if e["dataset"] == "generated")
    dumped = subprocess.run(
        ["h5dump", "-d", "/events/deform", "-m", "%.17g", "-y", "-w", "0"]
        + [str(synthesized(mount, entry))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = dumped.split("DATA {", 1)[1].split("}", 1)[0]
    values = np.array([float(v) for v in data.replace(",", " ").split()])
    with dclab.new_dataset(entry["path"]) as ds:
        assert np.array_equal(values, ds["deform"][:])


def test_opening_and_one_scalar_move_a_small_fraction(
    devserver_process: ServerProcess, tmp_path: Path
) -> None:
    entry = next(e for e in entries(devserver_process) if e["name"] == "M001_data.rtdc")
    with mounted(tmp_path / "mnt", devserver_process.url, tmp_path / "cache") as mnt:
        devserver_process.stats.reset()
        with dclab.new_dataset(synthesized(mnt, entry)) as ds:
            assert ds["deform"][:].shape == (300,)
        moved = devserver_process.stats.snapshot()["object_bytes"]
        assert 0 < moved < 0.25 * entry["size"], (moved, entry["size"])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_file_is_the_same_on_every_mount(
    devserver_process: ServerProcess, tmp_path: Path
) -> None:
    seen: list[dict[str, Any]] = []
    for run in ("first", "second"):
        with mounted(tmp_path / "mnt", devserver_process.url, tmp_path / run) as mnt:
            paths = {e["id"]: synthesized(mnt, e) for e in entries(devserver_process)}
            sizes = {rid: path.stat().st_size for rid, path in paths.items()}
            small = min(paths, key=lambda rid: sizes[rid])
            seen.append({"sizes": sizes, "digest": digest(paths[small])})
    assert seen[0] == seen[1]


def test_listing_a_dataset_builds_its_resources_synthesized_files_ahead(
    devserver_process: ServerProcess, tmp_path: Path
) -> None:
    """Once a dataset's directory is listed, the structure of every RT-DC resource's
    `.rtdc` is built in the background (an `ls -l` of a resource directory answers with its
    size), before any resource directory is opened."""
    entry = entries(devserver_process)[0]
    expected = {
        e["id"] for e in rtdc_entries(devserver_process) if e["dataset"] == entry["dataset"]
    }

    def built() -> set[str]:
        return {key.split(":")[2] for key in remembered_keys(tmp_path / "cache", SKELETON)}

    with mounted(tmp_path / "mnt", devserver_process.url, tmp_path / "cache") as mnt:
        assert list((mnt / "datasets" / entry["dataset"]).iterdir())
        assert eventually(lambda: built() == expected)
