"""What exists on a DCOR host, as typed records: circles, collections, datasets, resources.

Answers come through `Memo`: listings are asked again after `dir_cache_time`, records of
datasets after the same time (resources may be added), a resource's own record never (DCOR
resources are immutable). Malformed entries from the server are skipped with one log line;
they never break a listing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .dcserv import DcorApi
from .errors import ProtocolError
from .metastore import FOREVER, Memo

log = logging.getLogger(__name__)

RTDC_SUFFIXES = (".rtdc", ".dc")
GROUP_PAGE = 25  # CKAN caps organization_list/group_list with all_fields at 25
SEARCH_PAGE = 1000  # and package_search rows at 1000
CONDENSING_LOG = "dclab-condense"  # the logs DCOR's condensing adds (doc/DCOR.md §7)


@dataclass(frozen=True)
class Group:
    """A circle (CKAN organization) or a collection (CKAN group)."""

    id: str
    name: str
    title: str


@dataclass(frozen=True)
class Resource:
    id: str
    name: str
    dataset_id: str
    circle_id: str
    size: int | None
    etag: str | None
    mtime: float
    is_rtdc: bool
    s3_url: str | None


@dataclass(frozen=True)
class Dataset:
    id: str
    circle_id: str
    name: str
    title: str
    circle: str
    private: bool
    mtime: float
    resources: tuple[Resource, ...]
    record: dict[str, Any]


MAX_SIZE = (1 << 63) - 1  # what a file size can be (st_size); larger ones are probed


def _timestamp(text: Any) -> float:
    if not isinstance(text, str) or not text:
        return 0.0
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # CKAN writes UTC without a zone
    return moment.timestamp()


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"missing or bad field {key!r}")
    return value


def parse_resource(record: dict[str, Any], circle_id: str) -> Resource:
    name = _text(record, "name")
    size = record.get("size")
    etag = record.get("etag")
    mimetype = str(record.get("mimetype") or "")
    return Resource(
        id=_text(record, "id"),
        name=name,
        dataset_id=_text(record, "package_id"),
        circle_id=circle_id,
        size=size
        if isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_SIZE
        else None,
        etag=etag if isinstance(etag, str) and etag else None,
        mtime=_timestamp(record.get("last_modified") or record.get("created")),
        is_rtdc=name.lower().endswith(RTDC_SUFFIXES) or mimetype in ("RT-DC", "DC"),
        s3_url=record["s3_url"] if isinstance(record.get("s3_url"), str) else None,
    )


def parse_dataset(record: dict[str, Any]) -> Dataset:
    organization = record.get("organization")
    circle_id = record.get("owner_org")
    if isinstance(organization, dict):
        circle_id = organization.get("id", circle_id)
    if not isinstance(circle_id, str) or not circle_id:
        raise ProtocolError("dataset without circle")
    resources = []
    for entry in record.get("resources") or []:
        try:
            resources.append(parse_resource(entry, circle_id))
        except (ProtocolError, TypeError, AttributeError) as exc:
            log.warning("skipping a resource of dataset %s: %s", record.get("name"), exc)
    circle = organization.get("name", "") if isinstance(organization, dict) else ""
    return Dataset(
        id=_text(record, "id"),
        circle_id=circle_id,
        name=_text(record, "name"),
        title=str(record.get("title") or ""),
        circle=str(circle),
        private=bool(record.get("private")),
        mtime=_timestamp(record.get("metadata_modified") or record.get("metadata_created")),
        resources=tuple(resources),
        record=record,
    )


def _parse_all(records: list[Any], parse: Callable[[Any], Any], what: str) -> list[Any]:
    parsed = []
    for record in records:
        try:
            parsed.append(parse(record))
        except (ProtocolError, TypeError, AttributeError, KeyError) as exc:
            log.warning("skipping a %s: %s", what, exc)
    return parsed


def _group(record: Any) -> Group:
    return Group(
        id=_text(record, "id"), name=_text(record, "name"), title=str(record.get("title") or "")
    )


class Catalog:
    """Circles, collections, datasets and resources of one host, remembered through `Memo`."""

    def __init__(self, *, api: DcorApi, memo: Memo, dir_cache_time: float) -> None:
        self._api = api
        self._memo = memo
        self._listing_age = dir_cache_time

    def _ask(
        self, key: str, ask: Callable[[float], Any], max_age: float | Callable[[Any], float]
    ) -> Any:
        return self._memo.get(key, ask, max_age=max_age)

    def _groups(self, action: str) -> list[Any]:
        def ask(deadline: float) -> list[Any]:
            records: list[Any] = []
            while True:
                page = self._api.action(
                    action,
                    {"all_fields": "true", "limit": str(GROUP_PAGE), "offset": str(len(records))},
                    deadline=deadline,
                )
                if not isinstance(page, list):
                    raise ProtocolError(f"{action}: expected a list")
                records.extend(page)
                if len(page) < GROUP_PAGE:
                    return records

        return self._ask(action, ask, self._listing_age)  # type: ignore[no-any-return]

    def circles(self) -> list[Group]:
        return _parse_all(self._groups("organization_list"), _group, "circle")

    def collections(self) -> list[Group]:
        return _parse_all(self._groups("group_list"), _group, "collection")

    def datasets(self, fq: str = "") -> list[Dataset]:
        """All datasets the caller may see, optionally filtered (`organization:x`, `groups:y`)."""

        def ask(deadline: float) -> list[Any]:
            records: list[Any] = []
            while True:
                params = {"q": "*:*", "rows": str(SEARCH_PAGE), "start": str(len(records))}
                params["sort"] = "name asc"
                if fq:
                    params["fq"] = fq
                if self._api.authenticated:
                    params["include_private"] = "true"
                page = self._api.action("package_search", params, deadline=deadline)
                results = page.get("results") if isinstance(page, dict) else None
                if not isinstance(results, list):
                    raise ProtocolError("package_search: no results list")
                records.extend(results)
                if not results or len(records) >= int(page.get("count", 0)):
                    return records

        records = self._ask(f"package_search:{fq}", ask, self._listing_age)
        return _parse_all(records, parse_dataset, "dataset")

    def dataset(self, name_or_id: str) -> Dataset:
        def ask(deadline: float) -> Any:
            return self._api.action("package_show", {"id": name_or_id}, deadline=deadline)

        record = self._ask(f"package_show:{name_or_id}", ask, self._listing_age)
        return parse_dataset(record)

    def resource(self, resource_id: str) -> tuple[Dataset, Resource]:
        """A resource by id, with its dataset (for the circle, and for the download route)."""

        def ask(deadline: float) -> Any:
            return self._api.action("resource_show", {"id": resource_id}, deadline=deadline)

        record = self._ask(f"resource_show:{resource_id}", ask, FOREVER)
        dataset_id = _text(record, "package_id")
        dataset = self.dataset(dataset_id)
        for resource in dataset.resources:
            if resource.id == resource_id:
                return dataset, resource
        return dataset, parse_resource(record, dataset.circle_id)

    def dcserv(self, resource_id: str, query: str, *, settled: bool = True) -> Any:
        """A dcserv answer (metadata, logs, tables), asked once and remembered for good when
        `settled`; else (`logs` while the condensed file does not exist: they grow once it
        does, doc/DCOR.md §7) kept apart and asked again after `dir_cache_time`. Logs are
        final only once they hold the condensing logs (dc_serve answers without them when
        it cannot add them), else asked again after `dir_cache_time` too."""

        def ask(deadline: float) -> Any:
            return self._api.dcserv(resource_id, query, deadline=deadline)

        if settled:  # logs:v2: earlier versions kept logs for good without the condensed file
            if query == "logs":
                return self._ask(f"dcserv:logs:v2:{resource_id}", ask, self._logs_age)
            return self._ask(f"dcserv:{query}:{resource_id}", ask, FOREVER)
        return self._ask(f"dcserv:{query}:{resource_id}:unsettled", ask, self._listing_age)

    def _logs_age(self, logs: Any) -> float:
        """How long logs are kept: for good once they hold the condensing logs."""
        condensed = isinstance(logs, dict) and any(
            str(name).startswith(CONDENSING_LOG) for name in logs
        )
        return FOREVER if condensed else self._listing_age
