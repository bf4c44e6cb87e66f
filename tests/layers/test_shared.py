"""The shared cache tier below the mount (`remote.shared`): pieces and their checks, lookups
and uploads on a real S3 store (SeaweedFS, SigV4 enforced), DCOR being the devserver's
object store (the real fetch function of the block cache), who may share, an unreachable
tier, and what the options parse to."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from dcorfs.cache.budget import InFlight, MemoryPlan
from dcorfs.cache.identity import ObjectId
from dcorfs.cli import _settings as settings_of
from dcorfs.cli import build_parser, helper_argv
from dcorfs.daemon.logs import configure
from dcorfs.devserver.server import DevServer
from dcorfs.errors import ConfigError, NotFound
from dcorfs.remote.dcserv import Locator, make_fetch
from dcorfs.remote.http import Http, RetryPolicy
from dcorfs.remote.s3 import sigv4_presigner
from dcorfs.remote.shared import (
    LOOKUP_WAIT,
    PIECE,
    Corrupt,
    SharedTier,
    object_digest,
    seal,
    unseal,
)
from dcorfs.settings import MountSettings, S3Credentials, SharedCache, parse_shared_cache

from ..s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, SeaweedFS

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, read_timeout=5.0)
CREDENTIALS = S3Credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY)


def deadline() -> float:
    return time.monotonic() + 30


# -- pieces ------------------------------------------------------------------------------------


def test_a_piece_is_checked_from_its_own_bytes() -> None:
    obj = ObjectId(key="circle-x/resource/abc/def/ghi", etag="e1", size=3 * PIECE + 5)
    name, payload = object_digest(obj), bytes(range(256)) * 40
    body = seal(name, PIECE, payload)
    assert unseal(body, name, PIECE, len(payload)) == payload
    flipped = bytearray(body)
    flipped[-7] ^= 1
    damaged = {
        "payload": bytes(flipped),
        "short": body[:-1],
        "header": body[:20],
        "magic": b"x" + body[1:],
    }
    for what, bad in damaged.items():
        with pytest.raises(Corrupt):
            unseal(bad, name, PIECE, len(payload))
        assert what
    with pytest.raises(Corrupt):  # another object's (another ETag) or another piece's
        unseal(body, object_digest(ObjectId(obj.key, "e2", obj.size)), PIECE)
    with pytest.raises(Corrupt):
        unseal(body, name, 2 * PIECE)
    with pytest.raises(Corrupt):
        unseal(body, name, PIECE, len(payload) + 1)


def test_shared_cache_options() -> None:
    assert parse_shared_cache("s3://dcorfs-cache/cluster/a/") == ("dcorfs-cache", "cluster/a")
    assert parse_shared_cache("s3://dcorfs-cache") == ("dcorfs-cache", "")
    for bad in ("dcorfs-cache/x", "https://b/x", "s3://B/x", "s3://b", "s3://bucket/a//b"):
        with pytest.raises(ConfigError):
            parse_shared_cache(bad)
    parser = build_parser()
    base = ["mount", "/mnt"]

    def settings(*options: str, env: dict[str, str] | None = None) -> Any:
        args = parser.parse_args([*base, *options])
        with pytest.MonkeyPatch.context() as patch:
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            return settings_of(args, Path("/mnt"))

    cache = ("--shared-cache", "s3://dcorfs-cache/c", "--shared-cache-endpoint", "http://s3:9000")
    shared = settings(*cache).shared_cache
    assert shared.url == "s3://dcorfs-cache/c" and shared.endpoint == "http://s3:9000"
    assert shared.credentials is None and not shared.readonly and not shared.private
    env = {
        "DCORFS_SHARED_CACHE_ACCESS_KEY_ID": "id-1",
        "DCORFS_SHARED_CACHE_SECRET_ACCESS_KEY": "secret-1",
    }
    mount = settings(*cache, "--shared-cache-readonly", "--shared-cache-private", env=env)
    assert mount.shared_cache.credentials == S3Credentials("id-1", "secret-1")
    assert mount.shared_cache.readonly and mount.shared_cache.private
    assert "secret-1" in mount.secrets() and "secret-1" not in repr(mount)
    errors = {
        ("--shared-cache", "s3://dcorfs-cache/c"): "needs --shared-cache-endpoint",
        ("--shared-cache-private",): "--shared-cache-private goes with --shared-cache",
        (*cache[:3], "s3:9000"): "not an S3 endpoint",
        ("--shared-cache", "dcorfs-cache", "--shared-cache-endpoint", "http://s3"): "s3://BUCKET",
    }
    for options, message in errors.items():
        with pytest.raises(ConfigError, match=message):
            settings(*options)
    with pytest.raises(ConfigError, match="set both"):
        settings(*cache, env={"DCORFS_SHARED_CACHE_ACCESS_KEY_ID": "id-1"})
    # fstab options, one to one
    assert helper_argv(
        [
            "dcor.example",
            "/mnt",
            "-o",
            "shared_cache=s3://dcorfs-cache/c,shared_cache_endpoint=http://s3:9000,"
            "shared_cache_credentials=/etc/dcorfs/shared.ini,shared_cache_readonly,"
            "shared_cache_private",
        ]
    ) == [
        "/mnt",
        "--host",
        "dcor.example",
        "--shared-cache",
        "s3://dcorfs-cache/c",
        "--shared-cache-endpoint",
        "http://s3:9000",
        "--shared-cache-credentials",
        "/etc/dcorfs/shared.ini",
        "--shared-cache-readonly",
        "--shared-cache-private",
    ]
    # room for uploads comes out of read-ahead's share, only with a shared tier
    alone, shared_plan = MemoryPlan.of(300 << 20), MemoryPlan.of(300 << 20, shared=True)
    assert alone.uploading == 0 and shared_plan.uploading > 8 * PIECE
    assert shared_plan.prefetch + shared_plan.uploading == pytest.approx(alone.prefetch, abs=2)


# -- on a real store -----------------------------------------------------------------------------


@pytest.fixture
def bucket(seaweedfs: SeaweedFS) -> str:
    name = f"shared-{uuid.uuid4().hex[:12]}"
    seaweedfs.client().create_bucket(Bucket=name)
    return name


def keys(seaweedfs: SeaweedFS, bucket: str) -> list[str]:
    answer = seaweedfs.client().list_objects_v2(Bucket=bucket)
    return sorted(entry["Key"] for entry in answer.get("Contents", []))


class Node:
    """One node's tier over the devserver's object store (DCOR), with a counting fetch."""

    def __init__(
        self,
        devserver: DevServer,
        endpoint: str,
        bucket: str,
        *,
        credentials: S3Credentials | None = CREDENTIALS,
        dcor: bool = True,
        **options: Any,
    ) -> None:
        self.http = Http(policy=FAST)
        self.locator = Locator()
        config = SharedCache(endpoint, bucket, "site/dcorfs", credentials, **options)
        self.tier = SharedTier(http=self.http, config=config, room=InFlight(16 * PIECE))
        self.fetch = self.tier.wrap(make_fetch(self.http, self.locator))
        self.devserver = devserver
        self.dcor = dcor

    def object(self, *, public: bool = True) -> ObjectId:
        """The largest object of a public (private) dataset, its URL known when `dcor`."""
        assert self.devserver.site is not None
        stored = max(
            (o for o in self.devserver.site.objects.values() if o.public == public),
            key=lambda o: o.size,
        )
        key = f"{stored.bucket}/{stored.key}"
        if self.dcor:
            self.locator.register(key, f"{self.devserver.url}/{key}", lifetime=None)
        self.tier.allow(key, private=not public)
        self.truth = stored.path.read_bytes()
        return ObjectId(key=key, etag=stored.etag, size=stored.size)

    def close(self) -> None:
        self.tier.close()
        self.http.close()


def test_a_node_reads_what_another_uploaded(
    seaweedfs: SeaweedFS, devserver: DevServer, bucket: str
) -> None:
    first = Node(devserver, seaweedfs.url, bucket)
    obj = first.object()
    assert obj.size > 3 * PIECE
    ranges = [(100, 200), (PIECE - 10, 2 * PIECE + 10), (obj.size - 5000, obj.size)]
    try:
        for a, b in ranges:
            assert first.fetch(obj, a, b, deadline()) == first.truth[a:b]
            assert first.tier.drain(30)
        stats = first.tier.stats()
        # piece 1 read whole is uploaded; 0, 2 and the last, read in part, are completed (0
        # before the second read, which takes it from the tier)
        assert stats["uploads"] == 4 and stats["completions"] == 3, stats
        assert stats["misses"] == 4 and stats["hits"] == 1 and stats["errors"] == 0
        last = obj.size - (obj.size - 1) // PIECE * PIECE
        read = 100 + (PIECE + 10) + 5000  # what the reads took from DCOR
        assert stats["dcor_bytes"] == read + 2 * PIECE + last
    finally:
        first.close()
    stored = keys(seaweedfs, bucket)
    assert len(stored) == 4 and all(k.startswith("site/dcorfs/v1/public/") for k in stored)
    assert all(obj.key not in k and obj.etag not in k for k in stored)  # only a hash names it
    second = Node(devserver, seaweedfs.url, bucket, dcor=False)  # DCOR out of reach
    obj = second.object()
    try:
        for a, b in ranges:
            assert second.fetch(obj, a, b, deadline()) == second.truth[a:b]
        stats = second.tier.stats()
        assert stats["dcor_bytes"] == 0 and stats["uploads"] == 0
        assert stats["hits"] == 4 and stats["reused"] == 1  # piece 0 kept from the first read
        with pytest.raises(NotFound):  # piece 3 is nowhere: DCOR is asked (and cannot answer)
            second.fetch(obj, 3 * PIECE, 3 * PIECE + 10, deadline())
    finally:
        second.close()


def test_dcor_failing_a_completion_does_not_pause_uploads(
    seaweedfs: SeaweedFS, devserver: DevServer, bucket: str
) -> None:
    """A piece read in part is completed from DCOR in the background; DCOR failing that drops
    the one job: the tier's uploads go on (they are not paused as if the tier had failed)."""
    node = Node(devserver, seaweedfs.url, bucket)
    obj = node.object()
    dcor = make_fetch(node.http, node.locator)

    def fails_completions(o: ObjectId, a: int, b: int, at: float) -> bytes:
        if (a, b) == (0, PIECE):  # the completion of piece 0
            raise NotFound("gone for now")
        return dcor(o, a, b, at)

    fetch = node.tier.wrap(fails_completions)
    try:
        assert fetch(obj, 100, 200, deadline()) == node.truth[100:200]
        assert node.tier.drain(30)
        assert fetch(obj, PIECE, 2 * PIECE, deadline()) == node.truth[PIECE : 2 * PIECE]
        assert node.tier.drain(30)
        stats = node.tier.stats()
        assert stats["uploads"] == 1 and stats["errors"] == 0 and stats["dropped"] == 1, stats
    finally:
        node.close()


