"""What exists on a DCOR host, as typed records: circles, collections, datasets, resources.

Answers come through `Memo`: listings are asked again after `dir_cache_time`, in the
background while the older listing is served (`Memo.listing`, doc/DCOR.md §4), every page with
a deadline of its own; records of datasets after the same time (resources may be added), a
resource's own record never (DCOR resources are immutable). Circles and collections are listed
by name only (doc/DCOR.md §5). Malformed entries from the server are skipped with one log line;
they never break a listing.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from ..cache import answers
from ..cache.metastore import FOREVER, Memo
from ..errors import NotFound, ProtocolError
from .dcserv import DcorApi

log = logging.getLogger(__name__)

GROUP_PAGE = 1000  # CKAN caps organization_list/group_list of names at 1000 (doc/DCOR.md §5)
SEARCH_PAGE = 1000  # and package_search rows at 1000
DOWNLOAD_ROUTE = re.compile(r"/dataset/[^/]+/resource/[^/]+/download/")
CONDENSING_LOG = "dclab-condense"  # the logs DCOR's condensing adds (doc/DCOR.md §7)

T = TypeVar("T")


@dataclass(frozen=True)
class Listing(Generic[T]):
    """Entries of a listing and the wall time the server was asked for them; the same
    answer gives the same `entries` (identical: a directory built from them is kept)."""

    entries: tuple[T, ...]
    asked: float


@dataclass(frozen=True)
class Group:
    """A circle (CKAN organization) or a collection (CKAN group), by its unique name: all
    the tree needs (doc/DCOR.md §5)."""

    name: str


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
    s3_available: bool | None = None  # None: not (yet) stated
    url_type: str | None = None  # "s3_upload", "upload", or none for a link
    url: str | None = None

    @property
    def link(self) -> str | None:
        """The external URL of a link resource (no `url_type`, a `url` that is not DCOR's own
        download route, which a fresh upload has before its `url_type` is set); None for
        uploads (doc/DCOR.md §6)."""
        url = self.url
        if self.url_type or not url or not url.startswith(("http://", "https://")):
            return None
        return None if DOWNLOAD_ROUTE.search(urlsplit(url).path) else url

    @property
    def on_site_disk(self) -> bool:
        """Kept on the site's own disk, not on S3: the download route answers with the file
        itself (dc_serve `route_funcs.py` ~138-146; doc/DCOR.md §6)."""
        return self.link is None and (
            self.s3_available is False or (self.url_type == "upload" and not self.s3_available)
        )


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
    state: str = "active"  # CKAN's; "draft" or "deleted" ones are not shown (doc/DCOR.md §11)


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


def is_dc_resource(name: str, mimetype: str) -> bool:
    """Whether dcserv serves the resource (dc_serve `serve.py` `is_dc_resource`): its mimetype
    or its suffix, case-sensitively — dcserv refuses an `X.RTDC` (409), which is then shown
    as a plain file (doc/DCOR.md §8)."""
    return mimetype in ("RT-DC", "DC") or ("." in name and name.rsplit(".", 1)[1] in ("rtdc", "dc"))


def parse_resource(record: dict[str, Any], circle_id: str) -> Resource:
    name = _text(record, "name")
    size = record.get("size")
    etag = record.get("etag")
    mimetype = str(record.get("mimetype") or "")
    s3_available = record.get("s3_available")
    url_type, url = record.get("url_type"), record.get("url")
    resource = Resource(
        id=_text(record, "id"),
        name=name,
        dataset_id=_text(record, "package_id"),
        circle_id=circle_id,
        size=size
        if isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_SIZE
        else None,
        etag=etag if isinstance(etag, str) and etag else None,
        mtime=_timestamp(record.get("last_modified") or record.get("created")),
        is_rtdc=is_dc_resource(name, mimetype),
        s3_url=record["s3_url"] if isinstance(record.get("s3_url"), str) else None,
        s3_available=s3_available if isinstance(s3_available, bool) else None,
        url_type=url_type if isinstance(url_type, str) and url_type else None,
        url=url if isinstance(url, str) and url else None,
    )
    if resource.is_rtdc and (resource.link or resource.on_site_disk):
        # dcserv reads S3 objects only: such a file is served as it is
        resource = dataclasses.replace(resource, is_rtdc=False)
    return resource


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
        state=str(record.get("state") or "active"),
    )


def _parse_all(records: list[Any], parse: Callable[[Any], Any], what: str) -> list[Any]:
    parsed = []
    for record in records:
        try:
            parsed.append(parse(record))
        except (ProtocolError, TypeError, AttributeError, KeyError) as exc:
            log.warning("skipping a %s: %s", what, exc)
    return parsed


def _group(name: Any) -> Group:
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"bad name {name!r}")
    return Group(name)


class Catalog:
    """Circles, collections, datasets and resources of one host, remembered through `Memo`."""

    def __init__(self, *, api: DcorApi, memo: Memo, dir_cache_time: float) -> None:
        self._api = api
        self._memo = memo
        self._listing_age = dir_cache_time
        self._lock = threading.Lock()
        self._parsed: dict[str, tuple[Any, tuple[Any, ...]]] = {}  # key -> (records, parsed)

    def _ask(
        self, key: str, ask: Callable[[float], Any], max_age: float | Callable[[Any], float]
    ) -> Any:
        return self._memo.get(key, ask, max_age=max_age)

    def _listing(
        self,
        key: str,
        ask: Callable[[Callable[[], float]], list[Any]],
        parse: Callable[[Any], T],
        what: str,
    ) -> Listing[T]:
        """The listing `key` through `Memo.listing`, parsed once per answer."""
        records, asked = self._memo.listing(key, ask, max_age=self._listing_age)
        with self._lock:
            parsed = self._parsed.get(key)
        if parsed is None or parsed[0] is not records:
            parsed = (records, tuple(_parse_all(records, parse, what)))
            with self._lock:
                self._parsed[key] = parsed
        return Listing(parsed[1], asked)

    def _groups(self, action: str, what: str) -> Listing[Group]:
        """Names only, by name (unique: pages neither repeat nor skip), until an empty page
        (ckan `logic/action/get.py` ~316-440; doc/DCOR.md §5)."""

        def ask(deadline: Callable[[], float]) -> list[Any]:
            names: list[Any] = []
            while True:
                params = {"all_fields": "false", "sort": "name asc", "limit": str(GROUP_PAGE)}
                params["offset"] = str(len(names))
                page = self._api.action(action, params, deadline=deadline())
                if not isinstance(page, list):
                    raise ProtocolError(f"{action}: expected a list")
                if not page:
                    return names
                names.extend(page)

        return self._listing(answers.group_names(action), ask, _group, what)

    def circles(self) -> Listing[Group]:
        return self._groups("organization_list", "circle")

    def collections(self) -> Listing[Group]:
        return self._groups("group_list", "collection")

    def datasets(self, fq: str = "") -> Listing[Dataset]:
        """All datasets the caller may see, optionally filtered (`organization:x`, `groups:y`)."""

        def ask(deadline: Callable[[], float]) -> list[Any]:
            records: list[Any] = []
            while True:
                params = {"q": "*:*", "rows": str(SEARCH_PAGE), "start": str(len(records))}
                params["sort"] = "name asc"
                if fq:
                    params["fq"] = fq
                if self._api.authenticated:
                    params["include_private"] = "true"
                page = self._api.action("package_search", params, deadline=deadline())
                results = page.get("results") if isinstance(page, dict) else None
                if not isinstance(results, list):
                    raise ProtocolError("package_search: no results list")
                records.extend(results)
                if not results or len(records) >= int(page.get("count", 0)):
                    return records

        return self._listing(answers.dataset_search(fq), ask, parse_dataset, "dataset")

    def dataset(self, name_or_id: str) -> Dataset:
        """A dataset by name or id; a draft or deleted one, which CKAN shows to members of
        its circle and collections, is not found, as it is never listed (doc/DCOR.md §11)."""

        def ask(deadline: float) -> Any:
            return self._api.action("package_show", {"id": name_or_id}, deadline=deadline)

        record = self._ask(answers.dataset(name_or_id), ask, self._listing_age)
        dataset = parse_dataset(record)
        if dataset.state != "active":
            raise NotFound(f"dataset {dataset.name} is {dataset.state}")
        return dataset

    def remembers_datasets(self, fq: str = "") -> bool:
        """Whether the listing `datasets(fq)` is stored (any age)."""
        return self._memo.stored(answers.dataset_search(fq))

    def resource(self, resource_id: str) -> tuple[Dataset, Resource]:
        """A resource by id, with its dataset (for the circle, and for the download route)."""

        def ask(deadline: float) -> Any:
            return self._api.action("resource_show", {"id": resource_id}, deadline=deadline)

        record = self._ask(answers.resource_record(resource_id), ask, FOREVER)
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

        key = answers.dcserv(query, resource_id, settled=settled)
        if settled:  # logs:v2: earlier versions kept logs for good without the condensed file
            return self._ask(key, ask, self._logs_age if query == "logs" else FOREVER)
        return self._ask(key, ask, self._listing_age)

    def _logs_age(self, logs: Any) -> float:
        """How long logs are kept: for good once they hold the condensing logs."""
        condensed = isinstance(logs, dict) and any(
            str(name).startswith(CONDENSING_LOG) for name in logs
        )
        return FOREVER if condensed else self._listing_age
