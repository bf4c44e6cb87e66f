"""Real mounts against a devserver that behaves like DCOR in motion (doc/DCOR.md §1, §2, §7):
condensed files missing or appearing late, resource fields and the public tag set late."""

from __future__ import annotations

import dataclasses
import errno
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dclab
import numpy as np
import pytest

from dcorfs.cache.metastore import FOREVER, Memo, MetaStore
from dcorfs.devserver.server import DevServer
from dcorfs.devserver.site import SiteOptions
from dcorfs.remote.catalog import Catalog
from dcorfs.remote.dcserv import DcorApi
from dcorfs.remote.http import Http

from ..conftest import (
    LAG,
    TOKENS,
    innate_features,
    lag_over,
    resource,
    resource_dir,
    rtdc_entries,
)
from ..mounts import eventually, log_lines, mounted, needs_fuse

pytestmark = [
    needs_fuse,
    pytest.mark.fuse,
    # a field fixture stores `roi position x` as a float; dclab says so when opening it
    pytest.mark.filterwarnings("ignore::dclab.rtdc_dataset.config.WrongConfigurationTypeWarning"),
]
REFRESH = "2"  # --dir-cache-time of the mounts that watch things appear


@contextmanager
def serving(data_dir: Path, devserver: DevServer, **options: Any) -> Iterator[DevServer]:
    """A devserver of its own in a mode; `devserver` (the session's) has condensed already."""
    assert devserver.site is not None
    with DevServer(data_dir, options=SiteOptions(**options)) as server:
        yield server


@contextmanager
def mounted_in_mode(
    data_dir: Path, devserver: DevServer, tmp_path: Path, **options: Any
) -> Iterator[tuple[DevServer, Path]]:
    """`serving` a mode, mounted with listings made again after REFRESH seconds."""
    with (
        serving(data_dir, devserver, **options) as server,
        mounted(
            tmp_path / "mnt", server.url, tmp_path / "cache", "--dir-cache-time", REFRESH
        ) as mnt,
    ):
        yield server, mnt


def feature_files(directory: Path) -> dict[str, Path]:
    files = {p.stem: p for p in directory.glob("*.npy")}
    files.update({f"trace/{p.stem}": p for p in (directory / "trace").glob("*.npy")})
    return files


def truth(ds: Any, name: str) -> np.ndarray:  # type: ignore[type-arg]
    if name.startswith("trace/"):
        return np.asarray(ds["trace"][name.split("/", 1)[1]][:])
    return np.asarray(ds[name][:])


def assert_original_alone(directory: Path, path: str) -> None:
    """The directory offers exactly the features dclab shows of the original (its
    `features_innate`: not those it deems defective in the file and computes anew, e.g. the
    float32 `time` of old files, whose values DCOR's condensed file holds; README "Formats",
    doc/DCOR.md §1), with dclab's values."""
    files = feature_files(directory)
    with dclab.new_dataset(path) as ds:
        innate = innate_features(ds)
        assert set(files) == innate, (path, set(files) ^ innate)
        for name, file in files.items():
            loaded = np.load(file)
            expected = truth(ds, name)
            assert loaded.dtype == expected.dtype, name
            assert np.array_equal(loaded, expected, equal_nan=loaded.dtype.kind == "f"), name
    assert "dclab-condense.txt" not in {p.name for p in (directory / "logs").iterdir()}


def tsv_columns(directory: Path) -> list[str]:
    with (directory / "features.tsv").open() as tsv:
        return [name.strip() for name in tsv.readline().split("\t")]


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
    with mounted_in_mode(data_dir, devserver, tmp_path, condensed_lag=LAG) as (server, mnt):
        directory = resource_dir(mnt, entry)
        assert_original_alone(directory, entry["path"])
        assert "volume" not in tsv_columns(directory)
        lag_over(server)  # DCOR's condensing job has run
        assert eventually((directory / "volume.npy").exists)
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
    with mounted_in_mode(data_dir, devserver, tmp_path, fields_lag=LAG) as (server, mnt):
        directory = resource_dir(mnt, entry)
        with dclab.new_dataset(entry["path"]) as ds:
            for name in ("deform", "volume"):
                assert np.array_equal(np.load(directory / f"{name}.npy"), ds[name][:]), name
        assert not (directory / "image.npy").exists()  # only the original holds it
        assert "image" not in tsv_columns(directory)
        assert (directory / "M001_data.rtdc").stat().st_size > 0
        assert log_lines(tmp_path / "cache", "refuses its file for now")
        lag_over(server)  # the tag is set
        assert eventually((directory / "image.npy").exists)
        with dclab.new_dataset(entry["path"]) as ds:
            for name in ("image", "deform"):
                assert np.array_equal(np.load(directory / f"{name}.npy"), ds[name][:]), name


def test_logs_kept_by_earlier_versions_are_not_taken_for_final(
    devserver: DevServer, tmp_path: Path
) -> None:
    # caches before doc/DCOR.md §7 kept `dcserv:logs:<id>` for good, also an answer from
    # before condensing: the final logs are kept under another key
    entry = resource(devserver, "generated", "M001_data.rtdc")
    memo = Memo(MetaStore(tmp_path / "meta.sqlite3", scope="h|public"))
    stale = {"before-condensing": ["the original's log only"]}
    memo.get(f"dcserv:logs:{entry['id']}", lambda deadline: stale, max_age=FOREVER)
    http = Http()
    try:
        api = DcorApi(http=http, base_url=devserver.url, token=None)
        catalog = Catalog(api=api, memo=memo, dir_cache_time=60)
        assert "dclab-condense" in catalog.dcserv(entry["id"], "logs")
    finally:
        http.close()  # its sockets, not left to the collector (a ResourceWarning elsewhere)


