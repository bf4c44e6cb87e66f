"""DCOR's edges (doc/DCOR.md §8, §9): files the server cannot open, resources dcserv refuses as
not RT-DC, tokens the host takes for anonymous. Each: the devserver behaves like DCOR (dclab's
own client agrees), and the mount copes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dclab
import numpy as np
import pytest
from dclab.rtdc_dataset.fmt_dcor.api import APIHandler, DCORAccessError

from dcorfs.devserver.datadir import write_json
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.devserver.server import DevServer

from .conftest import TOKENS, api, resource
from .mounts import log_lines, mounted

pytestmark = [pytest.mark.filterwarnings("ignore::dclab.http_utils.ConnectionTimeoutWarning")]
EDGES = "edges"


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
    write_json(edges / "dataset.json", {"title": "Edges"})
    spec = SampleSpec(events=40, seed=21, images=False, traces=False)
    write_rtdc(edges / "good.rtdc", spec)
    write_rtdc(edges / "broken.rtdc", spec)
    with (edges / "broken.rtdc").open("r+b") as handle:
        handle.truncate((edges / "broken.rtdc").stat().st_size // 2)
    write_rtdc(edges / "UPPER.RTDC", spec)
    secret = root / "private-lab" / "secret"
    write_json(secret / "dataset.json", {"title": "Secret", "private": True})
    write_rtdc(secret / "M001.rtdc", spec)
    return root


@pytest.fixture(scope="module")
def edges(edges_dir: Path) -> Iterator[DevServer]:
    with DevServer(edges_dir) as server:
        yield server


@pytest.fixture(autouse=True)
def forget_api_keys() -> Iterator[None]:
    """dclab remembers tokens class-wide and tries them all; every test starts without."""
    APIHandler.api_keys = []
    yield
    APIHandler.api_keys = []


def open_remote(server: DevServer, rid: str, token: str = "") -> Any:
    host = server.url.split("://", 1)[1]
    return dclab.new_dataset(rid, host=host, use_ssl=False, api_key=token, remember_api_key=False)


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
