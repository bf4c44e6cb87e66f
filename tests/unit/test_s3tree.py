"""`--s3-only`'s namespace (`fs.s3tree`) over a fake object store at the transport boundary:
circles from the mount's options, resources from bucket listings, ids resolved where listing
is refused, plain objects as one file `resource`, nodes kept across lookups."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

from dcorfs.cache.derived import DerivedCache
from dcorfs.cache.identity import ObjectId
from dcorfs.errors import AccessDenied, NotFound
from dcorfs.fs.s3tree import PLAIN_NAME, BucketResourceDir, build_s3_root
from dcorfs.fs.tree import Context, Dir, File
from dcorfs.opening.pools import Pools
from dcorfs.remote.catalog import Dataset, Resource
from dcorfs.remote.dcserv import resource_key
from tests.unit.test_buckets import Store, made

HDF5 = "01234567-89ab-cdef-0123-456789abcdef"
PDF = "fedcba98-7654-3210-fedc-ba9876543210"
LOCKED = "11111111-2222-3333-4444-555555555555"
PDF_BYTES = b"%PDF-1.4 not an HDF5 file"


class Objects:
    """The objects of resources (`fs.tree.Located`): which are HDF5, and the plain ones'
    identities, registered with the cache so that their bytes can be read."""

    def __init__(self, cache: DerivedCache, plain: dict[str, bytes]) -> None:
        self.asked: list[str] = []
        self._ids: dict[str, ObjectId] = {}
        for rid, data in plain.items():
            obj = ObjectId(key=f"plain/{rid}", etag="e", size=len(data))
            cache.register(obj, lambda start, stop, deadline, data=data: data[start:stop])
            self._ids[rid] = obj

    def is_hdf5(self, dataset: Dataset, resource: Resource) -> bool:
        self.asked.append(resource.id)
        return resource.id not in self._ids

    def plain(self, dataset: Dataset, resource: Resource) -> ObjectId:
        return self._ids[resource.id]


@pytest.fixture
def tree() -> Any:
    store = Store(
        {
            "circle-open": {
                resource_key("open", HDF5): 1000,
                resource_key("open", HDF5, "condensed"): 100,
                resource_key("open", PDF): len(PDF_BYTES),
            },
            "circle-shut": {resource_key("shut", LOCKED): 50},
        },
        refused={"circle-shut"},
    )
    buckets = made(store, "open", "shut")
    cache = DerivedCache(store=None)
    objects = Objects(cache, {PDF: PDF_BYTES, LOCKED: b"x" * 50})
    pools = Pools()
    ctx = Context(
        resources=cast(Any, None), objects=objects, pools=pools, cache=cache, dir_cache_time=60
    )
    root = build_s3_root(ctx, buckets, lambda: b"{}", mtime=1.0)
    try:
        yield root, store, objects
    finally:
        pools.close()


def _dir(node: Any) -> Dir:
    assert isinstance(node, Dir)
    return node


def test_the_root_has_the_circles_given_and_nothing_of_ckan(tree: Any) -> None:
    root, store, _ = tree
    assert set(root.children()) == {"README.txt", "by-id", "circles", ".dcorfs"}
    assert set(_dir(root.lookup("circles")).children()) == {"open", "shut"}
    assert store.lists == []  # naming the circles lists no bucket


def test_a_circle_lists_its_resources_by_id_and_keeps_their_nodes(tree: Any) -> None:
    root, store, _ = tree
    circle = _dir(_dir(root.lookup("circles")).lookup("open"))
    children = circle.children()
    assert set(children) == {HDF5, PDF}  # condensed objects are no resources
    assert all(isinstance(node, BucketResourceDir) for node in children.values())
    assert circle.lookup(HDF5) is children[HDF5]
    with pytest.raises(NotFound):
        circle.lookup(LOCKED)  # listed, and not there


def test_a_plain_object_is_one_file_with_its_bytes(tree: Any) -> None:
    root, _, objects = tree
    directory = _dir(_dir(_dir(root.lookup("circles")).lookup("open")).lookup(PDF))
    (name,) = directory.children()
    node = directory.lookup(name)
    assert name == PLAIN_NAME and isinstance(node, File) and node.size == len(PDF_BYTES)
    data = node.content().read(0, node.size, deadline=time.monotonic() + 9)
    assert data == PDF_BYTES and objects.asked == [PDF]


def test_a_circle_that_may_not_be_listed_resolves_ids_by_probing(tree: Any) -> None:
    root, store, _ = tree
    circle = _dir(_dir(root.lookup("circles")).lookup("shut"))
    with pytest.raises(AccessDenied):
        circle.children()
    node = circle.lookup(LOCKED)
    assert isinstance(node, BucketResourceDir) and node.resource.size == 50
    assert circle.lookup(LOCKED) is node  # resolved once
    assert store.probes == [resource_key("shut", LOCKED)]
    with pytest.raises(NotFound, match="not a resource id"):
        circle.lookup("README")


def test_by_id_finds_a_resource_in_any_circle_and_lists_what_was_found(tree: Any) -> None:
    root, _, _ = tree
    by_id = _dir(root.lookup("by-id"))
    assert by_id.children() == {}
    found = by_id.lookup(PDF)
    assert isinstance(found, BucketResourceDir) and found.dataset.circle_id == "open"
    assert by_id.lookup(LOCKED).resource.id == LOCKED  # type: ignore[attr-defined]
    assert set(by_id.children()) == {PDF, LOCKED}
    with pytest.raises(NotFound):
        by_id.lookup("99999999-2222-3333-4444-555555555555")
