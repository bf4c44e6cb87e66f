"""The CKAN action API of the devserver, with DCOR's `dcserv` action.

Results and errors follow CKAN 2.11 (`ckan/views/api.py`) and ckanext-dc_serve 1.0.9
(`serve.py`); see doc/DCOR.md, "The calls". Parameters arrive as strings from a GET
query or typed from a JSON POST body, as in CKAN (so a JSON integer `version: 2` is rejected by
dcserv, exactly as on DCOR).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from . import repository, search
from .kernel import Kernel
from .objects import object_key
from .repository import Dataset, Resource, User
from .site import Site

CKAN_VERSION = "2.11.3"
ALL_FIELDS_MAX = 25  # ckan.group_and_organization_list_all_fields_max
LIST_MAX = 1000  # ckan.group_and_organization_list_max
ROWS_MAX = 1000  # ckan.search.rows_max
LICENSES = {
    "CC-BY-4.0": (
        "Creative Commons Attribution 4.0",
        "https://creativecommons.org/licenses/by/4.0/",
    ),
    "CC-BY-SA-4.0": (
        "Creative Commons Attribution Share-Alike 4.0",
        "https://creativecommons.org/licenses/by-sa/4.0/",
    ),
    "CC0-1.0": (
        "Creative Commons Public Domain Dedication",
        "https://creativecommons.org/publicdomain/zero/1.0/",
    ),
    "none": ("License not specified", ""),
}
CREATOR_ID = repository.make_id("user", "devserver-admin")
# resource fields DCOR's jobs fill after an upload (dcor_schemas `jobs.py`; doc/DCOR.md §2)
LATE_FIELDS = ("etag", "sha256", "s3_available", "s3_url")


class ActionError(Exception):
    """A CKAN error response: HTTP status and the `error` value (a bare string for 400)."""

    def __init__(self, status: int, error: dict[str, Any] | str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def validation_error(message: str | dict[str, Any]) -> ActionError:
    error = {"message": message} if isinstance(message, str) else dict(message)
    return ActionError(409, {**error, "__type": "Validation Error"})


def not_found(detail: str = "") -> ActionError:
    message = f"Not found: {detail}" if detail else "Not found"
    return ActionError(404, {"__type": "Not Found Error", "message": message})


def not_authorized(user: User | None, what: str, ident: str) -> ActionError:
    name = user.name if user else ""
    message = f"Access denied: User {name} not authorized to read {what} {ident}"
    return ActionError(403, {"__type": "Authorization Error", "message": message})


def internal_error() -> ActionError:
    return ActionError(500, {"__type": "Internal Server Error", "message": "Internal Server Error"})


def asbool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "1", "yes", "on", "y", "t")


def _integer(params: dict[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise validation_error({name: ["Invalid integer"]}) from None
    if number < 0:
        raise validation_error({name: ["Must be a natural number"]})
    return number


class CkanApi:
    """`call(action, params, user)` returns an action's `result` or raises ActionError."""

    def __init__(self, site: Site, url_lifetime: Callable[[], float]) -> None:
        self.site = site
        self.repo = site.repo
        self._url_lifetime = url_lifetime
        self._actions: dict[str, Callable[[dict[str, Any], User | None], Any]] = {
            "dcserv": self.dcserv,
            "package_search": self.package_search,
            "package_show": self.package_show,
            "resource_show": self.resource_show,
            "organization_list": self.organization_list,
            "organization_show": self.organization_show,
            "group_list": self.group_list,
            "group_show": self.group_show,
            "status_show": self.status_show,
            "user_show": self.user_show,
        }

    def call(self, action: str, params: dict[str, Any], user: User | None) -> Any:
        handler = self._actions.get(action)
        if handler is None:
            raise ActionError(400, f"Bad request - Action name not known: {action}")
        return handler(params, user)

    # -- dcserv ---------------------------------------------------------------------------

    def dcserv(self, params: dict[str, Any], user: User | None) -> Any:
        version = params.get("version", "2")
        if "query" not in params:
            raise validation_error("Please specify 'query' parameter!")
        if "id" not in params:
            raise validation_error("Please specify 'id' parameter!")
        if version == "1":
            raise validation_error(
                "Version '1' of the DCOR API is not supported anymore. "
                "Please use version '2' instead!"
            )
        if version not in ["2"]:
            raise validation_error("Please specify version '1' or '2'!")
        rid = str(params["id"])
        ds, res = self._readable_resource(rid, user)
        if not res.is_rtdc:
            raise validation_error(f"Resource ID {rid} must be an .rtdc dataset!")
        query = params["query"]
        if query == "valid":
            return self.site.resource_object(rid, "resource") is not None
        if query == "feature_list":
            return []
        if query not in ("metadata", "size", "logs", "tables", "trace_list", "basins"):
            raise validation_error(f"Invalid query parameter '{query}'!")
        kern = self.site.kernels.get(rid)
        if kern is None:
            raise internal_error()
        if query == "metadata":
            return kern.metadata
        if query == "size":
            return kern.metadata["experiment"]["event count"]
        if query == "logs":  # the condensing logs once the condensed object exists
            return kern.logs if self.site.condensed_ready() else kern.resource_logs
        if query == "tables":
            return kern.tables
        if query == "trace_list":
            if kern.trace_list is None:
                if self.site.options.trace_list_quirk:
                    raise internal_error()
                return []
            return kern.trace_list
        return self._basins(ds, res, kern)

    def _basins(self, ds: Dataset, res: Resource, kern: Kernel) -> list[dict[str, Any]]:
        bucket = self.site.bucket(ds.circle.id)
        basins = []
        for artifact in ("condensed", "resource"):
            key = object_key(artifact, res.id)
            basin: dict[str, Any] = {
                "name": f"{artifact}-{res.id[:5]}",
                "format": "http",
                "type": "remote",
                "mapping": "same",
            }
            if ds.private:
                time_request = time.time()
                url, expires = self.site.presigner.url(
                    self.site.objects_url, bucket, key, self._url_lifetime(), now=time_request
                )
                basin.update(
                    perishable=True,
                    time_request=time_request,
                    time_expiration=expires,
                    key=f"dcor-presigned-{artifact}-{res.id}",
                    urls=[url],
                )
            else:
                basin.update(
                    perishable=False,
                    key=f"dcor-{artifact}-{res.id}",
                    urls=[self.site.object_url(bucket, key)],
                )
            # listed even while the condensed object does not exist, then without `features`
            # (dc_serve `serve.py` ~140-145, ~250-270; doc/DCOR.md §1)
            features: list[str] | None = kern.resource_features
            if artifact == "condensed":
                features = kern.condensed_features if self.site.condensed_ready() else None
            if features is not None:
                basin["features"] = list(features)
            basins.append(basin)
        return basins

    # -- datasets and resources -----------------------------------------------------------

    def _readable_resource(self, rid: str, user: User | None) -> tuple[Dataset, Resource]:
        found = self.repo.resource(rid)
        if found is None:
            raise not_found("Resource was not found.")
        if not self.repo.can_read(found[0], user):
            raise not_authorized(user, "resource", rid)
        return found

    def resource_show(self, params: dict[str, Any], user: User | None) -> Any:
        rid = params.get("id")
        if not rid:
            raise validation_error({"id": ["Missing value"]})
        ds, res = self._readable_resource(str(rid), user)
        return self.resource_dict(ds, res)

    def package_show(self, params: dict[str, Any], user: User | None) -> Any:
        ident = params.get("id") or params.get("name_or_id")
        if not ident:
            raise validation_error({"id": ["Missing value"]})
        ds = self.repo.dataset(str(ident))
        if ds is None:
            raise not_found()
        if not self.repo.can_read(ds, user):
            raise not_authorized(user, "package", ds.id)
        return self.package_dict(ds)

    def package_search(self, params: dict[str, Any], user: User | None) -> Any:
        if self.site.options.search_latency:
            time.sleep(self.site.options.search_latency)
        rows = min(_integer(params, "rows", 10), ROWS_MAX)
        start = _integer(params, "start", 0)
        include_private = asbool(params.get("include_private", False))
        queries = [str(params.get("q") or "*:*")]
        if params.get("fq"):
            queries.append(str(params["fq"]))
        fq_list = params.get("fq_list") or []
        queries += [str(q) for q in (fq_list if isinstance(fq_list, list) else [fq_list])]
        try:
            predicates = [search.compile_query(q) for q in queries]
        except search.QueryError as exc:
            message = f"Search Query is invalid: {exc}"
            raise ActionError(400, {"__type": "Search Query Error", "message": message}) from exc
        # active datasets only, unless asked otherwise (ckan `logic/action/get.py` ~1888-1900)
        states = {"active"}
        if "+state" in str(params.get("fq") or ""):
            states = set(repository.STATES)  # the query says which
        states |= {"draft"} if asbool(params.get("include_drafts", False)) else set()
        states |= {"deleted"} if asbool(params.get("include_deleted", False)) else set()
        hits = [
            ds
            for ds in self.repo.datasets.values()
            if ds.state in states
            and (include_private or not ds.private)  # "+capacity:public"
            and self.repo.can_read(ds, user)  # the permission labels, always
            and all(p(self._search_document(ds)) for p in predicates)
        ]
        sort = str(params.get("sort") or "score desc, metadata_modified desc")
        hits = _sorted(hits, sort)
        return {
            "count": len(hits),
            "results": [self.package_dict(ds) for ds in hits[start : start + rows]],
            "sort": sort,
            "facets": {},
            "search_facets": {},
        }

    @staticmethod
    def _search_document(ds: Dataset) -> dict[str, list[str]]:
        return {
            "id": [ds.id],
            "name": [ds.name],
            "title": [ds.title],
            "notes": [ds.notes],
            "authors": [ds.authors],
            "organization": [ds.circle.name],
            "owner_org": [ds.circle.id],
            "groups": list(ds.collections),
            "tags": list(ds.tags),
            "res_name": [r.name for r in ds.resources],
            "res_id": [r.id for r in ds.resources],
            "res_format": [_resource_format(r, None) for r in ds.resources],
            "private": [str(ds.private).lower()],
            "state": [ds.state],
            "license_id": [ds.license_id],
            "metadata_created": [ds.created],
            "metadata_modified": [ds.modified],
        }

    def package_dict(self, ds: Dataset) -> dict[str, Any]:
        license_title, license_url = LICENSES.get(ds.license_id, (ds.license_id, ""))
        return {
            "id": ds.id,
            "name": ds.name,
            "title": ds.title,
            "notes": ds.notes,
            "authors": ds.authors,
            "doi": ds.doi,
            "references": ds.references,
            "license_id": ds.license_id,
            "license_title": license_title,
            "license_url": license_url,
            "isopen": ds.license_id.startswith("CC"),
            "private": ds.private,
            "state": ds.state,
            "type": "dataset",
            "owner_org": ds.circle.id,
            "organization": self._group_dict(ds.circle, organization=True, count=None),
            "groups": [
                self._group_dict(self.repo.collections[name], organization=False, count=None)
                for name in ds.collections
            ],
            "tags": [
                {
                    "id": repository.make_id("tag", tag),
                    "name": tag,
                    "display_name": tag,
                    "state": "active",
                    "vocabulary_id": None,
                }
                for tag in ds.tags
            ],
            "num_resources": len(ds.resources),
            "num_tags": len(ds.tags),
            "creator_user_id": CREATOR_ID,
            "metadata_created": ds.created,
            "metadata_modified": ds.modified,
            "resources": [self.resource_dict(ds, res) for res in ds.resources],
            "relationships_as_object": [],
            "relationships_as_subject": [],
        }

    def resource_dict(self, ds: Dataset, res: Resource) -> dict[str, Any]:
        kern = self.site.kernels.get(res.id)
        bucket = self.site.bucket(ds.circle.id)
        result: dict[str, Any] = {
            "id": res.id,
            "package_id": ds.id,
            "position": res.position,
            "name": res.name,
            "description": res.description,
            "state": "active",
            "format": _resource_format(res, kern),
            "mimetype": repository.guess_mimetype(res.name),
            "mimetype_inner": None,
            "size": res.size,
            "hash": "",
            "etag": res.digests.etag,
            "sha256": res.digests.sha256,
            "s3_available": True,
            "s3_url": self.site.object_url(bucket, object_key("resource", res.id)),
            "url": f"{self.site.url}/dataset/{ds.id}/resource/{res.id}/download/{res.name.lower()}",
            "url_type": "s3_upload",
            "created": res.created,
            "last_modified": res.created,
            "metadata_modified": res.created,
            "cache_url": None,
            "cache_last_updated": None,
        }
        if res.storage != "s3":  # dcor_schemas' S3 jobs never ran (doc/DCOR.md §6)
            result.update(etag=None, sha256=None, s3_available=False)
            del result["s3_url"]
            if res.storage == "link":  # CKAN knows a link's URL, not its size
                result.update(url=self.site.link_url(res), url_type=None, size=None)
            else:
                result.update(url_type="upload")
        if kern is not None:
            result.update(_dc_fields(kern.metadata))
        if not self.site.fields_ready():
            # filled by DCOR's background jobs after an upload (doc/DCOR.md §2); `size` and
            # `url_type` are CKAN core columns, null meanwhile
            for name in [n for n in result if n in LATE_FIELDS or n.startswith("dc:")]:
                del result[name]
            result.update(size=None, url_type=None)
        return result

    # -- circles and collections ----------------------------------------------------------

    def organization_list(self, params: dict[str, Any], user: User | None) -> Any:
        return self._group_list(params, user, organization=True)

    def group_list(self, params: dict[str, Any], user: User | None) -> Any:
        return self._group_list(params, user, organization=False)

    def _group_list(self, params: dict[str, Any], user: User | None, organization: bool) -> Any:
        all_fields = asbool(params.get("all_fields", False))
        cap = ALL_FIELDS_MAX if all_fields else LIST_MAX
        limit = min(_integer(params, "limit", cap), cap)
        offset = _integer(params, "offset", 0)
        groups = self._groups(organization)
        sort = str(params.get("sort") or "title asc")  # ckan.default_group_sort
        field, _, direction = sort.partition(" ")
        if field == "name":
            key: Callable[[Any], Any] = lambda g: g.name  # noqa: E731
        elif self.site.options.title_ties_unordered:
            random.shuffle(groups)  # no tie-breaker: equal titles in any order (doc/DCOR.md §5)
            key = lambda g: g.title.lower()  # noqa: E731
        else:
            key = lambda g: (g.title.lower(), g.name)  # noqa: E731
        ordered = sorted(groups, key=key, reverse=direction.strip().lower() == "desc")
        page = ordered[offset : offset + limit]
        if not all_fields:
            return [g.name for g in page]
        return [
            self._group_dict(g, organization, count=len(self._datasets_of(g, organization, user)))
            for g in page
        ]

    def organization_show(self, params: dict[str, Any], user: User | None) -> Any:
        return self._group_show(params, user, organization=True)

    def group_show(self, params: dict[str, Any], user: User | None) -> Any:
        return self._group_show(params, user, organization=False)

    def _group_show(self, params: dict[str, Any], user: User | None, organization: bool) -> Any:
        ident = params.get("id")
        if not ident:
            raise validation_error({"id": ["Missing value"]})
        lookup = self.repo.circle if organization else self.repo.collection
        group = lookup(str(ident))
        if group is None:
            raise not_found()
        datasets = self._datasets_of(group, organization, user)
        result = self._group_dict(group, organization, count=len(datasets))
        if asbool(params.get("include_datasets", False)):
            result["packages"] = [self.package_dict(ds) for ds in datasets[:1000]]
        result["users"] = []
        result["extras"] = []
        result["tags"] = []
        result["groups"] = []
        return result

    def _groups(self, organization: bool) -> list[Any]:
        source = self.repo.circles if organization else self.repo.collections
        return list(source.values())

    def _datasets_of(self, group: Any, organization: bool, user: User | None) -> list[Dataset]:
        member = (
            (lambda ds: ds.circle.name == group.name)
            if organization
            else (lambda ds: group.name in ds.collections)
        )
        return [
            ds
            for ds in self.repo.datasets.values()
            if ds.state == "active" and member(ds) and self.repo.can_read(ds, user)
        ]

    @staticmethod
    def _group_dict(group: Any, organization: bool, count: int | None) -> dict[str, Any]:
        result = {
            "id": group.id,
            "name": group.name,
            "title": group.title,
            "display_name": group.title,
            "description": group.description,
            "image_url": "",
            "image_display_url": "",
            "created": group.created,
            "is_organization": organization,
            "type": "organization" if organization else "group",
            "state": "active",
            "approval_status": "approved",
        }
        if count is not None:
            result["package_count"] = count
            result["num_followers"] = 0
        return result

    def user_show(self, params: dict[str, Any], user: User | None) -> Any:
        """CKAN 2.11 (`logic/action/get.py` ~1397-1446): without `id`, the caller's own account
        (`id` defaults to the caller's name, "" for anonymous ones, who get 404 "Not found");
        a wrong or expired token is anonymous (`views/__init__.py` ~125-137). So it tells a
        valid token from a rejected one (doc/DCOR.md §9)."""
        ident = str(params.get("id") or (user.name if user else ""))
        found = self.repo.users.get(ident) or next(
            (u for u in self.repo.users.values() if _user_id(u) == ident), None
        )
        if found is None:
            raise not_found()
        return {
            "id": _user_id(found),
            "name": found.name,
            "fullname": found.name,
            "display_name": found.name,
            "state": "active",
            "sysadmin": found.sysadmin,
            "created": "2020-01-01T00:00:00.000000",
            "number_created_packages": 0,
        }

    def status_show(self, params: dict[str, Any], user: User | None) -> Any:
        return {
            "site_title": self.repo.site_title,
            "site_description": "A local DCOR-compatible server (dcorfs devserver)",
            "site_url": self.site.url,
            "ckan_version": CKAN_VERSION,
            "error_emails_to": None,
            "locale_default": "en",
            "extensions": ["dcor_depot", "dcor_schemas", "dc_serve", "dc_view", "dc_log_view"],
        }


