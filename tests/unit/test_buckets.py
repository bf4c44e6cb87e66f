"""`--s3-only`'s catalog of circles' buckets (`remote.buckets`) over a fake object store at the
transport boundary: resources from listings, refusals remembered, probes where listing is not
allowed, lookups by id across circles (doc/DCOR.md §10)."""

from __future__ import annotations

from typing import Any

import pytest

from dcorfs.cache.metastore import Memo, MetaStore
from dcorfs.errors import AccessDenied, NotFound
from dcorfs.remote.buckets import BucketCatalog
from dcorfs.remote.dcserv import resource_key
from dcorfs.remote.http import ObjectInfo
from dcorfs.remote.s3 import Listed

RID = "0123456789-abcd-ef01-2345-6789abcdef01"
OTHER = "fedcba9876-abcd-ef01-2345-6789abcdef01"


class Store:
    """Buckets as dicts of key -> size; `refused`: buckets that may not be listed."""

    def __init__(
        self,
        buckets: dict[str, dict[str, int]],
        refused: set[str],
        private: frozenset[str] = frozenset(),
    ) -> None:
        self.buckets = buckets
        self.refused = refused
        self.private = private  # buckets whose objects cannot be read either
        self.lists: list[str] = []
        self.probes: list[str] = []

    def list(self, bucket: str, prefix: str, *, deadline: float, **_: Any) -> list[Listed]:
        self.lists.append(bucket)
        if bucket in self.refused:
            raise AccessDenied("AccessDenied: listing refused")
        return [
            Listed(key=key, size=size, etag=f"etag-{size}", mtime=1.0)
            for key, size in sorted(self.buckets.get(bucket, {}).items())
            if key.split("/", 1)[1].startswith(prefix)
        ]

    def probe(self, key: str, *, head: int = 1, deadline: float) -> ObjectInfo:
        self.probes.append(key)
        bucket = key.split("/", 1)[0]
        if bucket in self.private:
            raise AccessDenied("AccessDenied: reading refused")
        if key not in self.buckets.get(bucket, {}):
            raise NotFound(key)
        return ObjectInfo(size=self.buckets[bucket][key], etag="probed")


def made(store: Store, *circles: str) -> BucketCatalog:
    memo = Memo(MetaStore(None, scope="test"))
    return BucketCatalog(store=store, memo=memo, circles=circles, dir_cache_time=300)  # type: ignore[arg-type]


def test_resources_come_from_the_listing_and_condensed_objects_are_not_resources() -> None:
    key, condensed = resource_key("c1", RID), resource_key("c1", RID, "condensed")
    store = Store({"circle-c1": {key: 100, condensed: 10, "circle-c1/other/x": 5}}, set())
    catalog = made(store, "c1")
    (resource,) = catalog.resources("c1")
    assert (resource.id, resource.size, resource.etag, resource.name) == (
        RID,
        100,
        "etag-100",
        f"{RID}.rtdc",
    )
    assert catalog.listed(condensed) == (10, "etag-10")
    with pytest.raises(NotFound):
        catalog.listed(resource_key("c1", OTHER))
    assert catalog.listed("elsewhere/resource/abc/def/ghi") is None
    catalog.resources("c1")
    assert len(store.lists) == 2  # two prefixes, listed once: remembered


def test_a_refused_listing_is_remembered_and_single_resources_are_probed() -> None:
    key = resource_key("c2", RID)
    store = Store({"circle-c2": {key: 42}}, {"circle-c2"})
    catalog = made(store, "c2")
    for _ in range(2):
        with pytest.raises(AccessDenied):
            catalog.resources("c2")
    assert store.lists == ["circle-c2"]  # refused once, not asked again meanwhile
    resource = catalog.resource("c2", RID)
    assert (resource.size, resource.etag) == (42, "probed")
    catalog.resource("c2", RID)
    assert store.probes == [key]  # the probe is remembered too
    with pytest.raises(NotFound):
        catalog.resource("c2", OTHER)


def test_find_looks_in_every_circle() -> None:
    store = Store(
        {"circle-a": {}, "circle-b": {resource_key("b", RID): 7}},
        {"circle-c"},
        frozenset({"circle-c"}),
    )
    catalog = made(store, "a", "b")
    dataset, resource = catalog.find(RID)
    assert (dataset.circle_id, resource.size) == ("b", 7)
    with pytest.raises(NotFound):
        catalog.find(OTHER)
    refused = made(store, "a", "c")
    with pytest.raises(AccessDenied):  # it may be where it cannot be looked for
        refused.find(OTHER)