def test_a_damaged_piece_is_skipped_and_written_again(
    seaweedfs: SeaweedFS, devserver: DevServer, bucket: str
) -> None:
    node = Node(devserver, seaweedfs.url, bucket)
    obj = node.object()
    try:
        assert node.fetch(obj, 0, 2 * PIECE, deadline()) == node.truth[: 2 * PIECE]
        assert node.tier.drain(30)
    finally:
        node.close()
    client = seaweedfs.client()
    key = next(k for k in keys(seaweedfs, bucket) if k.endswith("/1"))
    good = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(bad))
    node = Node(devserver, seaweedfs.url, bucket)
    obj = node.object()
    try:
        assert node.fetch(obj, 0, 2 * PIECE, deadline()) == node.truth[: 2 * PIECE]
        assert node.tier.drain(30)
        stats = node.tier.stats()
        assert stats["corrupt"] == 1 and stats["hits"] == 1 and stats["uploads"] == 1, stats
        assert stats["dcor_bytes"] == PIECE  # the damaged piece only, not read from the tier
    finally:
        node.close()
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == good


def test_private_objects_need_the_opt_in(
    seaweedfs: SeaweedFS, devserver: DevServer, bucket: str
) -> None:
    """An object of a private dataset (read signed from the S3 store, as with --s3-endpoint)
    never reaches the tier without the opt-in; with it, its pieces go under private/, and
    its identity never (the ETag is what keeps its pieces out of unauthorised reach)."""
    for private in (False, True):
        node = Node(devserver, seaweedfs.url, bucket, private=private)
        obj = node.object(public=False)
        signed = sigv4_presigner(CREDENTIALS)(f"{seaweedfs.url}/{obj.key}")
        node.locator.register(obj.key, signed, lifetime=3600)
        try:
            assert node.fetch(obj, 0, PIECE + 10, deadline()) == node.truth[: PIECE + 10]
            node.tier.remember_identity(obj.key, obj.size, obj.etag)
            assert node.tier.identity(obj.key, deadline=deadline()) is None
            assert node.tier.drain(30)
            stats = node.tier.stats()
            assert (stats["uploads"], stats["misses"]) == ((2, 2) if private else (0, 0))
        finally:
            node.close()
        stored = keys(seaweedfs, bucket)
        if not private:
            assert stored == []
        else:
            assert len(stored) == 2
            assert all(k.startswith("site/dcorfs/v1/private/") for k in stored), stored


