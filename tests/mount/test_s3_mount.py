"""Real mounts with the S3 bypass (#8): `--s3-endpoint` beside DCOR's API, and `--s3-only`.

Two object stores: the devserver's own (anonymous public access, and the dcserv path over the
same objects), and a real S3 server (SeaweedFS, SigV4 enforced) holding the devserver's
objects under the same buckets and keys: the public circle's bucket publicly readable, the
private circle's not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dclab
import numpy as np
import pytest

from dcorfs.devserver.server import DevServer

from ..conftest import (
    TOKENS,
    api,
    assert_tables,
    info,
    innate_features,
    resource_dir,
    rtdc_entries,
    weed_or_skip,
)
from ..mounts import dcorfs, is_mounted, mounted, needs_fuse, unmount
from ..s3server import (
    ACCESS_KEY_ID,
    CREDENTIALS_ENV,
    SECRET_ACCESS_KEY,
    SeaweedFS,
)
from .test_mount import feature_files, truth

pytestmark = [
    needs_fuse,
    pytest.mark.fuse,
    pytest.mark.filterwarnings("ignore::dclab.rtdc_dataset.config.WrongConfigurationTypeWarning"),
]
WRONG_SECRET_ENV = {**CREDENTIALS_ENV, "DCORFS_S3_SECRET_ACCESS_KEY": "not-the-secret-at-all"}


def circle_ids(server: DevServer) -> dict[str, str]:
    """circle name -> id."""
    _, body = api(server, "organization_list", all_fields="true")
    return {c["name"]: c["id"] for c in body["result"]}


def s3_only(server: DevServer, endpoint: str, *circles: str) -> tuple[str, ...]:
    ids = circle_ids(server)
    options = ["--s3-only", "--s3-endpoint", endpoint]
    for name in circles:
        options += ["--circle", ids[name]]
    return tuple(options)


def status(mnt: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((mnt / ".dcorfs" / "status.json").read_text())
    return report


def assert_features_equal_the_truth(directory: Path, entry: dict[str, Any]) -> int:
    files = feature_files(directory)
    with dclab.new_dataset(entry["path"]) as ds:
        innate = innate_features(ds)
        assert innate <= set(files), f"{entry['name']}: missing {innate - set(files)}"
        for name, path in files.items():
            loaded = np.load(path)
            expected = truth(ds, name)
            assert loaded.shape == expected.shape, (entry["name"], name)
            assert np.array_equal(loaded, expected, equal_nan=loaded.dtype.kind == "f")
    return len(files)


def read_tree(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


# -- --s3-only ---------------------------------------------------------------------------------


def test_s3_only_lists_and_reads_circles(
    seaweedfs: SeaweedFS, devserver: DevServer, tmp_path: Path
) -> None:
    ids = circle_ids(devserver)
    options = s3_only(devserver, seaweedfs.url, "public-lab", "private-lab")
    cache = tmp_path / "cache"
    with mounted(tmp_path / "mnt", None, cache, *options, env=CREDENTIALS_ENV) as mnt:
        assert sorted(p.name for p in mnt.iterdir()) == [
            ".dcorfs",
            "README.txt",
            "by-id",
            "circles",
        ]
        assert "--s3-only" in (mnt / "README.txt").read_text()
        assert sorted(p.name for p in (mnt / "circles").iterdir()) == sorted(ids.values())
        checked = 0
        for entry in info(devserver):
            circle = ids[entry["circle"]]
            directory = mnt / "circles" / circle / entry["id"]
            listed = {p.name for p in directory.parent.iterdir()}
            assert entry["id"] in listed
            if not entry["rtdc"]:  # a plain file: its bytes as `resource`
                assert [p.name for p in directory.iterdir()] == ["resource"]
                assert (directory / "resource").read_bytes() == Path(entry["path"]).read_bytes()
                continue
            checked += assert_features_equal_the_truth(directory, entry)
            assert (directory / f"{entry['id']}.rtdc").is_file()
            _, body = api(
                devserver, "dcserv", TOKENS["alice"], id=entry["id"], query="logs", version="2"
            )
            logs = body["result"]
            assert sorted(p.name for p in (directory / "logs").iterdir()) == sorted(
                f"{name}.txt" for name in logs
            )
            for name, lines in logs.items():
                assert (directory / "logs" / f"{name}.txt").read_text().splitlines() == lines
            metadata = json.loads((directory / "metadata.json").read_text())
            with dclab.new_dataset(entry["path"]) as ds:
                for key in ("sample", "run index", "event count"):
                    assert metadata["experiment"][key] == ds.config["experiment"][key]
                assert metadata["imaging"]["pixel size"] == ds.config["imaging"]["pixel size"]
        assert checked > 30
        # the synthesized file, read by dclab; by-id/ finds resources of every circle
        entry = next(e for e in rtdc_entries(devserver, private=True))
        by_id = mnt / "by-id" / entry["id"]
        with (
            dclab.new_dataset(by_id / f"{entry['id']}.rtdc") as synthesized,
            dclab.new_dataset(entry["path"]) as ds,
        ):
            assert np.array_equal(synthesized["deform"][:], ds["deform"][:])
            assert np.array_equal(synthesized["image"][5], ds["image"][5])
        assert entry["id"] in {p.name for p in (mnt / "by-id").iterdir()}
        with pytest.raises(FileNotFoundError):
            (mnt / "by-id" / "00000000-0000-0000-0000-000000000000").stat()
        with pytest.raises(FileNotFoundError):
            (mnt / "circles" / ids["public-lab"] / "00000000-0000-0000-0000-000000000000").stat()
        report = status(mnt)
        assert report["host"] == seaweedfs.url and report["requests"]["document"] > 0
        pid = report["pid"]
        with Path(f"/proc/{pid}/cmdline").open("rb") as cmdline:
            argv = cmdline.read()
        assert SECRET_ACCESS_KEY.encode() not in argv and ACCESS_KEY_ID.encode() not in argv
    assert_cache_free_of_credentials(cache)


def assert_cache_free_of_credentials(cache: Path) -> None:
    """Neither the secret nor the key id anywhere in the cache dir (blocks, index, metadata
    store, the daemon's log)."""
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".log") for p in files)
    for path in files:
        data = path.read_bytes()
        assert SECRET_ACCESS_KEY.encode() not in data, path
        assert ACCESS_KEY_ID.encode() not in data, path


