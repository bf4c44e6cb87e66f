"""The devserver's catalogue: circles, collections, datasets, resources and users of a data dir.

Data directory layout (documented in the README, "The devserver"):

    DATA/
      dcor.json                   optional: users (API tokens, circles and collections they
                                  are members of), collections, site title
      <circle>/                   a circle (CKAN organization); the folder name is its name
        circle.json               optional: {"title", "description"}
        <dataset>/                a dataset (CKAN package); the folder name is its name
          dataset.json            optional: {"title", "notes", "authors", "license_id",
                                  "private", "state", "collections", "tags", "doi", "references",
                                  "resources": {<file name>: {"name", "id", "description",
                                  "storage", "link_to"}}}; storage: "s3" (default), "upload"
                                  (on the site's own disk, not on S3) or "link" (an external
                                  URL: the file, or `link_to`, a path in DATA, on the external
                                  server)
          <file> ...              its resources, in name order; .rtdc/.dc files are RT-DC data
      <file>.rtdc ...             flat mode: files directly in DATA become the resources of one
                                  public dataset (named after DATA) in the circle "devserver"

Identifiers are UUIDs derived from names (circles, collections, datasets) and from the location
plus SHA-256 of a file (resources), so they are stable across restarts and change when a file's
bytes change, as on DCOR where a resource never changes once uploaded. Digests are cached in
the state directory keyed by (path, size, mtime).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import mimetypes
import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = uuid.UUID("6c3b2d6e-8f59-4a7e-9d0f-2f0c6f3f7d1a")
DC_MIME_TYPES = {"RT-DC": ".rtdc", "DC": ".dc"}
STORAGES = ("s3", "upload", "link")  # dcor_shared (as in dc_serve `serve.py`)
FLAT_CIRCLE = "devserver"
MULTIPART_THRESHOLD = 2**30  # DCOR-Aid uploads files above 1 GiB in 1 GiB parts
CONFIG_FILES = ("dcor.json", "circle.json", "dataset.json")
STATES = ("active", "draft", "deleted")  # of a CKAN dataset (doc/DCOR.md §11)


class DataDirError(Exception):
    """The data directory cannot be served (bad JSON, unknown names, …)."""


@dataclass(frozen=True)
class User:
    name: str
    token: str
    circles: frozenset[str]
    sysadmin: bool = False
    collections: frozenset[str] = frozenset()  # as a "member" (doc/DCOR.md §11)


@dataclass(frozen=True)
class Group:
    """A CKAN group: a circle (organization) or a collection."""

    id: str
    name: str
    title: str
    description: str
    created: str


Circle = Group
Collection = Group


@dataclass(frozen=True)
class Digests:
    size: int
    md5: str
    etag: str
    sha256: str


@dataclass(frozen=True)
class Resource:
    id: str
    name: str
    path: Path
    position: int
    digests: Digests
    created: str
    description: str = ""
    # "s3": uploaded to the object store (DCOR's way); "upload": kept on the site's own disk
    # (`s3_available` false); "link": the resource is an external URL (doc/DCOR.md §6)
    storage: str = "s3"
    link_to: str = ""  # a link's file on the external server, by its path in the data dir

    @property
    def is_rtdc(self) -> bool:
        """dcserv's test (dc_serve `serve.py` ~156-168): the mimetype, which dcor_schemas sets
        from the suffix as written (`jobs.py` `get_base_metadata`), or the suffix itself; both
        case-sensitive, so an `X.RTDC` upload is no RT-DC resource to DCOR (doc/DCOR.md §8)."""
        return guess_mimetype(self.name) in DC_MIME_TYPES

    @property
    def size(self) -> int:
        return self.digests.size


@dataclass(frozen=True)
class Dataset:
    id: str
    name: str
    title: str
    circle: Circle
    private: bool
    created: str
    modified: str
    resources: tuple[Resource, ...]
    collections: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    notes: str = ""
    authors: str = ""
    license_id: str = "CC-BY-4.0"
    doi: str = ""
    references: str = ""
    state: str = "active"  # "draft" (upload unfinished) or "deleted": never searched


@dataclass
class Repository:
    """Everything the data directory describes, with the lookups the API needs."""

    circles: dict[str, Circle] = field(default_factory=dict)
    collections: dict[str, Collection] = field(default_factory=dict)
    datasets: dict[str, Dataset] = field(default_factory=dict)
    users: dict[str, User] = field(default_factory=dict)
    site_title: str = "DCOR devserver"

    def __post_init__(self) -> None:
        self._by_token = {user.token: user for user in self.users.values()}
        self._resources: dict[str, tuple[Dataset, Resource]] = {}
        self._dataset_ids = {ds.id: ds for ds in self.datasets.values()}
        for ds in self.datasets.values():
            for res in ds.resources:
                self._resources[res.id] = (ds, res)

    def user_for_token(self, token: str) -> User | None:
        return self._by_token.get(token) if token else None

    def dataset(self, name_or_id: str) -> Dataset | None:
        return self.datasets.get(name_or_id) or self._dataset_ids.get(name_or_id)

    def resource(self, rid: str) -> tuple[Dataset, Resource] | None:
        return self._resources.get(rid)

    def circle(self, name_or_id: str) -> Circle | None:
        return _find(self.circles, name_or_id)

    def collection(self, name_or_id: str) -> Collection | None:
        return _find(self.collections, name_or_id)

    def can_read(self, dataset: Dataset, user: User | None) -> bool:
        """CKAN's permission labels with DCOR's (doc/DCOR.md §11): an active public dataset
        for everyone; else (private, draft or deleted) for members of its circle and of any
        of its collections (ckan `lib/plugins.py` ~651-686, dcor_schemas `plugin.py`
        ~413-445, ckan `logic/auth/get.py` ~105-138)."""
        if dataset.state == "active" and not dataset.private:
            return True
        if user is None:
            return False
        return (
            user.sysadmin
            or dataset.circle.name in user.circles
            or any(name in user.collections for name in dataset.collections)
        )

    def set_state(self, name_or_id: str, state: str) -> Dataset:
        """Change a dataset's state while serving (a draft's upload finishes, a dataset is
        deleted): the devserver's test hook `/_devserver/state`."""
        found = self.dataset(name_or_id)
        if found is None:
            raise KeyError(name_or_id)
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}")
        changed = replace(found, state=state)
        self.datasets[changed.name] = changed
        self._dataset_ids[changed.id] = changed
        for res in changed.resources:
            self._resources[res.id] = (changed, res)
        return changed

    def iter_resources(self) -> Iterable[tuple[Dataset, Resource]]:
        return self._resources.values()


