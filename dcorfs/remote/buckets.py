"""What exists in the buckets of some circles, without DCOR's API (`--s3-only`).

A circle's resources are the `resource/` objects of its bucket (ListObjectsV2, which needs
credentials on DCOR), named by resource id; sizes and ETags come with the listing, and so do
those of the `condensed/` objects. Without the right to list (anonymous access), any resource
still resolves by id: its object is probed. Records are the catalog's (`Dataset`,
`Resource`), so the rest of the mount treats them like resources found through CKAN: a
circle stands in for the dataset, a resource is called `<id>.rtdc` (S3 keeps no file names).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from ..cache import answers
from ..cache.metastore import FOREVER, Memo
from ..errors import AccessDenied, DcorfsError, NotFound
from .catalog import Dataset, Resource
from .dcserv import BUCKET_TEMPLATE, bucket_circle, bucket_name, parse_resource_key, resource_key
from .s3 import ObjectStore

log = logging.getLogger(__name__)
PREFIXES = ("resource/", "condensed/")


class BucketCatalog:
    """Resources of the given circles, listed from their buckets, remembered through `Memo`."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        memo: Memo,
        circles: Sequence[str],
        dir_cache_time: float,
        bucket_template: str = BUCKET_TEMPLATE,
    ) -> None:
        """`bucket_template`: how the server names a circle's bucket (doc/DCOR.md §10)."""
        self._store = store
        self._memo = memo
        self.circles = tuple(circles)
        self._listing_age = dir_cache_time
        self._denied: dict[str, float] = {}  # circle -> when listing it was refused
        self._template = bucket_template

    def _listing(self, circle_id: str) -> dict[str, Any]:
        """bucket/key -> {size, etag, mtime} of the circle's resource and condensed objects."""
        refused = self._denied.get(circle_id)
        if refused is not None and time.monotonic() - refused < self._listing_age:
            raise AccessDenied(f"listing the bucket of circle {circle_id} is not allowed")
        bucket = bucket_name(circle_id, self._template)

        def ask(deadline: float) -> dict[str, Any]:
            return {
                obj.key: {"size": obj.size, "etag": obj.etag, "mtime": obj.mtime}
                for prefix in PREFIXES
                for obj in self._store.list(bucket, prefix, deadline=deadline)
            }

        try:
            return self._memo.get(answers.bucket_listing(bucket), ask, max_age=self._listing_age)  # type: ignore[no-any-return]
        except AccessDenied:
            self._denied[circle_id] = time.monotonic()
            raise

    def dataset(self, circle_id: str) -> Dataset:
        """The record a circle stands in with, where the tree expects a dataset."""
        return Dataset(
            id=bucket_name(circle_id, self._template),
            circle_id=circle_id,
            name=circle_id,
            title="",
            circle=circle_id,
            private=False,
            mtime=0.0,
            resources=(),
            record={},
        )

    def _record(self, circle_id: str, resource_id: str, entry: dict[str, Any]) -> Resource:
        return Resource(
            id=resource_id,
            name=f"{resource_id}.rtdc",
            dataset_id=bucket_name(circle_id, self._template),
            circle_id=circle_id,
            size=int(entry["size"]),
            etag=str(entry["etag"]),
            mtime=float(entry.get("mtime", 0.0)),
            is_rtdc=True,  # a guess: the tree looks at the object's first bytes
            s3_url=None,
        )

    def resources(self, circle_id: str) -> list[Resource]:
        """Every resource in the circle's bucket (AccessDenied without the right to list)."""
        found = []
        for key, entry in sorted(self._listing(circle_id).items()):
            parsed = parse_resource_key(key)
            if parsed is not None and parsed[1] == "resource":
                found.append(self._record(circle_id, parsed[0], entry))
        return found

    def resource(self, circle_id: str, resource_id: str) -> Resource:
        """One resource by id: from the listing, or else (not allowed to list) probed."""
        key = resource_key(circle_id, resource_id, template=self._template)
        try:
            listing = self._listing(circle_id)
        except AccessDenied:
            listing = None
        if listing is not None:
            entry = listing.get(key)
            if entry is None:
                raise NotFound(f"no resource {resource_id} in circle {circle_id}")
            return self._record(circle_id, resource_id, entry)

        def ask(deadline: float) -> dict[str, Any]:
            info = self._store.probe(key, deadline=deadline)
            return {"size": info.size, "etag": info.etag}

        # the key under which `Resources` remembers object identities too
        entry = self._memo.get(answers.object_info(key), ask, max_age=FOREVER)
        return self._record(circle_id, resource_id, entry)

    def find(self, resource_id: str) -> tuple[Dataset, Resource]:
        """A resource by id in any of the circles (by-id/)."""
        denied: AccessDenied | None = None
        for circle_id in self.circles:
            try:
                return self.dataset(circle_id), self.resource(circle_id, resource_id)
            except NotFound:
                continue
            except AccessDenied as exc:
                denied = denied or exc
        if denied is not None:
            raise AccessDenied(f"resource {resource_id}: {denied}")
        raise NotFound(f"no resource {resource_id} in the circles of this mount")

    def listed(self, key: str) -> tuple[int, str] | None:
        """(size, ETag) of an object from its bucket's listing; None when there is no listing
        (`Resources` probes the object then); NotFound when the listing lacks the object."""
        parsed = parse_resource_key(key)
        circle_id = bucket_circle(key.split("/", 1)[0], self._template)
        if parsed is None or circle_id not in self.circles:
            return None
        try:
            entry = self._listing(circle_id).get(key)
        except DcorfsError as exc:
            log.debug("no listing for %s: %s", key, exc)
            return None
        if entry is None:
            raise NotFound(f"{key} is not in its bucket's listing")
        return int(entry["size"]), str(entry["etag"])