def test_identities_of_public_objects_are_shared(
    seaweedfs: SeaweedFS, devserver: DevServer, bucket: str
) -> None:
    first = Node(devserver, seaweedfs.url, bucket)
    obj = first.object()
    first.tier.remember_identity(obj.key, obj.size, obj.etag)
    assert first.tier.drain(30)  # identities are waited for too
    first.close()
    second = Node(devserver, seaweedfs.url, bucket, dcor=False, readonly=True)
    obj = second.object()
    try:
        assert second.tier.identity(obj.key, deadline=deadline()) == (obj.size, obj.etag)
        assert second.tier.identity("circle-x/resource/unknown", deadline=deadline()) is None
    finally:
        second.close()


def test_a_readonly_node_borrows_but_never_fills(
    seaweedfs: SeaweedFS, devserver: DevServer, bucket: str
) -> None:
    node = Node(devserver, seaweedfs.url, bucket, readonly=True)
    obj = node.object()
    try:
        assert node.fetch(obj, 0, 3 * PIECE, deadline()) == node.truth[: 3 * PIECE]
        assert node.tier.drain(5)
        assert node.tier.stats()["misses"] == 3 and node.tier.stats()["uploads"] == 0
    finally:
        node.close()
    assert keys(seaweedfs, bucket) == []


