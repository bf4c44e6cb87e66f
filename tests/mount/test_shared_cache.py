"""Real mounts sharing one cache tier (#21): SeaweedFS as the site's S3 store, the devserver as
DCOR (its counters say which object bytes it served), each mount with a local cache of its own.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from dcorfs.cache.identity import ObjectId
from dcorfs.devserver.server import DevServer
from dcorfs.remote.shared import identity_digest, object_digest, unseal

from ..conftest import TOKENS, info, resource_dir, weed_or_skip
from ..mounts import log_lines, mounted, needs_fuse, read_file
from ..s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, SeaweedFS
from .test_s3_mount import read_resources, status

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.slow]
SHARED_ENV = {
    "DCORFS_SHARED_CACHE_ACCESS_KEY_ID": ACCESS_KEY_ID,
    "DCORFS_SHARED_CACHE_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
}
PREFIX = "site/dcorfs"


def new_bucket(store: SeaweedFS) -> str:
    name = f"shared-{uuid.uuid4().hex[:12]}"
    store.client().create_bucket(Bucket=name)
    return name


def tier(store: SeaweedFS, bucket: str, *more: str) -> tuple[str, ...]:
    return (
        "--shared-cache",
        f"s3://{bucket}/{PREFIX}",
        "--shared-cache-endpoint",
        store.url,
        *more,
    )


def stored(store: SeaweedFS, bucket: str) -> dict[str, bytes]:
    client = store.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for entry in page.get("Contents", []):
            found[entry["Key"]] = client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
    return found


def settled(mnt: Path, seconds: float = 60.0) -> dict[str, Any]:
    """The mount's shared tier figures once nothing is queued and nothing moved for a while
    (background opening and warming done, every upload made)."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        shared: dict[str, Any] = status(mnt)["shared"]
        now = (shared["pending"], shared["dcor_bytes"], shared["uploads"], shared["hits"])
        if shared["pending"] == 0 and now == last:
            return shared
        last = now
        time.sleep(1.0)
    raise AssertionError(f"uploads still queued after {seconds} s: {status(mnt)['shared']}")


def public_entries(server: DevServer) -> list[dict[str, Any]]:
    """The resources of the public datasets with generated files (RT-DC and others)."""
    return [e for e in info(server) if e["dataset"] in ("generated", "scalars-only", "dcnum-pairs")]


def object_bytes(server: DevServer) -> int:
    return int(server.stats.snapshot()["object_bytes"])


def test_three_mounts_share_one_tier(
    seaweedfs: SeaweedFS, fresh_devserver: DevServer, tmp_path: Path
) -> None:
    """The first mount reads the datasets from DCOR and fills the tier; the second and third,
    each with an empty cache of its own, read the same files with not one object byte from
    DCOR and get the same bytes. The bytes per source are written to shared-figures.json."""
    server = fresh_devserver
    bucket = new_bucket(seaweedfs)
    entries = public_entries(server)
    options = tier(seaweedfs, bucket)
    figures: dict[str, Any] = {}
    with mounted(tmp_path / "m0", server.url, tmp_path / "c0") as m0:  # no tier: the baseline
        server.stats.reset()
        baseline = read_resources(m0, entries)
        figures["without_tier"] = {"devserver_object_bytes": object_bytes(server)}
    with (
        mounted(tmp_path / "m1", server.url, tmp_path / "c1", *options, env=SHARED_ENV) as m1,
        mounted(tmp_path / "m2", server.url, tmp_path / "c2", *options, env=SHARED_ENV) as m2,
        mounted(tmp_path / "m3", server.url, tmp_path / "c3", *options, env=SHARED_ENV) as m3,
    ):
        server.stats.reset()
        first = read_resources(m1, entries)
        figures["m1"] = {**settled(m1), "devserver_object_bytes": object_bytes(server)}
        for name, mnt in (("m2", m2), ("m3", m3)):
            server.stats.reset()
            assert read_resources(mnt, entries) == first
            shared = settled(mnt)
            figures[name] = {**shared, "devserver_object_bytes": object_bytes(server)}
            assert object_bytes(server) == 0, server.stats.snapshot()["objects"]
            assert shared["dcor_bytes"] == 0 and shared["misses"] == 0 and shared["hits"] > 0
            assert shared["uploads"] == 0 and shared["errors"] == 0
            metrics = (mnt / ".dcorfs" / "status.json").read_text()
            assert json.loads(metrics)["shared"]["hit_bytes"] == shared["hit_bytes"]
    assert first == baseline
    assert len(first) > 30 and sum(map(len, first.values())) > 1 << 20
    assert figures["m1"]["uploads"] > 0 and figures["m1"]["errors"] == 0
    # what DCOR served the first: its fetches (with the pieces it completed) and size probes
    assert figures["m1"]["devserver_object_bytes"] >= figures["m1"]["dcor_bytes"]
    figures["files"], figures["file_bytes"] = len(first), sum(map(len, first.values()))
    (tmp_path / "shared-figures.json").write_text(json.dumps(figures, indent=1))
    print("shared tier figures:", json.dumps(figures, indent=1))