def test_s3_only_private_objects_need_the_right_credentials(
    seaweedfs: SeaweedFS, devserver: DevServer, tmp_path: Path
) -> None:
    ids = circle_ids(devserver)
    options = s3_only(devserver, seaweedfs.url, "public-lab", "private-lab")
    public = next(e for e in rtdc_entries(devserver) if e["name"] == "M002_data.rtdc")
    private = rtdc_entries(devserver, private=True)[0]
    public_dir = Path("circles", ids["public-lab"], public["id"])
    private_dir = Path("circles", ids["private-lab"], private["id"])
    cache = tmp_path / "cache"
    with mounted(tmp_path / "anon", None, cache, *options) as mnt:
        # anonymous: public objects are readable, by id (the bucket may not be listed)
        with dclab.new_dataset(public["path"]) as ds:
            assert np.array_equal(np.load(mnt / public_dir / "deform.npy"), ds["deform"][:])
        with pytest.raises(PermissionError):
            list((mnt / "circles" / ids["public-lab"]).iterdir())
        with pytest.raises(PermissionError):
            (mnt / private_dir).stat()
        with pytest.raises(PermissionError):
            (mnt / "by-id" / private["id"]).stat()
    for where in ("wrong", "wrong-again"):  # a wrong secret is EACCES, not EIO
        with mounted(tmp_path / where, None, cache, *options, env=WRONG_SECRET_ENV) as mnt:
            with pytest.raises(PermissionError):
                list((mnt / "circles" / ids["private-lab"]).iterdir())
            with pytest.raises(PermissionError):
                (mnt / private_dir).stat()
            with pytest.raises(PermissionError):  # signed requests are checked everywhere
                (mnt / "by-id" / public["id"] / "deform.npy").read_bytes()
            errors = " ".join(e["error"] for e in status(mnt)["recent_errors"])
            assert "SignatureDoesNotMatch" in errors
    with (
        mounted(tmp_path / "key", None, cache, *options, env=CREDENTIALS_ENV) as mnt,
        dclab.new_dataset(private["path"]) as ds,
    ):
        for name in ("deform", "image"):
            assert np.array_equal(np.load(mnt / private_dir / f"{name}.npy"), ds[name][:])
    # then a wrong secret again: what the right one cached (listing, blocks) stays out of reach
    with mounted(tmp_path / "after", None, cache, *options, env=WRONG_SECRET_ENV) as mnt:
        with pytest.raises(PermissionError):
            list((mnt / "circles" / ids["private-lab"]).iterdir())
        with pytest.raises(PermissionError):
            (mnt / private_dir / "deform.npy").read_bytes()
        with pytest.raises(PermissionError):
            (mnt / "by-id" / private["id"] / "deform.npy").read_bytes()
    log = (cache / "dcorfs.log").read_text()
    assert "SignatureDoesNotMatch" in log
    assert_cache_free_of_credentials(cache)


# -- --s3-endpoint beside DCOR's API ---------------------------------------------------------------


