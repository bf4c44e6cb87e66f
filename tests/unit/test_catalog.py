"""The catalog of a DCOR host (`remote.catalog`) over a fake API at the transport boundary: pages
of names and of searches, bad records skipped, drafts hidden, answers remembered for as long
as they may not change (doc/DCOR.md §4, §5, §7, §11)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from dcorfs.cache.metastore import Memo, MetaStore
from dcorfs.errors import NotFound
from dcorfs.remote.catalog import GROUP_PAGE, Catalog, parse_dataset


class Api:
    """Canned CKAN answers; counts the calls (the transport boundary of `Catalog`)."""

    def __init__(self, names: list[str], datasets: list[dict[str, Any]], page: int) -> None:
        self.names = names
        self.datasets = datasets
        self.page = page
        self.authenticated = False
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.logs: dict[str, Any] = {"src": ["a"]}

    def action(self, name: str, params: dict[str, str], *, deadline: float) -> Any:
        self.calls.append((name, dict(params)))
        if name == "organization_list":
            start, limit = int(params["offset"]), int(params["limit"])
            return self.names[start : start + limit]
        if name == "package_search":
            start = int(params["start"])
            return {
                "count": len(self.datasets),
                "results": self.datasets[start : start + self.page],
            }
        if name == "package_show":
            return next(d for d in self.datasets if params["id"] in (d["id"], d["name"]))
        if name == "resource_show":
            for dataset in self.datasets:
                for resource in dataset["resources"]:
                    if resource["id"] == params["id"]:
                        return resource
        raise AssertionError(name)

    def dcserv(self, resource_id: str, query: str, *, deadline: float) -> Any:
        self.calls.append(("dcserv", {"query": query}))
        return self.logs


def dataset(i: int, **fields: Any) -> dict[str, Any]:
    record = {
        "id": f"id-{i}",
        "name": f"dataset-{i:04d}",
        "owner_org": "circle-1",
        "organization": {"id": "circle-1", "name": "lab"},
        "resources": [
            {"id": f"r-{i}", "name": "M001_data.rtdc", "package_id": f"id-{i}", "size": 10}
        ],
    }
    record.update(fields)
    return record


def catalog(api: Api, age: float = 300.0) -> Catalog:
    memo = Memo(MetaStore(None, scope="test"))
    return Catalog(api=api, memo=memo, dir_cache_time=age)  # type: ignore[arg-type]


def test_circles_are_read_in_pages_of_names_until_an_empty_one() -> None:
    names = [f"circle-{i:05d}" for i in range(2 * GROUP_PAGE + 5)]
    api = Api(names, [], page=10)
    listing = catalog(api).circles()
    assert [g.name for g in listing.entries] == names
    offsets = [int(p["offset"]) for n, p in api.calls if n == "organization_list"]
    assert offsets == [0, GROUP_PAGE, 2 * GROUP_PAGE, 2 * GROUP_PAGE + 5]  # the last is empty
    assert all(p["all_fields"] == "false" for _, p in api.calls)


def test_datasets_are_read_in_pages_and_bad_records_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    records = [dataset(i) for i in range(25)]
    records[3] = {"name": "no-circle"}  # broken: skipped with one log line
    records[7]["resources"].append({"name": "no id"})  # a broken resource: only it is skipped
    api = Api([], records, page=10)
    with caplog.at_level(logging.WARNING):
        listing = catalog(api).datasets()
    assert len(listing.entries) == 24
    assert len(next(d for d in listing.entries if d.id == "id-7").resources) == 1
    assert [int(p["start"]) for n, p in api.calls if n == "package_search"] == [0, 10, 20]
    assert sum("skipping" in r.message for r in caplog.records) == 2
    assert all("include_private" not in p for _, p in api.calls)  # anonymous
    api.authenticated = True
    catalog(api).datasets("organization:lab")
    asked = [p for n, p in api.calls if n == "package_search"][-1]
    assert asked["include_private"] == "true" and asked["fq"] == "organization:lab"


def test_drafts_and_deleted_datasets_are_not_found() -> None:
    api = Api([], [dataset(1, state="draft"), dataset(2, state="deleted"), dataset(3)], page=10)
    made = catalog(api)
    for name in ("dataset-0001", "dataset-0002"):
        with pytest.raises(NotFound):
            made.dataset(name)
    assert made.dataset("dataset-0003").resources[0].is_rtdc


def test_a_resource_is_found_with_its_dataset_and_remembered() -> None:
    api = Api([], [dataset(1), dataset(2)], page=10)
    made = catalog(api)
    found, resource = made.resource("r-2")
    assert (found.name, resource.id, resource.circle_id) == ("dataset-0002", "r-2", "circle-1")
    made.resource("r-2")
    assert sum(n == "resource_show" for n, _ in api.calls) == 1


def test_logs_are_kept_for_good_only_with_the_condensing_logs() -> None:
    api = Api([], [], page=10)
    made = catalog(api, age=0.0)  # what is not kept for good is asked again at once
    for _ in range(2):
        assert made.dcserv("r-1", "logs") == {"src": ["a"]}
    assert sum(n == "dcserv" for n, _ in api.calls) == 2  # without them: asked again
    api.logs = {"src": ["a"], "dclab-condense": ["b"]}
    made = catalog(api, age=0.0)
    for _ in range(3):
        made.dcserv("r-2", "logs")
    assert sum(n == "dcserv" for n, _ in api.calls) == 3  # with them: once


def test_parse_dataset_takes_the_circle_from_the_organization() -> None:
    parsed = parse_dataset(dataset(5, owner_org="other", private=True, title="T"))
    assert (parsed.circle_id, parsed.circle, parsed.private, parsed.title) == (
        "circle-1",
        "lab",
        True,
        "T",
    )