def _user_id(user: User) -> str:
    return repository.make_id("user", user.name)


def _resource_format(res: Resource, kern: Kernel | None) -> str:
    if res.is_rtdc:
        return "RT-FDC" if kern is not None and "fluorescence" in kern.metadata else "RT-DC"
    return PurePosixPath(res.name).suffix.lstrip(".").upper()


def _dc_fields(metadata: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`dc:<section>:<key>` for every dclab metadata key present (dcor_schemas job)."""
    from dclab.definitions import meta_const

    fields = {}
    for section, keys in meta_const.CFG_METADATA.items():
        values = metadata.get(section, {})
        for key, *_ in keys:
            if key in values:
                fields[f"dc:{section}:{key}"] = values[key]
    return fields


def _sort_key(attribute: str) -> Callable[[Dataset], str]:
    return lambda ds: str(getattr(ds, attribute)).lower()


def _sorted(datasets: list[Dataset], sort: str) -> list[Dataset]:
    """Stable multi-key sort for CKAN sort strings like 'metadata_modified desc, name asc'."""
    result = list(datasets)
    for clause in reversed([c.strip() for c in sort.split(",") if c.strip()]):
        field, _, direction = clause.partition(" ")
        if field == "score":
            continue
        attribute = {"metadata_modified": "modified", "metadata_created": "created"}.get(
            field, field
        )
        if attribute not in ("modified", "created", "name", "title", "id"):
            continue
        result.sort(key=_sort_key(attribute), reverse=direction.strip().lower() == "desc")
    return result
