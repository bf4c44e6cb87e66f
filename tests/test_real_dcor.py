"""Real mounts against a devserver that behaves like DCOR in motion (doc/DCOR.md §1, §2, §7):
condensed files missing or appearing late, resource fields and the public tag set late."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dclab
import numpy as np
import pytest

from dcorfs.devserver.server import DevServer
from dcorfs.devserver.site import SiteOptions

from .conftest import TOKENS, innate_features, resource, resource_dir, rtdc_entries
from .mounts import log_lines, mounted, needs_fuse

pytestmark = [
    needs_fuse,
    pytest.mark.fuse,
    # a field fixture stores `roi position x` as a float; dclab says so when opening it
    pytest.mark.filterwarnings("ignore::dclab.rtdc_dataset.config.WrongConfigurationTypeWarning"),
]
LAG = 3600.0  # a lag the tests end (`_lag_over`) rather than wait for
REFRESH = "2"  # --dir-cache-time of the mounts that watch things appear


@contextmanager
def serving(data_dir: Path, devserver: DevServer, **options: Any) -> Iterator[DevServer]:
    """A devserver of its own in a mode; `devserver` (the session's) has condensed already."""
    assert devserver.site is not None
    with DevServer(data_dir, options=SiteOptions(**options)) as server:
        yield server


def _lag_over(server: DevServer) -> None:
    """What the server's lags stand for has happened now (DCOR's background jobs ran)."""
    assert server.site is not None
    server.site.started -= LAG


def feature_files(directory: Path) -> dict[str, Path]:
    files = {p.stem: p for p in directory.glob("*.npy")}
    files.update({f"trace/{p.stem}": p for p in (directory / "trace").glob("*.npy")})
    return files


def truth(ds: Any, name: str) -> np.ndarray:  # type: ignore[type-arg]
    if name.startswith("trace/"):
        return np.asarray(ds["trace"][name.split("/", 1)[1]][:])
    return np.asarray(ds[name][:])


def assert_original_alone(directory: Path, path: str) -> None:
    """The directory offers exactly the features stored in the original, with its values:
    dclab's, or for a feature dclab deems defective in the file (and computes anew, e.g. the
    `time` of old files) the stored ones: DCOR's condensed file holds dclab's, not the
    original, see doc/DCOR.md §1."""
    files = feature_files(directory)
    with dclab.new_dataset(path) as ds:
        events = ds.h5file["events"]
        stored = {n for n in events if n not in ("contour", "trace")}
        innate = innate_features(ds)
        assert set(files) == innate | stored, (path, set(files) ^ (innate | stored))
        for name, file in files.items():
            loaded = np.load(file)
            expected = truth(ds, name) if name in innate else events[name][:]
            assert loaded.dtype == expected.dtype, name
            assert np.array_equal(loaded, expected, equal_nan=loaded.dtype.kind == "f"), name
    assert "dclab-condense.txt" not in {p.name for p in (directory / "logs").iterdir()}


def tsv_columns(directory: Path) -> list[str]:
    with (directory / "features.tsv").open() as tsv:
        return [name.strip() for name in tsv.readline().split("\t")]


def eventually(check: Callable[[], bool], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "did not happen in time"
        time.sleep(0.5)


def test_a_missing_condensed_file_opens_from_the_original(
    data_dir: Path, devserver: DevServer, tmp_path: Path
) -> None:
    # DCOR lists the condensed basin although its object does not exist; anonymous GETs of
    # it are refused with 403, which the mount once took for the whole resource (EACCES)
    with (
        serving(data_dir, devserver, condensed=False) as server,
        mounted(tmp_path / "mnt", server.url, tmp_path / "cache") as mnt,
    ):
        entries = rtdc_entries(server)
        assert len(entries) >= 3
        for entry in entries:
            directory = resource_dir(mnt, entry)
            assert_original_alone(directory, entry["path"])
            assert not (directory / "volume.npy").exists()  # only condensing computes it
        assert log_lines(tmp_path / "cache", "no condensed file (yet)")


def test_a_condensed_file_that_appears_is_used_after_the_refresh(
    data_dir: Path, devserver: DevServer, tmp_path: Path
) -> None:
    entry = resource(devserver, "generated", "M001_data.rtdc")
    with (
        serving(data_dir, devserver, condensed_lag=LAG) as server,
        mounted(
            tmp_path / "mnt", server.url, tmp_path / "cache", "--dir-cache-time", REFRESH
        ) as mnt,
    ):
        directory = resource_dir(mnt, entry)
        assert_original_alone(directory, entry["path"])
        assert "volume" not in tsv_columns(directory)
        _lag_over(server)  # DCOR's condensing job has run
        eventually((directory / "volume.npy").exists)
        with dclab.new_dataset(entry["path"]) as ds:
            assert np.array_equal(np.load(directory / "volume.npy"), ds["volume"][:])
            assert np.array_equal(np.load(directory / "deform.npy"), ds["deform"][:])
        assert "dclab-condense.txt" in {p.name for p in (directory / "logs").iterdir()}
        assert "volume" in tsv_columns(directory)
    # a later mount of the same cache: the condensed file at once, nothing stale remembered
    with mounted(tmp_path / "again", server.url, tmp_path / "cache") as mnt:
        directory = resource_dir(mnt, entry)
        assert (directory / "volume.npy").exists()
        assert (directory / "logs" / "dclab-condense.txt").exists()


def test_resources_with_late_fields_open_and_read_right(
    data_dir: Path, devserver: DevServer, tmp_path: Path
) -> None:
    # records without etag, size, sha256, s3_*, url_type and dc:* (DCOR's jobs have not run):
    # what the record lacks is probed; private objects are read with presigned URLs
    private = resource(devserver, "secret-study", "M001_data.rtdc")
    with (
        serving(data_dir, devserver, fields_lag=LAG) as server,
        mounted(tmp_path / "mnt", server.url, tmp_path / "cache", token=TOKENS["alice"]) as mnt,
    ):
        directory = resource_dir(mnt, private)
        with dclab.new_dataset(private["path"]) as ds:
            for name in ("deform", "image", "volume"):
                assert np.array_equal(np.load(directory / f"{name}.npy"), ds[name][:]), name
        notes = mnt / "datasets" / "generated" / "notes.txt"
        assert notes.read_text() == "a plain text resource\n"


def test_a_public_file_refused_for_now_is_read_later_without_remount(
    data_dir: Path, devserver: DevServer, tmp_path: Path
) -> None:
    # until DCOR's job tags the upload public=true, anonymous reads of it get 403; the
    # resource opens from its condensed file meanwhile (its scalar features, as dclab's client
    # shows them: test_devserver_dclab.py) instead of being refused as a whole (EACCES)
    entry = resource(devserver, "generated", "M001_data.rtdc")
    with (
        serving(data_dir, devserver, fields_lag=LAG) as server,
        mounted(
            tmp_path / "mnt", server.url, tmp_path / "cache", "--dir-cache-time", REFRESH
        ) as mnt,
    ):
        directory = resource_dir(mnt, entry)
        with dclab.new_dataset(entry["path"]) as ds:
            for name in ("deform", "volume"):
                assert np.array_equal(np.load(directory / f"{name}.npy"), ds[name][:]), name
        assert not (directory / "image.npy").exists()  # only the original holds it
        assert "image" not in tsv_columns(directory)
        assert (directory / "M001_data.rtdc").stat().st_size > 0
        assert log_lines(tmp_path / "cache", "refuses its file for now")
        _lag_over(server)  # the tag is set
        eventually((directory / "image.npy").exists)
        with dclab.new_dataset(entry["path"]) as ds:
            for name in ("image", "deform"):
                assert np.array_equal(np.load(directory / f"{name}.npy"), ds[name][:]), name


def test_a_processed_resource_gets_its_upstreams_features_once_the_upstream_is_tagged(
    data_dir: Path, devserver: DevServer, tmp_path: Path
) -> None:
    # DCOR's jobs tag each upload on its own: the processed file may be public while its raw
    # upstream is not yet (doc/DCOR.md §2, §3). The upstream offers its condensed file's
    # features meanwhile; its image and mask come once the tag is set, without remount
    raw = resource(devserver, "dcnum-pairs", "R001_data.rtdc")
    processed = resource(devserver, "dcnum-pairs", "R001_data_dcn.rtdc")
    with (
        serving(data_dir, devserver) as server,
        mounted(
            tmp_path / "mnt", server.url, tmp_path / "cache", "--dir-cache-time", REFRESH
        ) as mnt,
    ):
        assert server.site is not None
        objects = server.site.objects
        (key,) = [
            k for k, o in objects.items() if o.resource_id == raw["id"] and o.artifact == "resource"
        ]
        tagged = objects[key]
        objects[key] = dataclasses.replace(tagged, public=False)  # the raw upload: not yet
        directory = resource_dir(mnt, processed)
        assert (directory / "deform.npy").exists()
        assert not (directory / "image.npy").exists()
        assert log_lines(tmp_path / "cache", "refuses its file for now")
        objects[key] = tagged  # DCOR's job tagged it
        eventually((directory / "image.npy").exists)
        with dclab.new_dataset(raw["path"]) as ds:
            assert np.array_equal(np.load(directory / "image.npy"), ds["image"][:])
