"""The served DCOR instance: repository, object store contents and dcserv kernels, built once.

Building condenses every RT-DC resource (cached in the state directory), computes what dcserv
knows about it, and indexes all objects by bucket and key. A resource that dclab cannot open
(e.g. a truncated upload) is still served as an object; its dcserv queries fail with 500, as
they would on DCOR.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from . import condense, intra, kernel, repository
from .external import ExternalServer
from .objects import BUCKET_TEMPLATE, Presigner, StoredObject, bucket_name, object_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteOptions:
    # ckanext.dc_serve.enable_intra_dataset_basins (production default: on): the condense job
    # writes intra-dataset basins (dc_serve jobs.py ~149-154, 199-201, 210-345) and dcserv's
    # condensed basin lists the features of all basins in the condensed file (serve.py
    # ~288-298); see doc/DCOR.md §3
    intra_basin_features: bool = True
    # dc_serve 1.0.9 answers `trace_list` for files without traces with a 500
    trace_list_quirk: bool = True
    # off: the condensed objects never appear (DCOR's condensing job switched off or failed
    # for good: dc_serve `jobs.py` ~37-40, ~97-98); see doc/DCOR.md §1
    condensed: bool = True
    # the condensed objects, their basins' `features` and the condensing logs appear this many
    # seconds after the server started (condensing is a background job that lags uploads:
    # dc_serve `jobs.py` ~30-101, `serve.py` ~199-217, ~275-299); doc/DCOR.md §1, §7
    condensed_lag: float = 0.0
    # resource records lack `etag`, `sha256`, `s3_available`, `s3_url`, `url_type`, `dc:*` and
    # have `size: null`, and originals of public datasets lack their `public=true` tag (anonymous
    # GET → 403), until this many seconds after the server started: DCOR's background jobs fill
    # them after an upload (dcor_schemas `jobs.py` ~110-157, ~159-192, ~220-253, ~256-274,
    # ~277-297); doc/DCOR.md §2
    fields_lag: float = 0.0
    # the host name in object URLs (basins, downloads, s3_url), e.g. "localhost" while the site
    # is 127.0.0.1: objects then live on "another host", as DCOR's object store does
    object_host: str = ""
    # seconds each package_search call takes, as pages of up to 1000 datasets (ckan
    # `logic/schema.py` ~683) carrying every resource's dc:* fields (dcor_schemas `plugin.py`
    # ~269-284) take on DCOR (doc/DCOR.md §4)
    search_latency: float = 0.0
    # organization_list/group_list sort by title with no tie-breaker (ckan
    # `logic/action/get.py` ~403-417): groups of equal title come in any order, differing
    # between calls, so offset pages may repeat or skip groups (doc/DCOR.md §5).
    # Off: ties broken by name (a deterministic order, unlike the real server)
    title_ties_unordered: bool = False
    # the address of a second web server where link resources point (their external `url`),
    # e.g. 127.0.0.62; they redirect nowhere without it. dc_serve `route_funcs.py` ~82-148:
    # the download route redirects to a link's `url` (doc/DCOR.md §6)
    external_host: str = ""
    # how circles' buckets are named: `dcor_object_store.bucket_name` (dcor_shared `s3cc.py`
    # ~184-188, dcor_schemas `plugin.py` ~176-179), DCOR's production value (doc/DCOR.md §10)
    bucket_template: str = BUCKET_TEMPLATE


def objects_url(site_url: str, object_host: str) -> str:
    """The object store's base URL: the site's, or the same port under another host name."""
    if not object_host:
        return site_url
    parts = urlsplit(site_url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{object_host}{port}"


class Site:
    def __init__(
        self,
        *,
        repo: repository.Repository,
        url: str,
        objects: dict[tuple[str, str], StoredObject],
        kernels: dict[str, kernel.Kernel | None],
        presigner: Presigner,
        options: SiteOptions,
        own: condense.SiteDir | None = None,
    ) -> None:
        """`own`: this site's own files, removed by `close`."""
        self.repo = repo
        self._own = own
        self.url = url
        self.objects_url = objects_url(url, options.object_host)
        self.objects = objects
        self.kernels = kernels
        self.presigner = presigner
        self.options = options
        self.started = time.monotonic()  # the lags of `options` count from here
        self.external: ExternalServer | None = None  # where link resources point, if any

    def close(self) -> None:
        """Remove the site's own files (its condensed files: the server has stopped)."""
        if self._own is not None:
            self._own.remove()

    def elapsed(self) -> float:
        """Seconds the site's clock has run (the lags of `options` count on it)."""
        return time.monotonic() - self.started

    def advance(self, seconds: float) -> None:
        """Move the site's clock on: what DCOR's background jobs do in that time has been
        done (the test hook `POST /_devserver/clock`). ValueError unless seconds >= 0."""
        if not seconds >= 0:  # (NaN too)
            raise ValueError(f"advance must be seconds >= 0, not {seconds}")
        self.started -= seconds

    def condensed_ready(self) -> bool:
        """Whether DCOR's condensing job has run (its object, features and logs exist)."""
        return self.options.condensed and self.elapsed() >= self.options.condensed_lag

    def fields_ready(self) -> bool:
        """Whether DCOR's jobs have filled the resource records and tagged the objects."""
        return self.elapsed() >= self.options.fields_lag

    def stored_object(self, bucket: str, key: str) -> StoredObject | None:
        """The object at bucket/key as the store holds it now: a condensed object only once
        condensing has run, an original of a public dataset readable anonymously only once
        its `public=true` tag is set (doc/DCOR.md §1, §2)."""
        obj = self.objects.get((bucket, key))
        if obj is None:
            return None
        if obj.artifact == "condensed" and not self.condensed_ready():
            return None
        if obj.artifact == "resource" and obj.public and not self.fields_ready():
            return dataclasses.replace(obj, public=False)
        return obj

    @classmethod
    def build(
        cls,
        data_dir: Path,
        state_dir: Path,
        url: str,
        options: SiteOptions,
        progress: Callable[[str], None] | None = None,
    ) -> Site:
        condense.tidy(state_dir)  # (first: its digests go with them)
        repo = repository.load(data_dir, state_dir, progress)
        if not repo.datasets:
            log.warning("%s holds no datasets (see the README for the layout)", data_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        # files not on S3 are neither condensed nor opened by dcserv (it reads S3 objects)
        rtdc = [
            (ds, res) for ds, res in repo.iter_resources() if res.is_rtdc and res.storage == "s3"
        ]
        own = condense.SiteDir(state_dir) if options.condensed and rtdc else None
        try:
            kernels, objects = _prepare_all(
                rtdc,
                url=url,
                state_dir=state_dir,
                own=None if own is None else own.path,
                options=options,
                progress=progress,
            )
        except BaseException:
            if own is not None:
                own.remove()
            raise
        for ds, res in repo.iter_resources():
            if res.storage != "s3":
                continue
            obj = _stored(
                bucket_name(ds.circle.id, options.bucket_template),
                "resource",
                resource_id=res.id,
                path=res.path,
                digest=res.digests,
                private=ds.private,
            )
            objects[(obj.bucket, obj.key)] = obj
        return cls(
            repo=repo,
            url=url,
            objects=objects,
            kernels=kernels,
            presigner=Presigner(_secret(state_dir)),
            options=options,
            own=own,
        )

    def resource_object(self, resource_id: str, artifact: str) -> StoredObject | None:
        found = self.repo.resource(resource_id)
        if found is None:
            return None
        bucket = self.bucket(found[0].circle.id)
        return self.stored_object(bucket, object_key(artifact, resource_id))

    def is_public(self, obj: StoredObject) -> bool:
        """Whether the object is tagged `public=true`: its dataset is public and active
        (dcor_schemas `plugin.py` ~395-411 tags it once the dataset is active; only drafts
        may be deleted, dcor_schemas `auth.py` ~141-162, so a deleted one never was;
        doc/DCOR.md §11)."""
        found = self.repo.resource(obj.resource_id)
        if found is None:
            return obj.public
        return obj.public and found[0].state == "active"

    def bucket(self, circle_id: str) -> str:
        return bucket_name(circle_id, self.options.bucket_template)

    def object_url(self, bucket: str, key: str) -> str:
        return f"{self.objects_url}/{bucket}/{key}"

    def link_url(self, res: repository.Resource) -> str:
        """The external `url` of a link resource: its file on the external server."""
        if self.external is None:
            return f"http://external.invalid/{quote(res.name)}"
        return self.external.url_of(self.external.root / res.link_to if res.link_to else res.path)


def _prepare_all(
    rtdc: list[tuple[repository.Dataset, repository.Resource]],
    *,
    url: str,
    state_dir: Path,
    own: Path | None,
    options: SiteOptions,
    progress: Callable[[str], None] | None,
) -> tuple[dict[str, kernel.Kernel | None], dict[tuple[str, str], StoredObject]]:
    """Every RT-DC resource condensed (`_prepare`): their dcserv kernels, and their condensed
    files as objects."""
    upstream = _Upstream(url, state_dir, options)
    kernels: dict[str, kernel.Kernel | None] = {}
    objects: dict[tuple[str, str], StoredObject] = {}
    for number, (ds, res) in enumerate(rtdc, start=1):
        if progress is not None and len(rtdc) > 3:
            progress(f"preparing RT-DC resource {number}/{len(rtdc)}: {res.name}")
        with warnings.catch_warnings(record=True) as caught:
            # dclab's warnings about old files are logged, whatever the caller's filters
            warnings.simplefilter("always")
            prepared = _prepare(
                ds,
                res,
                url=url,
                state_dir=state_dir,
                own=own,
                options=options,
                upstream=upstream,
            )
        for warning in caught:
            log.info("%s: %s", res.name, warning.message)
        kernels[res.id], condensed = prepared
        if condensed is not None:
            objects[(condensed.bucket, condensed.key)] = condensed
    return kernels, objects


def _prepare(
    ds: repository.Dataset,
    res: repository.Resource,
    *,
    url: str,
    state_dir: Path,
    own: Path | None,
    options: SiteOptions,
    upstream: _Upstream,
) -> tuple[kernel.Kernel | None, StoredObject | None]:
    """Condense one RT-DC resource (its file with this site's basins in `own`) and compute
    its dcserv kernel; failures are logged."""
    bucket = bucket_name(ds.circle.id, options.bucket_template)
    condensed_file = condensed = None
    if own is not None:
        try:
            condensed_file = condense.condensed_path(
                res.path,
                res.digests.sha256,
                state_dir,
                site=own,
                resource_id=res.id,
                site_url=url,
                object_url=f"{objects_url(url, options.object_host)}/{bucket}/"
                f"{object_key('resource', res.id)}",
                upstream=upstream.basins(ds, res),
            )
        except Exception as exc:
            log.warning("cannot condense %s (%s): %s", res.name, res.id, exc)
    if condensed_file is not None:
        # (not remembered: the file is this server's alone, made anew at every start)
        digest = repository.file_digests(condensed_file)
        condensed = _stored(
            bucket,
            "condensed",
            resource_id=res.id,
            path=condensed_file,
            digest=digest,
            private=ds.private,
        )
    try:
        kern = kernel.compute(res.path, condensed_file, options.intra_basin_features)
    except Exception as exc:
        log.warning("dcserv cannot open %s (%s): %s", res.name, res.id, exc)
        kern = None
    return kern, condensed


class _Upstream:
    """Intra-dataset basins of the resources of this site (see `intra`), with what they need
    of other resources (run identifiers, features) worked out once per resource."""

    def __init__(self, url: str, state_dir: Path, options: SiteOptions) -> None:
        self._url = url
        self._state_dir = state_dir
        self._options = options
        self._ids: dict[str, str] = {}
        self._features: dict[str, list[str]] = {}

    def basins(self, ds: repository.Dataset, res: repository.Resource) -> list[dict[str, Any]]:
        if not self._options.intra_basin_features:
            return []
        return intra.upstream_basins(
            ds, res, site_url=self._url, identifiers=self._identifier, features=self._all_features
        )

    def _identifier(self, res: repository.Resource) -> str:
        if res.id not in self._ids:
            try:
                self._ids[res.id] = intra.run_identifier(res.path)
            except Exception as exc:  # not readable: no basin of anything (logged)
                log.info("no run identifier for %s: %s", res.name, exc)
                self._ids[res.id] = ""
        return self._ids[res.id]

    def _all_features(self, res: repository.Resource) -> list[str]:
        if res.id not in self._features:
            try:
                core: Path | None
                core, remote = condense.condensed_core(
                    res.path, res.digests.sha256, self._state_dir
                )
            except Exception as exc:  # as dc_serve: the resource's features only (jobs.py ~253)
                log.warning("condensed %s not accessible for a basin: %s", res.name, exc)
                core, remote = None, []
            self._features[res.id] = intra.all_features(res.path, core, remote)
        return self._features[res.id]


def _stored(
    bucket: str,
    artifact: str,
    *,
    resource_id: str,
    path: Path,
    digest: repository.Digests,
    private: bool,
) -> StoredObject:
    return StoredObject(
        bucket=bucket,
        key=object_key(artifact, resource_id),
        path=path,
        size=digest.size,
        etag=digest.etag,
        public=not private,
        last_modified=path.stat().st_mtime,
        resource_id=resource_id,
        artifact=artifact,
    )


def _secret(state_dir: Path) -> bytes:
    """The presigning secret, kept in the state dir so URLs survive a restart (as on DCOR)."""
    path = state_dir / "presign.secret"
    if not path.exists():
        tmp = path.with_name("presign.secret.tmp")
        tmp.write_bytes(secrets.token_bytes(32))
        tmp.chmod(0o600)
        tmp.replace(path)
    return path.read_bytes()