def fill(server: DevServer, store: SeaweedFS, bucket: str, where: Path) -> dict[str, bytes]:
    """One mount reads the public datasets and fills the tier; their files' bytes."""
    entries = public_entries(server)
    options = tier(store, bucket)
    with mounted(where / "fill", server.url, where / "fill-cache", *options, env=SHARED_ENV) as mnt:
        contents = read_resources(mnt, entries)
        settled(mnt)
    return contents


def test_a_damaged_piece_is_skipped_and_written_again(
    seaweedfs: SeaweedFS, fresh_devserver: DevServer, tmp_path: Path
) -> None:
    server = fresh_devserver
    bucket = new_bucket(seaweedfs)
    truth = fill(server, seaweedfs, bucket, tmp_path)
    pieces = {k: v for k, v in stored(seaweedfs, bucket).items() if "/identity/" not in k}
    client = seaweedfs.client()
    damaged = sorted(pieces)[:3]
    for key in damaged:  # one byte of the payload flipped: the header still looks right
        body = bytearray(pieces[key])
        body[-1] ^= 0x5A
        client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    options = tier(seaweedfs, bucket)
    with mounted(tmp_path / "m", server.url, tmp_path / "c", *options, env=SHARED_ENV) as mnt:
        server.stats.reset()
        assert read_resources(mnt, public_entries(server)) == truth
        shared = settled(mnt)
        # each damaged piece detected (one may be met twice before it is written again),
        # skipped: its bytes from DCOR (with the piece completed), written again
        assert shared["corrupt"] >= len(damaged), shared
        assert shared["uploads"] >= len(damaged)
        assert 0 < shared["dcor_bytes"] <= 2 * shared["corrupt"] << 20
        assert status(mnt)["fuse"].get("errors", 0) == 0
    assert len(log_lines(tmp_path / "c", "is damaged")) == shared["corrupt"]
    after = stored(seaweedfs, bucket)
    for key in damaged:
        assert after[key] == pieces[key]
        digest, offset = bytes.fromhex(key.split("/")[-3]), int(key.split("/")[-1]) << 20
        assert unseal(after[key], digest, offset)


