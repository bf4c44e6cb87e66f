"""DCOR's edges (doc/DCOR.md §6, §8, §9): resources not on S3 and links, files the server cannot
open, resources dcserv refuses as not RT-DC, tokens the host takes for anonymous. Each: the
devserver behaves like DCOR (dclab's own client agrees where it is involved), and the mount
copes."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dclab
import numpy as np
import pytest
import requests
from dclab.rtdc_dataset.fmt_dcor.api import DCORAccessError

from dcorfs.devserver.datadir import write_json
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.devserver.server import DevServer
from dcorfs.devserver.site import SiteOptions
from dcorfs.errors import ConfigError, ServerError, TransientError
from dcorfs.remote.dcserv import (
    DcorApi,
    bucket_circle,
    bucket_name,
    parse_resource_key,
    resource_key,
)
from dcorfs.remote.failures import Failures
from dcorfs.remote.http import Http, RetryPolicy
from dcorfs.settings import parse_bucket_template

from ..conftest import TOKENS, api, resource, weed_or_skip
from ..dclab_client import forget_api_keys, open_remote  # noqa: F401 (fixture)
from ..mounts import dcorfs, is_mounted, log_lines, mounted
from ..s3server import CREDENTIALS_ENV, SeaweedFS

pytestmark = [pytest.mark.filterwarnings("ignore::dclab.http_utils.ConnectionTimeoutWarning")]
EDGES = "edges"
EXTERNAL = "127.0.0.62"  # where link resources point


@pytest.fixture(scope="module")
def edges_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good file, one the server cannot open (truncated before it was ever served), an
    upper-case `.RTDC`, and a private dataset."""
    root = tmp_path_factory.mktemp("edges-data")
    write_json(
        root / "dcor.json",
        {"users": {"alice": {"token": TOKENS["alice"], "circles": ["private-lab"]}}},
    )
    edges = root / "public-lab" / EDGES
    spec = SampleSpec(events=40, seed=21, images=False, traces=False)
    write_rtdc(edges / "good.rtdc", spec)
    write_rtdc(edges / "broken.rtdc", spec)
    with (edges / "broken.rtdc").open("r+b") as handle:
        handle.truncate((edges / "broken.rtdc").stat().st_size // 2)
    write_rtdc(edges / "UPPER.RTDC", spec)
    (edges / "disk.txt").write_bytes(bytes(range(256)) * 40)
    write_rtdc(edges / "ondisk.rtdc", spec)
    (edges / "table.csv").write_text("a,b\n" + "".join(f"{i},{i * i}\n" for i in range(2000)))
    write_json(
        edges / "dataset.json",
        {
            "title": "Edges",
            "resources": {
                "disk.txt": {"storage": "upload"},
                "ondisk.rtdc": {"storage": "upload"},
                "table.csv": {"storage": "link"},
            },
        },
    )
    too = root / "public-lab" / "edges-too"
    (too / "same-table.csv").parent.mkdir(parents=True)
    (too / "same-table.csv").write_text("a placeholder: the link points elsewhere\n")
    link_to = f"public-lab/{EDGES}/table.csv"
    write_json(
        too / "dataset.json",
        {"resources": {"same-table.csv": {"storage": "link", "link_to": link_to}}},
    )
    moved = root / "public-lab" / "edges-moved"
    (moved / "moved-table.csv").parent.mkdir(parents=True)
    (moved / "moved-table.csv").write_text("a placeholder: the link redirects elsewhere\n")
    write_json(
        moved / "dataset.json",
        {"resources": {"moved-table.csv": {"storage": "link", "link_to": f"_moved/{link_to}"}}},
    )
    secret = root / "private-lab" / "secret"
    write_json(
        secret / "dataset.json",
        {"title": "Secret", "private": True, "resources": {"notes.txt": {"storage": "upload"}}},
    )
    write_rtdc(secret / "M001.rtdc", spec)
    (secret / "notes.txt").write_text("private notes, not on S3\n" * 100)
    return root


@pytest.fixture(scope="module")
def edges(edges_dir: Path) -> Iterator[DevServer]:
    with DevServer(edges_dir, options=SiteOptions(external_host=EXTERNAL)) as server:
        yield server


def dcserv_count(server: DevServer) -> int:
    return int(server.stats.snapshot()["api"].get("dcserv", 0))


# -- §8 a file the server cannot open: 500, for good -----------------------------------------------


def test_devserver_answers_500_for_a_file_it_cannot_open(edges: DevServer) -> None:
    rid = resource(edges, EDGES, "broken.rtdc")["id"]
    for query in ("metadata", "basins", "logs"):
        status, body = api(edges, "dcserv", id=rid, query=query)
        assert status == 500, query
        assert body["error"] == {
            "__type": "Internal Server Error",
            "message": "Internal Server Error",
        }


def test_dclab_cannot_open_a_file_the_server_cannot_open(edges: DevServer) -> None:
    rid = resource(edges, EDGES, "broken.rtdc")["id"]
    with pytest.raises(DCORAccessError, match="Internal Server Error"):
        open_remote(edges, rid)


def test_a_resource_the_server_fails_on_is_not_asked_again_on_every_read(
    edges: DevServer, tmp_path: Path
) -> None:
    """dcserv's 500 is not retried in a loop: the reader gets EIO, and later readers get it
    without a request, for a while; one log line says so. The others read on."""
    cache = tmp_path / "cache"
    with mounted(tmp_path / "mnt", edges.url, cache) as mnt:
        dataset = mnt / "datasets" / EDGES
        assert (dataset / "good" / "deform.npy").stat().st_size > 0
        before = dcserv_count(edges)
        for _ in range(6):
            with pytest.raises(OSError) as caught:
                list((dataset / "broken").iterdir())
            assert caught.value.errno == 5
        # six readers, one attempt: metadata, basins, logs, tables asked once each at most
        assert 0 < dcserv_count(edges) - before <= 4
        with dclab.new_dataset(edges.data_dir / "public-lab" / EDGES / "good.rtdc") as local:
            assert np.array_equal(np.load(dataset / "good" / "deform.npy"), local["deform"][:])
    assert len(log_lines(cache, "the server fails on it")) == 1


# -- §8 an upper-case .RTDC: dcserv refuses it (409), the file is plain ----------------------------


def test_devserver_refuses_an_upper_case_rtdc_like_dcserv(edges: DevServer) -> None:
    entry = resource(edges, EDGES, "UPPER.RTDC")
    assert not entry["rtdc"]
    status, body = api(edges, "dcserv", id=entry["id"], query="metadata")
    assert status == 409
    assert body["error"]["message"] == f"Resource ID {entry['id']} must be an .rtdc dataset!"
    _, shown = api(edges, "resource_show", id=entry["id"])
    assert shown["result"]["mimetype"] is None


def test_dclab_refuses_an_upper_case_rtdc(edges: DevServer) -> None:
    entry = resource(edges, EDGES, "UPPER.RTDC")
    with pytest.raises(DCORAccessError, match="must be an .rtdc dataset"):
        open_remote(edges, entry["id"])


def test_an_upper_case_rtdc_is_a_plain_file(edges: DevServer, tmp_path: Path) -> None:
    local = edges.data_dir / "public-lab" / EDGES / "UPPER.RTDC"
    with mounted(tmp_path / "mnt", edges.url, tmp_path / "cache") as mnt:
        dataset = mnt / "datasets" / EDGES
        assert "UPPER.RTDC" in [p.name for p in dataset.iterdir()]
        assert (dataset / "UPPER.RTDC").read_bytes() == local.read_bytes()


# -- §9 a wrong or expired token is anonymous to CKAN ----------------------------------------------


def test_devserver_user_show_tells_a_token_from_anonymous(edges: DevServer) -> None:
    status, body = api(edges, "user_show", token=TOKENS["alice"])
    assert status == 200 and body["result"]["name"] == "alice"
    for token in ("", "not-a-token"):
        status, body = api(edges, "user_show", token=token)
        assert status == 404, token
        assert body["error"] == {"__type": "Not Found Error", "message": "Not found"}
    status, body = api(edges, "user_show", id="alice")
    assert status == 200 and "token" not in body["result"]


def test_dclab_with_a_wrong_token_reads_as_anonymous(edges: DevServer) -> None:
    public = resource(edges, EDGES, "good.rtdc")["id"]
    with open_remote(edges, public, "not-a-token") as remote:
        assert len(remote) == 40
    private = resource(edges, "secret", "M001.rtdc")["id"]
    with pytest.raises(DCORAccessError, match="not authorized to read resource"):
        open_remote(edges, private, "not-a-token")


def mount_command(
    mnt: Path, host: str, cache: Path, token: str
) -> subprocess.CompletedProcess[str]:
    mnt.mkdir(parents=True, exist_ok=True)
    return dcorfs(
        "mount", str(mnt), "--host", host, "--cache-dir", str(cache), env={"DCOR_API_KEY": token}
    )


def test_a_rejected_token_stops_the_mount_with_one_line(edges: DevServer, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    result = mount_command(mnt, edges.url, tmp_path / "cache", "not-a-token")
    if is_mounted(mnt):  # before the check: mounted as anonymous
        dcorfs("umount", str(mnt))
        pytest.fail("mounted with a token the host rejects")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert edges.url in lines[0] and "rejects the API token" in lines[0]
    assert "not-a-token" not in result.stderr


def test_a_valid_token_mounts_and_offline_starts_warn(edges_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    options = SiteOptions(external_host=EXTERNAL)
    with DevServer(edges_dir, state_dir=edges_dir / ".devserver", options=options) as server:
        url = server.url
        with mounted(tmp_path / "mnt", url, cache, token=TOKENS["alice"]) as mnt:
            assert (mnt / "datasets" / "secret" / "M001" / "deform.npy").stat().st_size > 0
        assert server.stats.snapshot()["api"].get("user_show") == 1
    # the server is gone: the cache serves, and the token could not be checked
    result = mount_command(tmp_path / "mnt", url, cache, TOKENS["alice"])
    try:
        assert result.returncode == 0, result.stderr
        assert "unreachable" in result.stderr and "token was not checked" in result.stderr
    finally:
        if is_mounted(tmp_path / "mnt"):
            dcorfs("umount", str(tmp_path / "mnt"))


# -- §6 resources not on S3, and links -------------------------------------------------------------


def route(server: DevServer, entry: dict[str, Any], token: str = "", **headers: str) -> Any:
    url = f"{server.url}/dataset/{entry['dataset_id']}/resource/{entry['id']}/download/x"
    return requests.get(
        url, headers={"Authorization": token, **headers}, allow_redirects=False, timeout=30
    )


def test_devserver_serves_files_not_on_s3_itself_and_redirects_links(edges: DevServer) -> None:
    """dc_serve's download route: not `s3_available` → the file itself (Range honoured, as
    flask's send_file); a link (no `url_type`) → a redirect to its `url`. dclab reads through
    dcserv's S3 basins only, so it has no say here: the route and the records are the test."""
    disk = resource(edges, EDGES, "disk.txt")
    _, shown = api(edges, "resource_show", id=disk["id"])
    record = shown["result"]
    assert record["s3_available"] is False and record["url_type"] == "upload"
    assert "s3_url" not in record and record["etag"] is None
    data = (edges.data_dir / "public-lab" / EDGES / "disk.txt").read_bytes()
    answer = route(edges, disk, Range="bytes=10-99")
    assert answer.status_code == 206 and answer.content == data[10:100]
    assert answer.headers["Content-Range"] == f"bytes 10-99/{len(data)}" and answer.headers["ETag"]
    assert route(edges, disk).content == data
    notes = resource(edges, "secret", "notes.txt")
    assert route(edges, notes).status_code == 404
    assert route(edges, notes, "not-a-token").status_code == 404
    assert route(edges, notes, TOKENS["alice"]).status_code == 200

    link = resource(edges, EDGES, "table.csv")
    _, shown = api(edges, "resource_show", id=link["id"])
    record = shown["result"]
    assert record["url_type"] is None and record["url"].startswith(f"http://{EXTERNAL}:")
    assert record["size"] is None and "s3_url" not in record
    answer = route(edges, link)
    assert answer.status_code == 302 and answer.headers["Location"] == record["url"]
    table = (edges.data_dir / "public-lab" / EDGES / "table.csv").read_bytes()
    external = requests.get(record["url"], headers={"Range": "bytes=0-9"}, timeout=30)
    assert external.status_code == 206 and external.content == table[:10]
    _, shown = api(edges, "resource_show", id=resource(edges, "edges-too", "same-table.csv")["id"])
    assert shown["result"]["url"] == record["url"]


def test_dclab_cannot_open_an_rtdc_file_not_on_s3(edges: DevServer) -> None:
    """dcserv opens S3 objects only: for a file on the site's disk it fails (500), and dclab
    with it; the mount shows such a file as it is."""
    rid = resource(edges, EDGES, "ondisk.rtdc")["id"]
    with pytest.raises(DCORAccessError, match="Internal Server Error"):
        open_remote(edges, rid)


def test_files_not_on_s3_and_links_read_with_the_token_on_the_dcor_host_only(
    edges: DevServer, tmp_path: Path
) -> None:
    """A file on the site's disk comes from the download route (private ones with the token);
    a link from its URL, without the token, cached by that URL: two links to one file are
    fetched once."""
    assert edges.external is not None
    edges.external.reset()
    edges.stats.reset()
    public = edges.data_dir / "public-lab" / EDGES
    with mounted(tmp_path / "mnt", edges.url, tmp_path / "cache", token=TOKENS["alice"]) as mnt:
        datasets = mnt / "datasets"
        assert (datasets / EDGES / "disk.txt").read_bytes() == (public / "disk.txt").read_bytes()
        ondisk = (public / "ondisk.rtdc").read_bytes()
        assert (datasets / EDGES / "ondisk.rtdc").read_bytes() == ondisk
        table = (public / "table.csv").read_bytes()
        assert (datasets / EDGES / "table.csv").read_bytes() == table
        assert (datasets / "edges-too" / "same-table.csv").read_bytes() == table
        counters = edges.external.counters
        assert counters["authorized"] == 0 and counters["requests"] > 0
        assert counters["bytes"] == len(table)  # one identity, the URL: fetched once
        # a link that redirects first (DOIs, repositories) is followed, still without the token
        assert (datasets / "edges-moved" / "moved-table.csv").read_bytes() == table
        secret = edges.data_dir / "private-lab" / "secret" / "notes.txt"
        assert (datasets / "secret" / "notes.txt").read_bytes() == secret.read_bytes()
    assert edges.external.counters["authorized"] == 0
    assert edges.stats.snapshot()["object_requests_authorized"] == 0


# -- §10 bucket names from the server's template --------------------------------------------------

TEMPLATE = "dcor-objects-{organization_id}"


@pytest.fixture(scope="module")
def templated(edges_dir: Path) -> Iterator[DevServer]:
    """The same site with buckets named by another template (`--bucket-template`)."""
    options = SiteOptions(bucket_template=TEMPLATE, external_host=EXTERNAL)
    with DevServer(edges_dir, state_dir=edges_dir / ".devserver", options=options) as server:
        yield server


def public_circle(server: DevServer) -> str:
    _, body = api(server, "organization_show", id="public-lab")
    return str(body["result"]["id"])


def test_devserver_names_buckets_by_its_template_and_dclab_follows(templated: DevServer) -> None:
    bucket = TEMPLATE.format(organization_id=public_circle(templated))
    entry = resource(templated, EDGES, "good.rtdc")
    _, body = api(templated, "dcserv", id=entry["id"], query="basins")
    assert all(f"/{bucket}/" in basin["urls"][0] for basin in body["result"])
    _, shown = api(templated, "resource_show", id=entry["id"])
    assert f"/{bucket}/resource/" in shown["result"]["s3_url"]
    with open_remote(templated, entry["id"]) as remote, dclab.new_dataset(entry["path"]) as local:
        assert np.array_equal(remote["deform"][:], local["deform"][:])


@pytest.fixture(scope="module")
def templated_s3(templated: DevServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server (SeaweedFS) holding the templated site's objects, in its buckets."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs-templated"), weed_or_skip())
    try:
        server.start()
        assert templated.site is not None
        server.populate(templated.site.objects.values())
        yield server.url
    finally:
        server.stop()


def test_s3_only_reads_buckets_named_by_the_template(
    templated: DevServer, templated_s3: str, tmp_path: Path
) -> None:
    circle = public_circle(templated)
    entry = resource(templated, EDGES, "good.rtdc")
    common = ("--s3-only", "--s3-endpoint", templated_s3, "--circle", circle)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = ("--cache-dir", str(tmp_path / "c0"))
    default = dcorfs("mount", str(mnt), *cache, *common, env=CREDENTIALS_ENV)
    if is_mounted(mnt):
        dcorfs("umount", str(mnt))
    assert default.returncode != 0 and f"has no bucket circle-{circle}" in default.stderr
    options = (*common, "--s3-bucket-template", TEMPLATE)
    with (
        mounted(mnt, None, tmp_path / "cache", *options, env=CREDENTIALS_ENV) as mounted_at,
        dclab.new_dataset(entry["path"]) as local,
    ):
        listed = [p.name for p in (mounted_at / "circles" / circle).iterdir()]
        assert entry["id"] in listed
        directory = mounted_at / "circles" / circle / entry["id"]
        assert np.array_equal(np.load(directory / "deform.npy"), local["deform"][:])


def test_s3_endpoint_beside_the_api_uses_the_template(templated: DevServer, tmp_path: Path) -> None:
    """With --s3-endpoint the objects come from the store, under the template's buckets."""
    entry = resource(templated, EDGES, "good.rtdc")
    basins = templated.stats.snapshot()["dcserv_queries"].get("basins", 0)
    options = ("--s3-endpoint", templated.url, "--s3-bucket-template", TEMPLATE)
    with (
        mounted(tmp_path / "mnt", templated.url, tmp_path / "cache", *options) as mnt,
        dclab.new_dataset(entry["path"]) as local,
    ):
        deform = np.load(mnt / "datasets" / EDGES / "good" / "deform.npy")
        assert np.array_equal(deform, local["deform"][:])
    assert templated.stats.snapshot()["dcserv_queries"].get("basins", 0) == basins


# -- units -----------------------------------------------------------------------------------------


def test_failures_are_remembered_for_a_while_and_bounded() -> None:
    now = [0.0]
    failures = Failures(hold=60.0, limit=2, clock=lambda: now[0])
    failures.check("a")
    failures.remember("a", ServerError("dcserv(id=a): HTTP 500"))
    with pytest.raises(ServerError, match="HTTP 500 .remembered"):
        failures.check("a")
    now[0] = 61.0
    failures.check("a")  # expired: the server is asked again
    for key in ("b", "c", "d"):
        failures.remember(key, ServerError(key))
    with pytest.raises(ServerError):
        failures.check("d")
    failures.check("b")  # the oldest made room


def test_bucket_templates_build_and_parse_bucket_names() -> None:
    assert bucket_name("abc") == "circle-abc"
    assert bucket_circle("circle-abc") == "abc"
    assert bucket_name("abc", TEMPLATE) == "dcor-objects-abc"
    assert bucket_circle("dcor-objects-abc", TEMPLATE) == "abc"
    assert bucket_circle("circle-abc", TEMPLATE) is None
    assert bucket_circle("x-abc-y", "x-{organization_id}-y") == "abc"
    key = resource_key("abc", "0123456789", "condensed", TEMPLATE)
    assert key == "dcor-objects-abc/condensed/012/345/6789"
    assert parse_resource_key(key) == ("0123456789", "condensed")
    assert parse_resource_key("http://h:1/a/resource/012/345/6789") is None
    assert parse_bucket_template(TEMPLATE) == TEMPLATE
    for bad in (
        "circle",
        "circle-{id}",
        "{organization_id}-{organization_id}",
        "C-{organization_id}",
    ):
        with pytest.raises(ConfigError):
            parse_bucket_template(bad)


def test_ckan_internal_server_error_is_not_retried_but_other_5xx_are(edges: DevServer) -> None:
    http = Http(policy=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02))
    dcor = DcorApi(http=http, base_url=edges.url, token=None)
    rid = resource(edges, EDGES, "broken.rtdc")["id"]
    try:
        with pytest.raises(ServerError, match="HTTP 500: Internal Server Error"):
            dcor.dcserv(rid, "metadata", deadline=time.monotonic() + 30)
        assert http.request_counts()["api"] == 1
        edges.faults.update({"error_rate": 1.0, "api_faults": True})
        try:
            with pytest.raises(TransientError):  # a busy site (503): retried
                dcor.dcserv(rid, "metadata", deadline=time.monotonic() + 30)
        finally:
            edges.faults.update({"error_rate": 0.0, "api_faults": False})
        assert http.request_counts()["api"] == 4
    finally:
        http.close()
