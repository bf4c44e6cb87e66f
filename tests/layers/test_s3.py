"""The S3 bypass below the mount: addresses, credentials, signing, listing, error mapping.

Transport-boundary tests: a stub HTTP server answering canned S3 responses, and the real
SeaweedFS of the `seaweedfs` fixture (SigV4 enforced)."""

from __future__ import annotations

import http.server
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from dcorfs.daemon.logs import configure
from dcorfs.daemon.wiring import build_layers
from dcorfs.devserver.server import DevServer
from dcorfs.errors import AccessDenied, ConfigError, NotFound, ProtocolError
from dcorfs.remote.dcserv import resource_key
from dcorfs.remote.http import Http, RetryPolicy
from dcorfs.remote.s3 import URL_LIFETIME, ObjectStore, object_url, parse_listing, sigv4_presigner
from dcorfs.settings import (
    MountSettings,
    S3Credentials,
    Token,
    parse_circle,
    parse_endpoint,
    read_s3_credentials,
)

from ..conftest import api, info
from ..mounts import dcorfs
from ..s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, SeaweedFS

FAST = RetryPolicy(attempts=6, base_delay=0.001, max_delay=0.01, read_timeout=5.0)
RID = "fb719fb2-bd9f-817a-7d70-f4002af916f0"
CIRCLE = "5a7a053d-55fb-4f99-960c-f478d0bd418f"
KEY_ID, SECRET = "AKIDEXAMPLE0123", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def deadline() -> float:
    return time.monotonic() + 30


# -- addresses and options -------------------------------------------------------------------


def test_object_urls_follow_dcor_layout() -> None:
    key = resource_key(CIRCLE, RID, "condensed")
    assert key == f"circle-{CIRCLE}/condensed/fb7/19f/b2-bd9f-817a-7d70-f4002af916f0"
    assert object_url("https://s3.example:443", key) == f"https://s3.example:443/{key}"
    assert object_url("http://h", "b/a key+x") == "http://h/b/a%20key%2Bx"
    store = ObjectStore(http=Http(), endpoint="http://127.0.0.1:9000")
    assert store.url(key) == (f"http://127.0.0.1:9000/{key}", None)  # anonymous: as is, forever
    assert not store.signed


def test_endpoint_and_circle_options() -> None:
    assert parse_endpoint("https://objectstore.example.org/") == "https://objectstore.example.org"
    assert parse_endpoint(" http://127.0.0.1:8333 ") == "http://127.0.0.1:8333"
    for bad in ("objectstore.example.org", "ftp://x", "https://x/bucket", "http://x:99999"):
        with pytest.raises(ConfigError):
            parse_endpoint(bad)
    assert parse_circle(CIRCLE) == CIRCLE
    for bad in ("", "Circle", "../x", "a/b", "circle id"):
        with pytest.raises(ConfigError):
            parse_circle(bad)


# -- credentials -------------------------------------------------------------------------------


def test_credentials_never_show(tmp_path: Path) -> None:
    credentials = S3Credentials(KEY_ID, SECRET)
    for text in (repr(credentials), str(credentials), f"{credentials}", repr([credentials])):
        assert SECRET not in text and KEY_ID not in text
    assert credentials.reveal() == (KEY_ID, SECRET)
    assert KEY_ID not in credentials.fingerprint and SECRET not in credentials.fingerprint
    assert credentials.fingerprint == S3Credentials(KEY_ID, SECRET).fingerprint
    assert credentials.fingerprint != S3Credentials(KEY_ID, "other").fingerprint  # wrong secret
    assert credentials == S3Credentials(KEY_ID, SECRET) != S3Credentials(KEY_ID, "other")