def make_id(kind: str, *parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "/".join((kind, *parts))))


def slugify(name: str) -> str:
    """A CKAN name (lowercase a-z0-9-_, 2-100 chars) for a folder name."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or "unnamed"
    return (slug * 2)[:2] if len(slug) < 2 else slug[:100]


def load(
    data_dir: Path,
    state_dir: Path,
    progress: Callable[[str], None] | None = None,
) -> Repository:
    """Scan `data_dir` into a Repository; digests are cached in `state_dir`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataDirError(f"data directory {data_dir} does not exist")
    config = _read_json(data_dir / "dcor.json")
    digests = DigestCache(state_dir / "digests.json", progress)
    circles: dict[str, Circle] = {}
    datasets: dict[str, Dataset] = {}

    flat_files = _resource_files(data_dir)
    if flat_files:
        circle = _circle(FLAT_CIRCLE, {}, data_dir)
        circles[circle.name] = circle
        ds = _dataset(slugify(data_dir.name), flat_files, circle=circle, digests=digests, meta={})
        datasets[ds.name] = ds
    for circle_dir in _subdirs(data_dir):
        circle = _circle(
            slugify(circle_dir.name), _read_json(circle_dir / "circle.json"), circle_dir
        )
        if circle.name in circles:
            raise DataDirError(f"two circles are both named {circle.name!r}")
        circles[circle.name] = circle
        for ds_dir in _subdirs(circle_dir):
            meta = _read_json(ds_dir / "dataset.json")
            files = _resource_files(ds_dir)
            if not files:
                log.warning("skipping dataset %s: no resources (CKAN keeps it a draft)", ds_dir)
                continue
            ds = _dataset(slugify(ds_dir.name), files, circle=circle, digests=digests, meta=meta)
            if ds.name in datasets:
                raise DataDirError(f"two datasets are both named {ds.name!r}")
            datasets[ds.name] = ds
    digests.save()

    collections = _collections(config.get("collections", {}), datasets.values())
    users = _users(config.get("users", {}), circles, collections)
    repo = Repository(
        circles=circles,
        collections=collections,
        datasets=datasets,
        users=users,
        site_title=str(config.get("site_title", "DCOR devserver")),
    )
    _check_unique_resource_ids(datasets.values())
    return repo


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataDirError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise DataDirError(f"{path} must hold a JSON object")
    return value


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _resource_files(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in CONFIG_FILES
        and not p.name.endswith(".part")
    )