def test_objects_come_from_the_endpoint_not_from_dcserv_urls(
    seaweedfs: SeaweedFS, fresh_devserver: DevServer, tmp_path: Path
) -> None:
    """With DCOR's API for the tree and a token for private datasets, every object byte
    comes from the S3 endpoint, signed, also when resources are opened in the background
    (a dataset listed): the devserver serves no object and no basins."""
    server = fresh_devserver
    options = ("--s3-endpoint", seaweedfs.url)
    with mounted(
        tmp_path / "mnt",
        server.url,
        tmp_path / "cache",
        *options,
        token=TOKENS["alice"],
        env=CREDENTIALS_ENV,
    ) as mnt:
        server.stats.reset()
        for dataset in (mnt / "datasets").iterdir():  # opens its resources in the background
            assert list(dataset.iterdir())
        checked = 0
        for entry in rtdc_entries(server) + rtdc_entries(server, private=True):
            checked += assert_features_equal_the_truth(resource_dir(mnt, entry), entry)
        notes = mnt / "datasets" / "generated" / "notes.txt"
        assert notes.read_text() == "a plain text resource\n"
        assert checked > 30
        stats = server.stats.snapshot()
        assert stats["object_requests"] == 0, stats["objects"]
        assert stats["dcserv_queries"].get("basins", 0) == 0
        assert stats["dcserv_queries"]["metadata"] > 0  # the tree is DCOR's
        assert status(mnt)["requests"]["range"] > 0


def read_resources(mnt: Path, entries: list[dict[str, Any]]) -> dict[str, bytes]:
    """Every file of the resources' directories (datasets/ tree of a DCOR mount)."""
    contents = {}
    for entry in entries:
        directory = resource_dir(mnt, entry)
        if entry["rtdc"]:
            contents.update({f"{entry['id']}/{k}": v for k, v in read_tree(directory).items()})
        else:
            contents[entry["id"]] = (directory.parent / entry["name"]).read_bytes()
    return contents


def public_generated(server: DevServer) -> list[dict[str, Any]]:
    return [e for e in info(server) if e["dataset"] in ("generated", "scalars-only")]


def object_requests(server: DevServer) -> int:
    return int(server.stats.snapshot()["object_requests"])


def test_switching_between_dcserv_and_the_devserver_store_reuses_the_cache(
    devserver: DevServer, tmp_path: Path
) -> None:
    """Anonymous public access to the devserver's own object store: the same objects as
    the URLs of dcserv, so the cache serves both ways without one object request. The DCOR
    token of the mount never reaches the object store."""
    entries = public_generated(devserver)
    direct = ("--s3-endpoint", devserver.url)
    authorized = devserver.stats.snapshot()["object_requests_authorized"]
    for first, then in ((), direct), (direct, ()):
        cache = tmp_path / f"cache{len(first)}"
        basins = devserver.stats.snapshot()["dcserv_queries"].get("basins", 0)
        token = TOKENS["alice"]
        with mounted(tmp_path / "mnt", devserver.url, cache, *first, token=token) as mnt:
            truth_ = read_resources(mnt, entries)
        asked = devserver.stats.snapshot()["dcserv_queries"].get("basins", 0) - basins
        assert (asked == 0) == bool(first)  # direct: no basins asked
        before = object_requests(devserver)
        with mounted(tmp_path / "mnt", devserver.url, cache, *then, token=token) as mnt:
            assert read_resources(mnt, entries) == truth_
            assert status(mnt)["requests"].get("range", 0) == 0
            assert status(mnt)["decoded"]["fetches"] == 0  # nor decoded again
        assert object_requests(devserver) == before
    assert len(truth_) > 20
    assert devserver.stats.snapshot()["object_requests_authorized"] == authorized