def test_credentials_from_env_or_file(tmp_path: Path) -> None:
    env = {"DCORFS_S3_ACCESS_KEY_ID": KEY_ID, "DCORFS_S3_SECRET_ACCESS_KEY": SECRET}
    assert read_s3_credentials(None, env) == S3Credentials(KEY_ID, SECRET)
    assert read_s3_credentials(None, {}) is None
    assert read_s3_credentials(None, {"DCORFS_S3_ACCESS_KEY_ID": " "}) is None
    with pytest.raises(ConfigError, match="both") as caught:
        read_s3_credentials(None, {"DCORFS_S3_SECRET_ACCESS_KEY": SECRET})
    assert SECRET not in str(caught.value)
    aws = tmp_path / "credentials"
    aws.write_text(
        f"[other]\naws_access_key_id = x\naws_secret_access_key = y\n"
        f"[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
    )
    aws.chmod(0o600)
    other = {"DCORFS_S3_ACCESS_KEY_ID": "k", "DCORFS_S3_SECRET_ACCESS_KEY": "s"}
    assert read_s3_credentials(aws, other) == S3Credentials(KEY_ID, SECRET)  # the file wins
    single = tmp_path / "single"
    single.write_text(f"[dcor]\naccess_key_id={KEY_ID}\nsecret_access_key={SECRET}\n")
    single.chmod(0o600)
    assert read_s3_credentials(single, env) == S3Credentials(KEY_ID, SECRET)
    for text in (f"{SECRET}\n", f"[a]\nx=1\n[b]\naws_secret_access_key={SECRET}\n", "[default]\n"):
        broken = tmp_path / "broken"
        broken.write_text(text)
        broken.chmod(0o600)
        with pytest.raises(ConfigError) as caught:
            read_s3_credentials(broken, env)
        assert SECRET not in str(caught.value)
    with pytest.raises(ConfigError, match="cannot read"):
        read_s3_credentials(tmp_path / "missing", env)


# -- signing --------------------------------------------------------------------------------------


def test_signed_urls_carry_a_signature_but_never_the_secret() -> None:
    key = resource_key(CIRCLE, RID)
    store = ObjectStore(
        http=Http(),
        endpoint="https://s3.example",
        sign=sigv4_presigner(S3Credentials(KEY_ID, SECRET)),
    )
    url, lifetime = store.url(key)
    assert store.signed and lifetime == URL_LIFETIME
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"https://s3.example/{key}"
    query = parse_qs(parts.query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Credential"][0].startswith(f"{KEY_ID}/")
    assert query["X-Amz-Expires"] == [str(URL_LIFETIME)]
    assert len(query["X-Amz-Signature"][0]) == 64
    assert SECRET not in url and "wJalrXUtnFEMI" not in url
    unsigned, forever = ObjectStore(http=Http(), endpoint="https://s3.example").url(key)
    assert forever is None and "?" not in unsigned and "X-Amz" not in unsigned


def test_signing_needs_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "botocore.auth", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"dcorfs\[s3\]"):
        sigv4_presigner(S3Credentials(KEY_ID, SECRET))


# -- listings -------------------------------------------------------------------------------------

NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def listing(keys: list[str], token: str | None = None) -> bytes:
    contents = "".join(
        f"<Contents><Key>{k}</Key><ETag>&quot;abc{i}&quot;</ETag><Size>{10 + i}</Size>"
        f"<LastModified>2024-03-07T08:14:58.000Z</LastModified></Contents>"
        for i, k in enumerate(keys)
    )
    more = f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>"
    tail = more if token else "<IsTruncated>false</IsTruncated>"
    return (
        f'<?xml version="1.0"?><ListBucketResult {NS}>{contents}{tail}</ListBucketResult>'.encode()
    )


def test_listing_pages_are_parsed() -> None:
    found, token = parse_listing("b", listing(["resource/a", "resource/b"], token="t+/="))
    assert token == "t+/="
    assert [(o.key, o.size, o.etag) for o in found] == [
        ("b/resource/a", 10, "abc0"),
        ("b/resource/b", 11, "abc1"),
    ]
    assert found[0].mtime == 1709799298.0
    assert parse_listing("b", listing([])) == ([], None)
    for junk in (b"not xml", b"<Error><Code>AccessDenied</Code></Error>"):
        with pytest.raises(ProtocolError):
            parse_listing("b", junk)
    truncated = listing(["x"]).replace(b"false", b"true")
    with pytest.raises(ProtocolError, match="continuation"):
        parse_listing("b", truncated)
    keyless = listing(["x"]).replace(b"<Key>x</Key>", b"")
    with pytest.raises(ProtocolError):
        parse_listing("b", keyless)


