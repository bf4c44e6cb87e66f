"""The served DCOR instance: repository, object store contents and dcserv kernels, built once.

Building condenses every RT-DC resource (cached in the state directory), computes what dcserv
knows about it, and indexes all objects by bucket and key. A resource that dclab cannot open
(e.g. a truncated upload) is still served as an object; its dcserv queries fail with 500, as
they would on DCOR.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from . import condense, kernel, repository
from .external import ExternalServer
from .objects import BUCKET_TEMPLATE, Presigner, StoredObject, bucket_name, object_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteOptions:
    # ckanext.dc_serve.enable_intra_dataset_basins (production default: on)
    intra_basin_features: bool = True
    # dc_serve 1.0.9 answers `trace_list` for files without traces with a 500
    trace_list_quirk: bool = True
    # off: no condensed objects (as right after an upload, before DCOR's job ran)
    condensed: bool = True
    # the host name in object URLs (basins, downloads, s3_url), e.g. "localhost" while the site
    # is 127.0.0.1: objects then live on "another host", as DCOR's object store does
    object_host: str = ""
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
    ) -> None:
        self.repo = repo
        self.url = url
        self.objects_url = objects_url(url, options.object_host)
        self.objects = objects
        self.kernels = kernels
        self.presigner = presigner
        self.options = options
        self.external: ExternalServer | None = None  # where link resources point, if any

    @classmethod
    def build(
        cls,
        data_dir: Path,
        state_dir: Path,
        url: str,
        options: SiteOptions,
        progress: Callable[[str], None] | None = None,
    ) -> Site:
        repo = repository.load(data_dir, state_dir, progress)
        if not repo.datasets:
            log.warning("%s holds no datasets (see the README for the layout)", data_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        digests = repository.DigestCache(state_dir / "digests.json", progress)
        objects: dict[tuple[str, str], StoredObject] = {}
        kernels: dict[str, kernel.Kernel | None] = {}
        # files not on S3 are neither condensed nor opened by dcserv (it reads S3 objects)
        rtdc = [
            (ds, res) for ds, res in repo.iter_resources() if res.is_rtdc and res.storage == "s3"
        ]
        for number, (ds, res) in enumerate(rtdc, start=1):
            if progress is not None and len(rtdc) > 3:
                progress(f"preparing RT-DC resource {number}/{len(rtdc)}: {res.name}")
            with warnings.catch_warnings(record=True) as caught:
                # dclab's warnings about old files are logged, whatever the caller's filters
                warnings.simplefilter("always")
                prepared = _prepare(
                    ds, res, url=url, state_dir=state_dir, options=options, digests=digests
                )
            for warning in caught:
                log.info("%s: %s", res.name, warning.message)
            kernels[res.id], condensed = prepared
            if condensed is not None:
                objects[(condensed.bucket, condensed.key)] = condensed
        digests.save()
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
        )

    def resource_object(self, resource_id: str, artifact: str) -> StoredObject | None:
        found = self.repo.resource(resource_id)
        if found is None:
            return None
        bucket = self.bucket(found[0].circle.id)
        return self.objects.get((bucket, object_key(artifact, resource_id)))

    def bucket(self, circle_id: str) -> str:
        return bucket_name(circle_id, self.options.bucket_template)

    def object_url(self, bucket: str, key: str) -> str:
        return f"{self.objects_url}/{bucket}/{key}"

    def link_url(self, res: repository.Resource) -> str:
        """The external `url` of a link resource: its file on the external server."""
        if self.external is None:
            return f"http://external.invalid/{quote(res.name)}"
        return self.external.url_of(self.external.root / res.link_to if res.link_to else res.path)


def _prepare(
    ds: repository.Dataset,
    res: repository.Resource,
    *,
    url: str,
    state_dir: Path,
    options: SiteOptions,
    digests: repository.DigestCache,
) -> tuple[kernel.Kernel | None, StoredObject | None]:
    """Condense one RT-DC resource and compute its dcserv kernel; failures are logged."""
    bucket = bucket_name(ds.circle.id, options.bucket_template)
    condensed_file = condensed = None
    if options.condensed:
        try:
            condensed_file = condense.condensed_path(
                res.path,
                res.digests.sha256,
                state_dir,
                resource_id=res.id,
                site_url=url,
                object_url=f"{objects_url(url, options.object_host)}/{bucket}/"
                f"{object_key('resource', res.id)}",
            )
        except Exception as exc:
            log.warning("cannot condense %s (%s): %s", res.name, res.id, exc)
    if condensed_file is not None:
        digest = digests.get(condensed_file)
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