def test_reads_go_on_from_dcor_when_the_tier_stops(
    fresh_devserver: DevServer, tmp_path: Path
) -> None:
    """A store of its own, stopped while a mount reads from it: the reads go on from DCOR,
    no error, no wrong byte."""
    server = fresh_devserver
    store = SeaweedFS(tmp_path / "seaweedfs", weed_or_skip())
    store.start()
    try:
        bucket = new_bucket(store)
        truth = fill(server, store, bucket, tmp_path)
        entries = public_entries(server)
        options = tier(store, bucket)
        with mounted(tmp_path / "m", server.url, tmp_path / "c", *options, env=SHARED_ENV) as mnt:
            server.stats.reset()
            half = len(entries) // 2
            got = read_resources(mnt, entries[:half])
            assert status(mnt)["shared"]["hits"] > 0 and object_bytes(server) == 0
            # then a large file, the store stopped after its first MiB
            big = max(
                (p for e in entries[half:] if e["rtdc"] for p in resource_dir(mnt, e).rglob("*")),
                key=lambda p: p.stat().st_size,
            )
            with big.open("rb") as stream:
                head = stream.read(1 << 20)
                store.stop()
                rest = stream.read()
            assert head + rest == read_file(big)
            got.update(read_resources(mnt, entries[half:]))
            assert got == truth
            report = status(mnt)
            assert report["fuse"].get("errors", 0) == 0, report["recent_errors"]
            assert report["shared"]["errors"] >= 1 and not report["shared"]["up"]
            assert object_bytes(server) > 0  # the rest came from DCOR
        assert log_lines(tmp_path / "c", "reads go to DCOR")
    finally:
        store.stop()
    # a mount whose tier is gone from the start: a warning, then DCOR
    with mounted(tmp_path / "m", server.url, tmp_path / "c2", *options, env=SHARED_ENV) as mnt:
        assert read_resources(mnt, entries[:1]) == {
            k: v for k, v in truth.items() if k.startswith(entries[0]["id"])
        }


def test_private_objects_stay_out_unless_opted_in(
    seaweedfs: SeaweedFS, fresh_devserver: DevServer, tmp_path: Path
) -> None:
    """A mount with a token reads a private dataset: nothing of it reaches the tier without
    --shared-cache-private; with it, its pieces do (under private/, named by a hash of the
    key and the ETag, never with an identity record); a mount without a token cannot reach
    them: it is never told the dataset, its objects or their ETags."""
    server = fresh_devserver
    assert server.site is not None
    bucket = new_bucket(seaweedfs)
    entries = [e for e in info(server) if e["dataset"] == "secret-study"]
    assert entries and all(e["private"] for e in entries)
    secret = [
        ObjectId(f"{o.bucket}/{o.key}", o.etag, o.size)
        for o in server.site.objects.values()
        if any(o.resource_id == e["id"] for e in entries)
    ]
    names = {object_digest(o).hex() for o in secret} | {
        identity_digest(o.key).hex() for o in secret
    }

    def secret_keys() -> list[str]:
        return [k for k in stored(seaweedfs, bucket) if any(n in k for n in names)]

    token = TOKENS["alice"]
    options = tier(seaweedfs, bucket)
    with mounted(
        tmp_path / "m", server.url, tmp_path / "c1", *options, token=token, env=SHARED_ENV
    ) as mnt:
        truth = read_resources(mnt, entries)
        settled(mnt)
        assert status(mnt)["shared"]["misses"] == 0  # not even looked up
    assert truth and secret_keys() == []
    opted = (*options, "--shared-cache-private")
    with mounted(
        tmp_path / "m", server.url, tmp_path / "c2", *opted, token=token, env=SHARED_ENV
    ) as mnt:
        assert read_resources(mnt, entries) == truth
        assert settled(mnt)["uploads"] > 0
    assert log_lines(tmp_path / "c2", "--shared-cache-private")
    found = secret_keys()
    assert found and all(k.startswith(f"{PREFIX}/v1/private/") for k in found)
    assert not any("/identity/" in k for k in found)
    # without a token (even opted in): the dataset is not there, nothing is read of the tier
    server.stats.reset()
    with mounted(tmp_path / "m", server.url, tmp_path / "c3", *opted, env=SHARED_ENV) as mnt:
        for entry in entries:
            with pytest.raises((FileNotFoundError, PermissionError)):  # CKAN: 403
                resource_dir(mnt, entry).stat()
            with pytest.raises((FileNotFoundError, PermissionError)):
                (mnt / "by-id" / entry["id"] / "deform.npy").read_bytes()
        shared = status(mnt)["shared"]
        assert shared["hits"] == shared["misses"] == shared["identities"] == 0, shared
    assert server.stats.snapshot()["object_requests"] == 0