def _iso(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds")


def _circle(name: str, meta: dict[str, Any], path: Path) -> Circle:
    return Circle(
        id=str(meta.get("id") or make_id("circle", name)),
        name=name,
        title=str(meta.get("title") or name.replace("-", " ").title()),
        description=str(meta.get("description", "")),
        created=_iso(path.stat().st_mtime),
    )


def _dataset(
    name: str,
    files: list[Path],
    *,
    circle: Circle,
    digests: DigestCache,
    meta: dict[str, Any],
) -> Dataset:
    overrides = meta.get("resources", {})
    resources = []
    for position, file in enumerate(files):
        override = overrides.get(file.name, {})
        digest = digests.get(file)
        resources.append(
            Resource(
                id=str(
                    override.get("id")
                    or make_id("resource", circle.name, name, file.name, digest.sha256)
                ),
                name=str(override.get("name", file.name)),
                path=file,
                position=position,
                digests=digest,
                created=_iso(file.stat().st_mtime),
                description=str(override.get("description", "")),
                storage=_storage(override, file),
                link_to=str(override.get("link_to", "")),
            )
        )
    mtimes = [file.stat().st_mtime for file in files]
    state = str(meta.get("state", "active"))
    if state not in STATES:
        raise DataDirError(f"dataset {name!r}: state must be one of {STATES}")
    return Dataset(
        id=str(meta.get("id") or make_id("dataset", name)),
        name=name,
        title=str(meta.get("title") or name.replace("-", " ").capitalize()),
        circle=circle,
        private=bool(meta.get("private", False)),
        created=_iso(min(mtimes)),
        modified=_iso(max(mtimes)),
        resources=tuple(resources),
        collections=tuple(slugify(c) for c in meta.get("collections", [])),
        tags=tuple(str(t) for t in meta.get("tags", [])),
        notes=str(meta.get("notes", "")),
        authors=str(meta.get("authors", "")),
        license_id=str(meta.get("license_id", "CC-BY-4.0")),
        doi=str(meta.get("doi", "")),
        references=str(meta.get("references", "")),
        state=state,
    )


def _collections(config: dict[str, Any], datasets: Iterable[Dataset]) -> dict[str, Collection]:
    names = {slugify(name) for name in config}
    for ds in datasets:
        names.update(ds.collections)
    described = {slugify(name): meta for name, meta in config.items()}
    result = {}
    for name in sorted(names):
        meta = described.get(name) or {}
        result[name] = Collection(
            id=str(meta.get("id") or make_id("collection", name)),
            name=name,
            title=str(meta.get("title") or name.replace("-", " ").title()),
            description=str(meta.get("description", "")),
            created="2024-01-01T00:00:00.000000",
        )
    return result


def _users(
    config: dict[str, Any], circles: dict[str, Circle], collections: dict[str, Collection]
) -> dict[str, User]:
    users = {}
    tokens = set()
    for name, meta in config.items():
        token = str(meta.get("token", ""))
        if not token:
            raise DataDirError(f"user {name!r} has no token")
        if token in tokens:
            raise DataDirError(f"user {name!r} shares its token with another user")
        tokens.add(token)
        member_of = frozenset(slugify(c) for c in meta.get("circles", []))
        unknown = member_of - set(circles)
        if unknown:
            raise DataDirError(f"user {name!r} is a member of unknown circles {sorted(unknown)}")
        in_collections = frozenset(slugify(c) for c in meta.get("collections", []))
        unknown = in_collections - set(collections)
        if unknown:
            raise DataDirError(f"user {name!r} is in unknown collections {sorted(unknown)}")
        users[name] = User(
            name, token, member_of, bool(meta.get("sysadmin", False)), in_collections
        )
    return users


def _check_unique_resource_ids(datasets: Iterable[Dataset]) -> None:
    seen: dict[str, Path] = {}
    for ds in datasets:
        for res in ds.resources:
            if res.id in seen:
                raise DataDirError(f"resource id {res.id} used by {seen[res.id]} and {res.path}")
            seen[res.id] = res.path


def _storage(override: dict[str, Any], file: Path) -> str:
    storage = str(override.get("storage", "s3"))
    if storage not in STORAGES:
        raise DataDirError(f"{file}: storage {storage!r} is none of {', '.join(STORAGES)}")
    return storage


def guess_mimetype(name: str) -> str | None:
    """The resource's mimetype as DCOR sets it: from the suffix as written (dcor_schemas
    `jobs.py` `get_base_metadata`), else CKAN's guess (without DCOR's types: for a suffix
    in another case dcor_schemas sets none)."""
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    for mimetype, wanted in DC_MIME_TYPES.items():
        if f".{suffix}" == wanted:
            return mimetype
    guessed = mimetypes.guess_type(name)[0]
    return None if guessed in DC_MIME_TYPES else guessed


class DigestCache:
    """MD5 / S3 ETag / SHA-256 of files, remembered by (path, size, mtime)."""

    def __init__(self, path: Path, progress: Callable[[str], None] | None) -> None:
        self._path = path
        self._progress = progress
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if path.exists():
            try:
                self._entries = json.loads(path.read_text())
            except ValueError:
                log.warning("ignoring unreadable digest cache %s", path)
        # those of files gone are dropped (earlier versions kept every start's condensed files)
        gone = [key for key in self._entries if not Path(key).exists()]
        for key in gone:
            del self._entries[key]
        self._dirty = bool(gone)

    def get(self, file: Path) -> Digests:
        stat = file.stat()
        key = str(file.resolve())
        entry = self._entries.get(key)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return Digests(entry["size"], entry["md5"], entry["etag"], entry["sha256"])
        if self._progress is not None and stat.st_size > 50 * 2**20:
            self._progress(f"computing checksums of {file.name} ({stat.st_size / 2**20:.0f} MiB)")
        digest = file_digests(file)
        self._entries[key] = {"mtime_ns": stat.st_mtime_ns, **digest.__dict__}
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(f"{self._path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._entries, indent=1, sort_keys=True))
        tmp.replace(self._path)


def file_digests(path: Path, block: int = 2**20) -> Digests:
    """MD5, SHA-256 and the S3 ETag (multipart with 1 GiB parts above 1 GiB, as DCOR-Aid)."""
    md5, sha256, part, part_md5s = hashlib.md5(), hashlib.sha256(), hashlib.md5(), []
    size = part_size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            md5.update(chunk)
            sha256.update(chunk)
            part.update(chunk)
            size += len(chunk)
            part_size += len(chunk)
            if part_size == MULTIPART_THRESHOLD:
                part_md5s.append(part.digest())
                part, part_size = hashlib.md5(), 0
    if part_size:
        part_md5s.append(part.digest())
    if size > MULTIPART_THRESHOLD:
        etag = f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"
    else:
        etag = md5.hexdigest()
    return Digests(size=size, md5=md5.hexdigest(), etag=etag, sha256=sha256.hexdigest())


def _find(groups: dict[str, Group], name_or_id: str) -> Group | None:
    """A group by name (the dict key) or by id."""
    found = groups.get(name_or_id)
    return found or next((g for g in groups.values() if g.id == name_or_id), None)