def assert_no_credentials(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    """Not in dcorfs's log records (those the daemon writes: `logs.configure`)."""
    ours = [r for r in caplog.records if r.name.startswith("dcorfs")]
    assert ours, "nothing logged: the check would prove nothing"
    for record in ours:
        text = record.getMessage() + (record.exc_text or "")
        assert not any(secret in text for secret in secrets), text


def test_the_daemon_log_hides_s3_credentials(tmp_path: Path) -> None:
    settings = MountSettings(
        mountpoint=tmp_path, token=Token("dcor-token"), s3_credentials=S3Credentials(KEY_ID, SECRET)
    )
    assert sorted(settings.secrets()) == sorted(["dcor-token", KEY_ID, SECRET])
    assert SECRET not in repr(settings) and KEY_ID not in repr(settings)
    log_file = tmp_path / "dcorfs.log"
    loggers = [logging.getLogger(name) for name in ("dcorfs", "botocore", "urllib3")]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    handler = configure(level="DEBUG", log_file=log_file, stderr=False, secrets=settings.secrets())
    try:
        logging.getLogger("dcorfs.test").warning("signed with %s / %s", KEY_ID, SECRET)
        logging.getLogger("botocore.auth").debug("Credential=%s", KEY_ID)
        assert not logging.getLogger("botocore.auth").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("urllib3.connectionpool").isEnabledFor(logging.DEBUG)
    finally:
        assert handler is not None
        logging.getLogger("dcorfs").removeHandler(handler)
        handler.close()
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.setLevel(level)
            logger.propagate = propagate
    text = log_file.read_text()
    assert "signed with <token> / <token>" in text
    assert KEY_ID not in text and SECRET not in text


# -- error mapping at the transport boundary -----------------------------------------------------


class Canned(http.server.BaseHTTPRequestHandler):
    """Answers from `server.answers` (a list of (status, code or body)), one per request."""

    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        status, what = self.server.answers.pop(0)  # type: ignore[attr-defined]
        if status >= 400:
            body = (
                f'<?xml version="1.0"?><Error><Code>{what}</Code><Message>m</Message>'
                "<RequestId>1</RequestId></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
        else:
            body = what if isinstance(what, bytes) else b"0123456789"
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", "bytes 0-9/10")
                self.send_header("ETag", '"abc"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def canned() -> Iterator[Any]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    server.answers = []  # type: ignore[attr-defined]
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_errors_map_to_errnos_and_name_the_s3_code(
    canned: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = f"http://127.0.0.1:{canned.server_address[1]}"
    sleeps: list[float] = []
    web = Http(policy=FAST, sleep=sleeps.append)
    store = ObjectStore(
        http=web, endpoint=endpoint, sign=sigv4_presigner(S3Credentials(KEY_ID, SECRET))
    )
    key = resource_key(CIRCLE, RID)
    cases = [
        ("AccessDenied", 403, AccessDenied),  # anonymous on a private object
        ("SignatureDoesNotMatch", 403, AccessDenied),  # a wrong secret: EACCES, not EIO
        ("InvalidAccessKeyId", 403, AccessDenied),
        ("NoSuchKey", 404, NotFound),
        ("NoSuchBucket", 404, NotFound),
    ]
    for code, status, error in cases:
        canned.answers[:] = [(status, code)]
        with pytest.raises(error) as caught:
            web.get_range(store.url(key)[0], 0, 10, deadline=deadline())
        message = str(caught.value)
        assert f"HTTP {status} ({code})" in message and "X-Amz" not in message, message
        assert caught.value.errno == (13 if status == 403 else 2)
    assert sleeps == []  # none of these is retried
    canned.answers[:] = [(503, "SlowDown"), (500, "InternalError"), (206, None)]
    assert web.get_range(store.url(key)[0], 0, 10, deadline=deadline()) == b"0123456789"
    assert len(sleeps) == 2  # transient: retried by http's one retry policy
    canned.answers[:] = [(403, "AccessDenied")]
    with pytest.raises(AccessDenied):
        store.list(f"circle-{CIRCLE}", "resource/", deadline=deadline())
    canned.answers[:] = [(200, listing(["resource/a"], token="next")), (200, listing(["c"]))]
    assert [o.key for o in store.list("b", "resource/", deadline=deadline())] == [
        "b/resource/a",
        "b/c",
    ]
    assert "continuation-token=next" in canned.seen[-1]
    assert web.request_counts()["document"] == 3
    assert_no_credentials(caplog, KEY_ID, SECRET)


# -- against a real S3 server (SigV4 enforced) ------------------------------------------------


def objects_of(devserver: DevServer, *, private: bool) -> list[Any]:
    assert devserver.site is not None
    ids = {e["id"] for e in info(devserver) if e["private"] == private}
    return [o for o in devserver.site.objects.values() if o.resource_id in ids]


def test_seaweedfs_signed_and_anonymous(
    seaweedfs: SeaweedFS, devserver: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    web = Http(policy=FAST)
    anonymous = ObjectStore(http=web, endpoint=seaweedfs.url)
    signed = ObjectStore(
        http=web,
        endpoint=seaweedfs.url,
        sign=sigv4_presigner(S3Credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY)),
    )
    wrong = ObjectStore(
        http=web,
        endpoint=seaweedfs.url,
        sign=sigv4_presigner(S3Credentials(ACCESS_KEY_ID, "not-the-secret")),
    )
    public, private = (
        objects_of(devserver, private=False)[0],
        objects_of(devserver, private=True)[0],
    )
    for obj in (public, private):
        key = f"{obj.bucket}/{obj.key}"
        data = obj.path.read_bytes()
        info_ = signed.probe(key, head=100, deadline=deadline())
        assert (info_.size, info_.etag, info_.head) == (obj.size, obj.etag, data[:100])
        url = signed.url(key)[0]
        assert web.get_range(url, 5, 50, expect_etag=obj.etag, deadline=deadline()) == data[5:50]
        with pytest.raises(AccessDenied, match="SignatureDoesNotMatch"):
            wrong.probe(key, deadline=deadline())
    assert anonymous.probe(f"{public.bucket}/{public.key}", deadline=deadline()).etag == public.etag
    with pytest.raises(AccessDenied):
        anonymous.probe(f"{private.bucket}/{private.key}", deadline=deadline())
    with pytest.raises(NotFound):
        signed.probe(f"{public.bucket}/resource/000/000/nothing", deadline=deadline())
    # listings: all pages (one object each) equal one listing; anonymous may not list
    everything = signed.list(public.bucket, "resource/", deadline=deadline())
    paged = signed.list(public.bucket, "resource/", max_keys=1, deadline=deadline())
    assert paged == everything and len(everything) >= 3
    stored = {f"{o.bucket}/{o.key}": o for o in devserver.site.objects.values()}  # type: ignore[union-attr]
    for listed in everything:
        assert (listed.size, listed.etag) == (stored[listed.key].size, stored[listed.key].etag)
    with pytest.raises(AccessDenied):
        anonymous.list(public.bucket, "resource/", deadline=deadline())
    with pytest.raises(AccessDenied, match="SignatureDoesNotMatch"):
        wrong.list(public.bucket, "resource/", deadline=deadline())
    with pytest.raises(NotFound, match="NoSuchBucket"):
        signed.list("circle-no-such-circle", "resource/", deadline=deadline())
    assert_no_credentials(caplog, ACCESS_KEY_ID, SECRET_ACCESS_KEY)
    web.close()


# -- opening resources without DCOR's API ------------------------------------------------------


@contextmanager
def s3_only_resources(
    cache: Path, endpoint: str, circle_id: str, dir_cache_time: float = 300.0
) -> Iterator[Any]:
    """`Resources` wired by the mount's own wiring for an --s3-only mount."""
    settings = MountSettings(
        dir_cache_time=dir_cache_time,
        mountpoint=cache,
        cache_dir=cache,
        cache_size=1 << 30,
        timeout=30,
        s3_endpoint=endpoint,
        s3_credentials=S3Credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY),
        s3_only=True,
        circles=(circle_id,),
    )
    layers = build_layers(settings, Http(policy=FAST))
    try:
        yield layers.buckets, layers.resources, layers.http
    finally:
        layers.close()


def test_s3_only_opens_no_hdf5_file_once_its_features_are_known(
    seaweedfs: SeaweedFS, devserver: DevServer, tmp_path: Path
) -> None:
    """Without dcserv the event count comes from the file: remembered per object version
    like the features, so a warm open (and every read of decoded values) opens no HDF5 file
    and asks the store nothing but the listing."""
    entry = next(e for e in info(devserver) if e["name"] == "M001_data.rtdc")
    _, body = api(devserver, "organization_list", all_fields="true")
    circle_id = next(c["id"] for c in body["result"] if c["name"] == entry["circle"])
    first: dict[str, bytes] = {}
    for round_ in ("cold", "warm"):
        with s3_only_resources(tmp_path / "cache", seaweedfs.url, circle_id) as (
            buckets,
            resources,
            web,
        ):
            dataset = buckets.dataset(circle_id)
            resource = buckets.resource(circle_id, entry["id"])
            opened = resources.rtdc(dataset, resource)
            sources = [opened.source(kind) for kind in ("resource", "condensed")]
            assert all(source is not None for source in sources)
            assert opened.events > 0 and len(opened.features) > 5
            values = {
                name: opened.read(name, 0, opened.events, deadline=deadline()).tobytes()
                for name in opened.features
            }
            if round_ == "cold":
                first = values
                continue
            assert values == first
            assert not any(source.is_open for source in sources if source is not None)
            counts = web.request_counts()
            assert counts.get("range", 0) == counts.get("probe", 0) == 0, counts


def test_s3_only_texts_gain_the_condensing_logs_once_the_condensed_file_exists(
    seaweedfs: SeaweedFS, devserver: DevServer, tmp_path: Path
) -> None:
    """Without dcserv the logs are read from the files: those made while the condensed file
    did not exist are not kept once it does (doc/DCOR.md §7)."""
    entry = next(e for e in info(devserver) if e["name"] == "M001_data.rtdc")
    _, body = api(devserver, "organization_list", all_fields="true")
    circle_id = next(c["id"] for c in body["result"] if c["name"] == entry["circle"])
    assert devserver.site is not None
    condensed = devserver.site.resource_object(entry["id"], "condensed")
    assert condensed is not None
    client = seaweedfs.client()

    def restore() -> None:
        client.put_object(
            Bucket=condensed.bucket, Key=condensed.key, Body=condensed.path.read_bytes()
        )

    client.delete_object(Bucket=condensed.bucket, Key=condensed.key)
    try:
        with s3_only_resources(tmp_path / "cache", seaweedfs.url, circle_id, 1.0) as (
            buckets,
            resources,
            _,
        ):
            dataset = buckets.dataset(circle_id)
            resource = buckets.resource(circle_id, entry["id"])
            assert "dclab-condense" not in resources.texts(dataset, resource).logs
            restore()  # DCOR's condensing job has run
            time.sleep(1.5)
            assert "dclab-condense" in resources.texts(dataset, resource).logs
    finally:
        restore()


# -- the command line ------------------------------------------------------------------------------


def test_s3_options_are_checked_before_anything_else(tmp_path: Path) -> None:
    mnt = str(tmp_path)
    endpoint = ("--s3-endpoint", "http://127.0.0.1:9")
    cases = [
        (["--s3-only", "--circle", CIRCLE], "--s3-only needs --s3-endpoint"),
        (["--s3-only", *endpoint], "at least one --circle"),
        (["--circle", CIRCLE, *endpoint], "--circle goes with --s3-only"),
        (["--s3-only", *endpoint, "--circle", CIRCLE, "--host", "x.org"], "talks to no DCOR"),
        (["--s3-only", *endpoint, "--circle", "Not/A/Circle"], "not a circle id"),
        (["--s3-endpoint", "ftp://x"], "not an S3 endpoint"),
        (["--s3-credentials-file", mnt], "goes with --s3-endpoint"),
    ]
    for options, message in cases:
        result = dcorfs("mount", mnt, *options)
        assert result.returncode == 2, (options, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    half = dcorfs(
        "mount",
        mnt,
        *endpoint,
        env={"DCORFS_S3_ACCESS_KEY_ID": "", "DCORFS_S3_SECRET_ACCESS_KEY": SECRET},
    )
    assert half.returncode == 2 and "set both" in half.stderr and SECRET not in half.stderr
    usage = dcorfs("mount", "--help").stdout
    for option in ("--s3-endpoint", "--s3-credentials-file", "--s3-only", "--circle"):
        assert option in usage
    assert "DCORFS_S3_SECRET_ACCESS_KEY" in usage