def test_an_unreachable_tier_costs_one_short_wait(
    devserver: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    node = Node(devserver, "http://127.0.0.1:9", "nowhere")
    obj = node.object()
    try:
        started = time.monotonic()
        assert node.fetch(obj, 0, 2 * PIECE, deadline()) == node.truth[: 2 * PIECE]
        assert time.monotonic() - started < LOOKUP_WAIT + 1
        stats = node.tier.stats()
        assert not stats["up"] and stats["errors"] >= 1 and stats["dcor_bytes"] == 2 * PIECE
        requests = node.http.request_counts()["shared"]
        assert (
            node.fetch(obj, 2 * PIECE, 3 * PIECE, deadline()) == node.truth[2 * PIECE : 3 * PIECE]
        )
        assert node.http.request_counts()["shared"] == requests  # left alone while down
        assert node.tier.stats()["uploads"] == 0
    finally:
        node.close()


def test_failures_are_logged_without_signatures_or_secrets(
    seaweedfs: SeaweedFS, devserver: DevServer, bucket: str, tmp_path: Path
) -> None:
    """Rejected credentials: uploads fail; the log has neither the presigned query string nor
    the secret (the message is redacted by `remote.http`, the secret by the log filter)."""
    log_file = tmp_path / "dcorfs.log"
    wrong = S3Credentials(ACCESS_KEY_ID, "not-the-secret-at-all")
    loggers = [logging.getLogger(name) for name in ("dcorfs", "botocore", "urllib3")]
    saved = [(logger.level, logger.propagate) for logger in loggers]  # `configure` sets them
    handler = configure(
        level="DEBUG", log_file=log_file, stderr=False, secrets=list(wrong.reveal())
    )
    node = Node(devserver, seaweedfs.url, bucket, credentials=wrong)
    obj = node.object()
    try:
        assert node.fetch(obj, 0, PIECE, deadline()) == node.truth[:PIECE]
        node.tier.drain(30)
        assert node.tier.stats()["errors"] >= 1
    finally:
        node.close()
        assert handler is not None
        logging.getLogger("dcorfs").removeHandler(handler)
        handler.close()
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.setLevel(level)
            logger.propagate = propagate
    text = log_file.read_text()
    assert "shared cache" in text and "SignatureDoesNotMatch" in text
    for needle in ("X-Amz-Signature", "X-Amz-Credential", "not-the-secret-at-all"):
        assert needle not in text


def test_checks_before_mounting(
    seaweedfs: SeaweedFS, bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing bucket and refused credentials stop the mount with one line; an unreachable
    store is a warning (reads go to DCOR)."""
    from dcorfs.daemon.preflight import check_shared

    def check(**options: Any) -> None:
        shared = SharedCache(
            **{"endpoint": seaweedfs.url, "bucket": bucket, "prefix": "p", **options}
        )
        check_shared(MountSettings(mountpoint=Path("/mnt"), shared_cache=shared))

    check(credentials=CREDENTIALS)  # a working tier: not a word
    assert capsys.readouterr().err == ""
    refusals = {
        "no bucket shared-none": {"bucket": "shared-none", "credentials": CREDENTIALS},
        "refuses anonymous reads": {},
        "rejects these credentials .SignatureDoesNotMatch.": {
            "credentials": S3Credentials(ACCESS_KEY_ID, "not-the-secret-at-all")
        },
    }
    for message, options in refusals.items():
        with pytest.raises(ConfigError, match=message) as refused:
            check(**options)
        assert "\n" not in str(refused.value) and "not-the-secret" not in str(refused.value)
    check(endpoint="http://127.0.0.1:9", credentials=CREDENTIALS)
    warning = capsys.readouterr().err
    assert "warning:" in warning and "unreachable" in warning and "reads go to DCOR" in warning