def test_switching_between_dcserv_and_s3_only_reuses_the_cache(
    seaweedfs: SeaweedFS, devserver: DevServer, tmp_path: Path
) -> None:
    """Blocks and decoded values cached through dcserv's URLs serve an --s3-only mount of
    SeaweedFS (same bucket/key and ETag): no object request, nothing decoded again; the other
    way round, the dcserv path only probes
    each condensed file once (CKAN's records carry no condensed ETag)."""
    entries = [e for e in info(devserver) if e["dataset"] == "generated" and e["rtdc"]]
    only = s3_only(devserver, seaweedfs.url, "public-lab")
    ids = circle_ids(devserver)

    def read_s3(mnt: Path) -> dict[str, bytes]:
        found = {}
        for entry in entries:
            directory = mnt / "circles" / ids["public-lab"] / entry["id"]
            found.update(
                {
                    f"{entry['id']}/{k}": v
                    for k, v in read_tree(directory).items()
                    if not k.endswith(("metadata.json", ".rtdc"))  # the file's own metadata
                }
            )
        return found

    def read_dcor(mnt: Path) -> dict[str, bytes]:
        return {
            k: v
            for k, v in read_resources(mnt, entries).items()
            if not k.endswith(("metadata.json", ".rtdc"))
        }

    cache = tmp_path / "cache-dcor-first"
    with mounted(tmp_path / "mnt", devserver.url, cache) as mnt:
        via_dcor = read_dcor(mnt)
        for entry in entries:  # the synthesized file too (its blocks are the same)
            (resource_dir(mnt, entry) / entry["name"]).read_bytes()
    with mounted(tmp_path / "mnt", None, cache, *only, env=CREDENTIALS_ENV) as mnt:
        assert read_s3(mnt) == via_dcor
        for entry in entries:
            (mnt / "circles" / ids["public-lab"] / entry["id"] / f"{entry['id']}.rtdc").read_bytes()
        requests = status(mnt)["requests"]
        assert requests.get("range", 0) == 0 and requests.get("probe", 0) == 0, requests
        assert requests["document"] > 0  # the listing
        decoded = status(mnt)["decoded"]  # the same decoded values: none decoded again
        assert decoded["fetches"] == 0 and decoded["disk_hits"] > 0, decoded
    cache = tmp_path / "cache-s3-first"
    with mounted(tmp_path / "mnt", None, cache, *only, env=CREDENTIALS_ENV) as mnt:
        assert read_s3(mnt) == via_dcor
    devserver_log = devserver.stats.snapshot(with_log=True)["log"]
    start = len(devserver_log)
    with mounted(tmp_path / "mnt", devserver.url, cache) as mnt:
        assert read_dcor(mnt) == via_dcor
        assert status(mnt)["requests"].get("range", 0) == 0
        assert status(mnt)["decoded"]["fetches"] == 0
    made = [e for e in devserver.stats.snapshot(with_log=True)["log"][start:] if "object" in e]
    assert all("/condensed/" in e["object"] and e["range"][0] == 0 for e in made), made
    assert len(made) <= len(entries)


def test_text_views_of_s3_only_are_well_formed(
    seaweedfs: SeaweedFS, devserver: DevServer, tmp_path: Path
) -> None:
    """tables/ and logs/ made from the files have dcserv's contents."""
    entry = next(e for e in rtdc_entries(devserver) if e["name"] == "M001_data.rtdc")
    ids = circle_ids(devserver)
    options = s3_only(devserver, seaweedfs.url, "public-lab")
    with mounted(tmp_path / "mnt", None, tmp_path / "cache", *options) as mnt:
        directory = mnt / "circles" / ids["public-lab"] / entry["id"]
        _, body = api(devserver, "dcserv", id=entry["id"], query="tables", version="2")
        tables = body["result"]
        assert_tables(directory, tables)


def test_s3_only_serves_the_cache_when_the_store_is_gone(
    devserver: DevServer, tmp_path: Path
) -> None:
    """Listing, identities, file-made texts and blocks are kept: a later --s3-only mount
    starts and reads what was read before with the object store gone."""
    ids = circle_ids(devserver)
    server = SeaweedFS(tmp_path / "seaweedfs", weed_or_skip())
    server.start()
    try:
        assert devserver.site is not None
        public = {e["id"] for e in info(devserver) if not e["private"]}
        server.populate(o for o in devserver.site.objects.values() if o.resource_id in public)
        options = s3_only(devserver, server.url, "public-lab")
        with mounted(
            tmp_path / "mnt", None, tmp_path / "cache", *options, env=CREDENTIALS_ENV
        ) as mnt:
            first = read_tree(mnt / "circles" / ids["public-lab"])
    finally:
        server.stop()
    assert server.process is None
    with mounted(tmp_path / "mnt", None, tmp_path / "cache", *options, env=CREDENTIALS_ENV) as mnt:
        assert read_tree(mnt / "circles" / ids["public-lab"]) == first
    assert len(first) > 30 and any(name.endswith("metadata.json") for name in first)


def test_s3_only_mount_errors_are_one_line(
    seaweedfs: SeaweedFS, devserver: DevServer, tmp_path: Path
) -> None:
    (tmp_path / "mnt").mkdir()
    common = (str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "cache"), "--s3-only")
    missing = "00000000-0000-4000-8000-000000000000"
    no_bucket = dcorfs(
        "mount", *common, "--s3-endpoint", seaweedfs.url, "--circle", missing, env=CREDENTIALS_ENV
    )
    if is_mounted(tmp_path / "mnt"):
        unmount(tmp_path / "mnt", None)
    assert no_bucket.returncode == 2, no_bucket.stderr
    assert f"has no bucket circle-{missing}" in no_bucket.stderr
    gone = dcorfs("mount", *common, "--s3-endpoint", "http://127.0.0.1:9", "--circle", missing)
    assert gone.returncode == 2 and "cannot reach http://127.0.0.1:9" in gone.stderr
    for result in (no_bucket, gone):
        assert len(result.stderr.strip().splitlines()) == 1
    assert not is_mounted(tmp_path / "mnt")
