"""CKAN action API shapes, pagination and dcserv errors, as in doc/DCOR.md, "The calls"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dcorfs.devserver.datadir import write_json
from dcorfs.devserver.server import DevServer

from ..conftest import TOKENS, api, resource


def ok(answer: tuple[int, Any]) -> Any:
    status, body = answer
    assert status == 200, body
    assert body["success"] is True
    assert body["help"].endswith("/api/3/action/help_show?name=" + body["help"].rsplit("=", 1)[1])
    return body["result"]


def error(answer: tuple[int, Any], status: int, kind: str) -> str:
    got, body = answer
    assert got == status, body
    assert body["success"] is False and body["error"]["__type"] == kind
    message: str = body["error"].get("message", "")
    return message


# -- dcserv -------------------------------------------------------------------------------


def test_dcserv_queries(devserver: DevServer) -> None:
    rid = resource(devserver, "generated", "M001_data.rtdc")["id"]
    meta = ok(api(devserver, "dcserv", id=rid, query="metadata"))
    assert meta["experiment"]["sample"] and meta["experiment"]["run index"] == 1
    assert meta["experiment"]["event count"] == 300
    assert "filtering" not in meta
    assert ok(api(devserver, "dcserv", id=rid, query="size")) == 300
    assert ok(api(devserver, "dcserv", id=rid, query="feature_list")) == []
    assert ok(api(devserver, "dcserv", id=rid, query="valid")) is True
    assert ok(api(devserver, "dcserv", id=rid, query="trace_list")) == [
        "fl1_median",
        "fl1_raw",
        "fl2_median",
        "fl2_raw",
        "fl3_median",
        "fl3_raw",
    ]
    logs = ok(api(devserver, "dcserv", id=rid, query="logs"))
    assert {"src_acquisition", "dcorfs-sample", "dclab-condense"} <= set(logs)
    assert all(isinstance(line, str) for line in logs["src_acquisition"])
    tables = ok(api(devserver, "dcserv", id=rid, query="tables"))
    columns, rows = tables["src_monitor"]
    assert columns[:2] == ["time", "temperature"] and len(rows[0]) == len(columns)


def test_dcserv_basins_public(devserver: DevServer) -> None:
    rid = resource(devserver, "generated", "M001_data.rtdc")["id"]
    condensed, original = ok(api(devserver, "dcserv", id=rid, query="basins"))
    assert condensed["name"] == f"condensed-{rid[:5]}" and original["name"] == f"resource-{rid[:5]}"
    for basin, artifact in ((condensed, "condensed"), (original, "resource")):
        assert (
            basin["format"] == "http" and basin["type"] == "remote" and basin["mapping"] == "same"
        )
        assert basin["perishable"] is False and basin["key"] == f"dcor-{artifact}-{rid}"
        (url,) = basin["urls"]
        assert f"/{artifact}/{rid[:3]}/{rid[3:6]}/{rid[6:]}" in url and "?" not in url
        assert url.startswith(devserver.url)  # explicit port, as DCOR's object URLs have
    assert "volume" in condensed["features"] and "image" in condensed["features"]  # intra default
    assert "image" in original["features"] and "volume" not in original["features"]


def test_dcserv_basins_private(devserver: DevServer) -> None:
    rid = resource(devserver, "secret-study", "M001_data.rtdc")["id"]
    basins = ok(api(devserver, "dcserv", TOKENS["alice"], id=rid, query="basins"))
    for basin, artifact in zip(basins, ("condensed", "resource"), strict=True):
        assert basin["perishable"] is True and basin["key"] == f"dcor-presigned-{artifact}-{rid}"
        assert isinstance(basin["time_request"], float) and isinstance(
            basin["time_expiration"], int
        )
        assert 0.85 * 3600 < basin["time_expiration"] - basin["time_request"] < 1.15 * 3600
        assert "&Expires=" in basin["urls"][0] and "Signature=" in basin["urls"][0]


def test_dcserv_errors(devserver: DevServer, data_dir: Path) -> None:
    rid = resource(devserver, "generated", "M001_data.rtdc")["id"]
    secret = resource(devserver, "secret-study", "M001_data.rtdc")["id"]
    text = resource(devserver, "generated", "notes.txt")["id"]
    no_traces = resource(devserver, "generated", "M002_data.rtdc")["id"]
    assert error(api(devserver, "dcserv", id=rid), 409, "Validation Error") == (
        "Please specify 'query' parameter!"
    )
    assert error(api(devserver, "dcserv", query="size"), 409, "Validation Error") == (
        "Please specify 'id' parameter!"
    )
    assert "not supported anymore" in error(
        api(devserver, "dcserv", id=rid, query="size", version="1"), 409, "Validation Error"
    )
    assert error(
        api(devserver, "dcserv", id=rid, query="size", version="3"), 409, "Validation Error"
    ) == ("Please specify version '1' or '2'!")
    for removed in ("feature", "trace", "bogus"):
        assert error(api(devserver, "dcserv", id=rid, query=removed), 409, "Validation Error") == (
            f"Invalid query parameter '{removed}'!"
        )
    unknown = "00000000-0000-0000-0000-000000000000"
    assert error(
        api(devserver, "dcserv", id=unknown, query="size"), 404, "Not Found Error"
    ).startswith("Not found")
    assert error(api(devserver, "dcserv", id=secret, query="size"), 403, "Authorization Error") == (
        f"Access denied: User  not authorized to read resource {secret}"
    )
    assert error(
        api(devserver, "dcserv", TOKENS["bob"], id=secret, query="size"), 403, "Authorization Error"
    ) == (f"Access denied: User bob not authorized to read resource {secret}")
    assert error(api(devserver, "dcserv", id=text, query="size"), 409, "Validation Error") == (
        f"Resource ID {text} must be an .rtdc dataset!"
    )
    # dc_serve 1.0.9 fails on trace_list of a file without traces
    error(api(devserver, "dcserv", id=no_traces, query="trace_list"), 500, "Internal Server Error")


def test_dcserv_post_json_compares_version_as_string(devserver: DevServer) -> None:
    rid = resource(devserver, "generated", "M001_data.rtdc")["id"]
    url = f"{devserver.url}/api/3/action/dcserv"
    answer = requests.post(url, json={"id": rid, "query": "size", "version": 2}, timeout=30)
    assert answer.status_code == 409
    answer = requests.post(url, json={"id": rid, "query": "size", "version": "2"}, timeout=30)
    assert answer.json()["result"] == 300


def test_empty_authorization_is_anonymous(devserver: DevServer) -> None:
    rid = resource(devserver, "generated", "M001_data.rtdc")["id"]
    answer = requests.get(
        f"{devserver.url}/api/3/action/dcserv",
        params={"id": rid, "query": "size"},
        headers={"Authorization": ""},
        timeout=30,
    )
    assert answer.json()["result"] == 300


def test_unknown_action_is_a_bare_string(devserver: DevServer) -> None:
    status, body = api(devserver, "resource_download")
    assert status == 400 and body == "Bad request - Action name not known: resource_download"


# -- datasets and resources ---------------------------------------------------------------


def test_package_search_visibility_and_filters(devserver: DevServer) -> None:
    names = {ds["name"] for ds in ok(api(devserver, "package_search", rows=100))["results"]}
    assert "secret-study" not in names and "generated" in names
    anon_private = ok(api(devserver, "package_search", rows=100, include_private="true"))
    assert "secret-study" not in {ds["name"] for ds in anon_private["results"]}
    with_token = ok(
        api(devserver, "package_search", TOKENS["alice"], rows=100, include_private="true")
    )
    assert "secret-study" in {ds["name"] for ds in with_token["results"]}
    bob = ok(api(devserver, "package_search", TOKENS["bob"], rows=100, include_private="true"))
    assert "secret-study" not in {ds["name"] for ds in bob["results"]}

    by_circle = ok(api(devserver, "package_search", fq="organization:public-lab", rows=100))
    assert by_circle["count"] >= 1
    assert all(ds["organization"]["name"] == "public-lab" for ds in by_circle["results"])
    by_collection = ok(api(devserver, "package_search", fq="groups:showcase"))
    assert [ds["name"] for ds in by_collection["results"]] == ["generated"]
    assert ok(api(devserver, "package_search", q="HL60"))["count"] == 1
    assert ok(api(devserver, "package_search", q="name:gen*"))["count"] == 1
    assert ok(api(devserver, "package_search", q="nothing-matches-this"))["count"] == 0
    message = error(api(devserver, "package_search", q="nosuchfield:x"), 400, "Search Query Error")
    assert "nosuchfield" in message


def test_package_search_pagination(devserver: DevServer) -> None:
    everything = ok(api(devserver, "package_search", rows=1000))
    total = everything["count"]
    assert total == len(everything["results"]) >= 2
    assert everything["sort"] == "score desc, metadata_modified desc"
    assert everything["facets"] == {} and everything["search_facets"] == {}
    pages = [ok(api(devserver, "package_search", rows=1, start=i))["results"] for i in range(total)]
    assert [p[0]["id"] for p in pages] == [ds["id"] for ds in everything["results"]]
    assert ok(api(devserver, "package_search", rows=1, start=total))["results"] == []
    assert ok(api(devserver, "package_search", rows=5000))["count"] == total  # capped, not refused
    assert error(api(devserver, "package_search", rows="many"), 409, "Validation Error") == ""
    status, body = api(devserver, "package_search", rows="many")
    assert body["error"]["rows"] == ["Invalid integer"]


def test_package_and_resource_show(devserver: DevServer) -> None:
    entry = resource(devserver, "generated", "M001_data.rtdc")
    by_name = ok(api(devserver, "package_show", id="generated"))
    by_id = ok(api(devserver, "package_show", id=by_name["id"]))
    assert by_name == by_id
    assert (
        by_name["organization"]["name"] == "public-lab"
        and by_name["owner_org"] == by_name["organization"]["id"]
    )
    assert [g["name"] for g in by_name["groups"]] == ["showcase"]
    assert by_name["num_resources"] == len(by_name["resources"]) == 3
    assert [r["position"] for r in by_name["resources"]] == [0, 1, 2]
    res = ok(api(devserver, "resource_show", id=entry["id"]))
    assert res == next(r for r in by_name["resources"] if r["id"] == entry["id"])
    data = Path(entry["path"]).read_bytes()
    import hashlib

    assert res["size"] == len(data)
    assert res["etag"] == hashlib.md5(data).hexdigest()
    assert res["sha256"] == hashlib.sha256(data).hexdigest()
    assert res["format"] == "RT-FDC" and res["mimetype"] == "RT-DC"
    assert res["dc:experiment:event count"] == 300 and res["dc:imaging:roi size x"] == 250
    assert res["s3_url"].endswith(
        f"/resource/{entry['id'][:3]}/{entry['id'][3:6]}/{entry['id'][6:]}"
    )
    assert res["url"].endswith(f"/resource/{entry['id']}/download/m001_data.rtdc")
    text = ok(
        api(devserver, "resource_show", id=resource(devserver, "generated", "notes.txt")["id"])
    )
    assert text["format"] == "TXT" and text["mimetype"] == "text/plain"

    secret = resource(devserver, "secret-study", "M001_data.rtdc")
    assert error(
        api(devserver, "package_show", id="secret-study"), 403, "Authorization Error"
    ).startswith("Access denied: User  not authorized to read package")
    assert ok(api(devserver, "package_show", TOKENS["alice"], id="secret-study"))["private"] is True
    error(api(devserver, "resource_show", id=secret["id"]), 403, "Authorization Error")
    error(api(devserver, "package_show", id="no-such-dataset"), 404, "Not Found Error")


# -- circles and collections --------------------------------------------------------------


@pytest.fixture(scope="module")
def many_circles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    root = tmp_path_factory.mktemp("many")
    for i in range(30):
        ds = root / f"circle-{i:02d}" / f"dataset-{i:02d}"
        write_json(ds / "dataset.json", {"collections": [f"collection-{i % 27:02d}"]})
        (ds / "readme.txt").write_text(f"dataset {i}\n")
    with DevServer(root) as server:
        yield server


@pytest.mark.parametrize(("action", "count"), [("organization_list", 30), ("group_list", 27)])
def test_list_caps_and_pagination(many_circles: DevServer, action: str, count: int) -> None:
    names = ok(api(many_circles, action))
    assert len(names) == count and all(isinstance(n, str) for n in names)
    first = ok(api(many_circles, action, all_fields="true", limit=1000))
    assert len(first) == 25  # all_fields caps at 25
    assert first[0]["is_organization"] is (action == "organization_list")
    assert {"id", "name", "title", "package_count", "created"} <= set(first[0])
    second = ok(api(many_circles, action, all_fields="true", offset=25))
    assert len(second) == count - 25
    assert [g["name"] for g in first + second] == names
    assert ok(api(many_circles, action, all_fields="true", offset=count)) == []


def test_organization_and_group_show(devserver: DevServer) -> None:
    circle = ok(api(devserver, "organization_show", id="public-lab"))
    assert circle["type"] == "organization" and circle["package_count"] >= 1
    assert ok(api(devserver, "organization_show", id=circle["id"]))["name"] == "public-lab"
    private = ok(api(devserver, "organization_show", id="private-lab"))
    assert private["package_count"] == 0  # the private datasets are not visible anonymously
    assert (
        ok(api(devserver, "organization_show", TOKENS["alice"], id="private-lab"))["package_count"]
        == 2
    )
    group = ok(api(devserver, "group_show", id="showcase", include_datasets="true"))
    assert group["type"] == "group" and [p["name"] for p in group["packages"]] == ["generated"]
    error(api(devserver, "group_show", id="nope"), 404, "Not Found Error")


def test_status_show(devserver: DevServer) -> None:
    status = ok(api(devserver, "status_show"))
    assert status["ckan_version"].startswith("2.") and status["site_url"] == devserver.url
    assert "dc_serve" in status["extensions"]