def test_files_the_condensed_file_does_not_change_keep_their_page_cache(
    data_dir: Path, devserver: DevServer, tmp_path: Path
) -> None:
    # without the condensed file only what it would change is made anew after the refresh:
    # image data (the original's alone) stay in the kernel's page cache from one open to
    # the next, also across refreshes of a resource whose condensing failed for good
    entry = resource(devserver, "generated", "M001_data.rtdc")
    with mounted_in_mode(data_dir, devserver, tmp_path, condensed=False) as (server, mnt):
        directory = resource_dir(mnt, entry)
        image = (directory / "image.npy").read_bytes()
        for _ in range(2):
            time.sleep(float(REFRESH) + 0.5)  # the listing is made again
            assert {p.name for p in directory.iterdir()} >= {"image.npy", "deform.npy"}
            served = served_bytes(mnt)
            assert (directory / "image.npy").read_bytes() == image
            # from the page cache, not read again (the kernel may have dropped some pages of
            # it under memory pressure, and the daemon served status.json itself)
            assert served_bytes(mnt) - served < len(image) // 2


def served_bytes(mnt: Path) -> int:
    report = json.loads((mnt / ".dcorfs" / "status.json").read_text())
    return int(report["fuse"]["bytes_served"])


def test_a_file_open_across_the_switch_to_the_condensed_file_keeps_its_bytes(
    data_dir: Path, devserver: DevServer, tmp_path: Path
) -> None:
    # features.tsv is made anew once the condensed file exists (more columns): a handle open
    # before reads the old file to its end, never pages of the new one; a new open the new
    entry = resource(devserver, "generated", "M001_data.rtdc")
    with mounted_in_mode(data_dir, devserver, tmp_path, condensed_lag=LAG) as (server, mnt):
        directory = resource_dir(mnt, entry)
        tsv = directory / "features.tsv"
        before = tsv.read_bytes()
        assert len(before) > 4 * 4096 * 8  # beyond the kernel's read-ahead of a first read
        with tsv.open("rb", buffering=0) as held:
            head = held.read(4096)
            lag_over(server)  # DCOR's condensing job has run
            assert eventually(lambda: "volume" in tsv_columns(directory))
            after = tsv.read_bytes()
            assert after != before
            rest = held.read()
        # compared as booleans: pytest's diff of two large byte strings takes hours
        kept = head + rest == before
        assert kept, f"the held handle read {len(head + rest)} bytes, not the old {len(before)}"
        with tsv.open("rb") as again:
            fresh = again.read() == after
        assert fresh, "a new open did not read the new file"


def test_a_plain_file_refused_for_now_fails_alone_not_its_dataset(
    data_dir: Path, devserver: DevServer, tmp_path: Path
) -> None:
    # objects read anonymously from the store (--s3-endpoint) while DCOR's jobs have not run:
    # a plain resource's record has no size and its object is refused (not tagged public);
    # the dataset directory lists and its RT-DC resources open, the plain file fails alone
    entry = resource(devserver, "generated", "M001_data.rtdc")
    with (
        serving(data_dir, devserver, fields_lag=LAG) as server,
        mounted(
            tmp_path / "mnt",
            server.url,
            tmp_path / "cache",
            "--s3-endpoint",
            server.url,
            "--dir-cache-time",
            REFRESH,
        ) as mnt,
    ):
        dataset = mnt / "datasets" / "generated"
        listed = {p.name for p in dataset.iterdir()}
        assert {"dataset.json", "M001_data"} <= listed and "notes.txt" not in listed
        with pytest.raises(OSError) as refused:
            (dataset / "notes.txt").stat()
        assert refused.value.errno == errno.EACCES
        lag_over(server)  # the tag is set
        assert (dataset / "notes.txt").read_text() == "a plain text resource\n"
        assert eventually(lambda: "notes.txt" in {p.name for p in dataset.iterdir()})
        with dclab.new_dataset(entry["path"]) as ds:
            assert np.array_equal(np.load(resource_dir(mnt, entry) / "deform.npy"), ds["deform"])


def test_a_processed_resource_gets_its_upstreams_features_once_the_upstream_is_tagged(
    data_dir: Path, devserver: DevServer, tmp_path: Path
) -> None:
    # DCOR's jobs tag each upload on its own: the processed file may be public while its raw
    # upstream is not yet (doc/DCOR.md §2, §3). The upstream offers its condensed file's
    # features meanwhile; its image and mask come once the tag is set, without remount
    raw = resource(devserver, "dcnum-pairs", "R001_data.rtdc")
    processed = resource(devserver, "dcnum-pairs", "R001_data_dcn.rtdc")
    with mounted_in_mode(data_dir, devserver, tmp_path) as (server, mnt):
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
        assert eventually((directory / "image.npy").exists)
        with dclab.new_dataset(raw["path"]) as ds:
            assert np.array_equal(np.load(directory / "image.npy"), ds["image"][:])
