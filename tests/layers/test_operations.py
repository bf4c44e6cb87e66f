"""The filesystem without a kernel: the FUSE operations of a mount wired as the daemon wires
them (`daemon.wiring.build`), called directly over the devserver, at every level of the tree
(and of an `--s3-only` tree over a real S3 server): names, attributes, errno, bytes."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dclab
import numpy as np
import pyfuse3
import pytest

from dcorfs.daemon.wiring import build
from dcorfs.fs.fuse_ops import Operations
from dcorfs.hdf5.rtdc import RtdcSource
from dcorfs.remote.catalog import Catalog
from dcorfs.settings import MountSettings, S3Credentials

from ..conftest import DevServer, api, info
from ..s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, SeaweedFS

CTX: Any = None  # the request context: no handler of ours reads it


@contextmanager
def wired(tmp_path: Path, **settings: Any) -> Iterator[Operations]:
    ops, _, close = build(
        MountSettings(mountpoint=tmp_path / "mnt", cache_dir=tmp_path / "c", **settings)
    )
    try:
        yield ops
    finally:
        close()


async def walk(ops: Operations, path: str) -> pyfuse3.EntryAttributes:
    inode = pyfuse3.ROOT_INODE
    entry = await ops.getattr(inode, CTX)
    for name in [p for p in path.split("/") if p]:
        entry = await ops.lookup(inode, name.encode(), CTX)
        if entry.st_ino == 0:
            raise FileNotFoundError(path)
        inode = entry.st_ino
    return entry


async def names(ops: Operations, path: str) -> list[str]:
    entry = await walk(ops, path)
    fh = await ops.opendir(entry.st_ino, CTX)
    try:
        return [name for name, _ in ops._dirs[fh]]
    finally:
        await ops.releasedir(fh)


async def read(ops: Operations, path: str) -> bytes:
    entry = await walk(ops, path)
    handle = await ops.open(entry.st_ino, os.O_RDONLY, CTX)
    try:
        data = b""
        while len(data) < entry.st_size or entry.st_size == 0:
            chunk = await ops.read(handle.fh, len(data), 1 << 20)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        await ops.release(handle.fh)


async def errno_of(ops: Operations, path: str) -> int:
    try:
        await walk(ops, path)
    except FileNotFoundError:
        return errno.ENOENT
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return 0


def npy(data: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(data))


async def test_every_level_of_the_tree(devserver: DevServer, tmp_path: Path) -> None:
    entry = next(e for e in info(devserver) if e["dataset"] == "generated" and e["rtdc"])
    stem = entry["name"].rsplit(".", 1)[0]
    with wired(tmp_path, host=devserver.url) as ops:
        assert await names(ops, "/") == [
            ".dcorfs",
            "README.txt",
            "by-id",
            "circles",
            "collections",
            "datasets",
        ]
        assert b"by-id" in await read(ops, "/README.txt")
        assert {"generated", "scalars-only"} <= set(await names(ops, "/datasets"))
        assert await names(ops, "/collections/showcase") == ["generated"]
        assert "generated" in await names(ops, "/circles/public-lab")
        dataset = await names(ops, "/datasets/generated")
        assert {stem, "dataset.json", "notes.txt"} <= set(dataset)
        record = json.loads(await read(ops, "/datasets/generated/dataset.json"))
        assert record["name"] == "generated"
        assert await read(ops, "/datasets/generated/notes.txt") == b"a plain text resource\n"
        directory = f"/datasets/generated/{stem}"
        listed = set(await names(ops, directory))
        assert {"deform.npy", "features.tsv", "metadata.json", "logs", "tables"} <= listed
        with dclab.new_dataset(entry["path"]) as ds:
            deform = npy(await read(ops, f"{directory}/deform.npy"))
            assert np.array_equal(deform, ds["deform"][:])
            if "trace" in listed:
                trace = sorted(await names(ops, f"{directory}/trace"))[0]
                values = npy(await read(ops, f"{directory}/trace/{trace}"))
                assert np.array_equal(values, ds["trace"][trace[: -len(".npy")]][:])
        assert await names(ops, f"/by-id/{entry['id']}") == sorted(listed)
        status = json.loads(await read(ops, "/.dcorfs/status.json"))
        assert status["host"] == devserver.url and status["fuse"]["opens"] >= 4
        assert await errno_of(ops, "/datasets/no-such-dataset") == errno.ENOENT
        assert await errno_of(ops, "/datasets/secret-study") == errno.EACCES
        assert await errno_of(ops, f"{directory}/no-such-feature.npy") == errno.ENOENT


async def test_a_dataset_opened_by_name_is_asked_for_alone(
    fresh_devserver: DevServer, tmp_path: Path
) -> None:
    """A path opened by name asks CKAN for its dataset alone (package_show), never for the
    listing of the whole site (package_search, page by page: thousands of datasets on the
    real DCOR); the listing, once made, takes the node found by name."""
    devserver = fresh_devserver
    entry = next(e for e in info(devserver) if e["dataset"] == "generated" and e["rtdc"])
    directory = f"/datasets/generated/{entry['name'].rsplit('.', 1)[0]}"
    with wired(tmp_path, host=devserver.url) as ops:
        devserver.stats.reset()
        deform = npy(await read(ops, f"{directory}/deform.npy"))
        with dclab.new_dataset(entry["path"]) as ds:
            assert np.array_equal(deform, ds["deform"][:])
        asked = devserver.stats.snapshot()["api"]
        assert asked.get("package_show", 0) >= 1 and "package_search" not in asked
        found = (await walk(ops, "/datasets/generated")).st_ino
        node = ops._nodes[found]
        assert {"generated", "scalars-only"} <= set(await names(ops, "/datasets"))
        assert devserver.stats.snapshot()["api"].get("package_search", 0) >= 1
        assert (await walk(ops, "/datasets/generated")).st_ino == found
        assert ops._nodes[found] is node  # one node for the dataset, its resources opened once
        assert await errno_of(ops, "/datasets/no-such-dataset") == errno.ENOENT


async def test_a_remembered_listing_answers_names_also_while_the_server_is_away(
    data_dir: Path, tmp_path: Path
) -> None:
    """A name the remembered listing of datasets/ has is answered from it, without asking
    CKAN for that dataset alone (package_show, never asked for it): also while the server
    cannot be reached."""
    server = DevServer(data_dir)
    server.start()
    try:
        with wired(tmp_path, host=server.url, timeout=3.0) as ops:
            assert "generated" in await names(ops, "/datasets")
        server.stats.reset()
        with wired(tmp_path, host=server.url, timeout=3.0) as ops:
            assert (await walk(ops, "/datasets/generated")).st_ino
            assert "package_show" not in server.stats.snapshot()["api"]
    finally:
        server.stop()
    with wired(tmp_path, host=server.url, timeout=3.0) as ops:
        assert (await walk(ops, "/datasets/generated")).st_ino
        assert "dataset.json" in await names(ops, "/datasets/generated")


async def test_a_resources_logs_are_asked_once_its_condensed_file_is_found(
    devserver: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resource's listing waits for its logs (a view of them), final once its condensed
    file exists: they are asked as soon as that file is found, while HDF5 describes it (not
    after: a round trip more in a row, behind the HDF5 workers' queue when a dataset's
    resources are opened together)."""
    entry = next(e for e in info(devserver) if e["dataset"] == "generated" and e["rtdc"])
    asked: list[str] = []
    waited: list[bool] = []
    dcserv, scan = Catalog.dcserv, RtdcSource.scan

    def asking(self: Catalog, resource_id: str, query: str, **options: Any) -> Any:
        if query == "logs":
            asked.append(resource_id)
        return dcserv(self, resource_id, query, **options)

    def describing(self: RtdcSource, deadline: float, **options: Any) -> Any:
        if self.kind == "condensed":  # (its key: …/condensed/<id[:3]>/<id[3:6]>/<id[6:]>)
            resource_id = "".join(self.remote.obj.key.split("/")[-3:])
            until = time.monotonic() + 10
            while resource_id not in asked and time.monotonic() < until:
                time.sleep(0.01)
            waited.append(resource_id in asked)
        return scan(self, deadline, **options)

    monkeypatch.setattr(Catalog, "dcserv", asking)
    monkeypatch.setattr(RtdcSource, "scan", describing)
    # (the patched description waits in a thread of the `ask` pool for the logs asked in
    # another: more than one thread)
    with wired(tmp_path, host=devserver.url, ask_threads=8) as ops:
        assert "logs" in await names(ops, f"/by-id/{entry['id']}")
    assert waited == [True]


async def test_the_s3_only_tree(seaweedfs: SeaweedFS, devserver: DevServer, tmp_path: Path) -> None:
    _, body = api(devserver, "organization_list", all_fields="true")
    circle = {c["name"]: c["id"] for c in body["result"]}["public-lab"]
    entries = [e for e in info(devserver) if not e["private"] and e["rtdc"]]
    with wired(
        tmp_path,
        s3_endpoint=seaweedfs.url,
        s3_credentials=S3Credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY),
        s3_only=True,
        circles=(circle,),
    ) as ops:
        assert await names(ops, "/") == [".dcorfs", "README.txt", "by-id", "circles"]
        assert await names(ops, "/circles") == [circle]
        listed = await names(ops, f"/circles/{circle}")
        assert {e["id"] for e in entries} <= set(listed)
        entry = entries[0]
        with dclab.new_dataset(entry["path"]) as ds:
            deform = npy(await read(ops, f"/circles/{circle}/{entry['id']}/deform.npy"))
            assert np.array_equal(deform, ds["deform"][:])
        assert await errno_of(ops, f"/circles/{circle}/no-such-id") == errno.ENOENT
