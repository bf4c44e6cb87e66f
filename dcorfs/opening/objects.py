"""Where a resource's objects are and who they are: URLs registered with the `Locator` (with a
way to renew them) and stable identities (bucket/key, ETag, size), remembered in the metadata
store so a later mount serves cached bytes with the server gone.

Where: the URLs dcserv's `basins` hand out, or, with an S3 `ObjectStore` (`--s3-endpoint`),
DCOR's object layout on that endpoint, read directly — anonymously for public datasets, signed
with S3 credentials for any; a private dataset without S3 credentials keeps dcserv's presigned
URLs. Either way an object has the same identity, so cached blocks serve both paths. Other
resources: links (followed through redirects, their identity looked at again after
`LINK_AGE`), files on the site's own disk (DCOR's download route) and S3 objects
(doc/DCOR.md §6). dcserv's basins answer is kept for good unless its condensed basin has no
`features` yet (doc/DCOR.md §1, §7): then it is asked again after `recheck` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..cache import answers, prefetch
from ..cache.blockcache import BlockCache
from ..cache.identity import ObjectId
from ..cache.metastore import FOREVER, Memo
from ..errors import AccessDenied, Moved, NotFound, ProtocolError, redact_url
from ..remote.catalog import Dataset, Resource
from ..remote.dcserv import (
    BUCKET_TEMPLATE,
    Basin,
    DcorApi,
    Locator,
    Renew,
    parse_basins,
    resource_key,
)
from ..remote.http import Http
from ..remote.s3 import ObjectStore
from ..remote.shared import SharedTier

MAX_REDIRECTS = 5  # hops followed from a link resource's URL to its file
LINK_AGE = 300.0  # seconds a link's size and ETag are trusted (the other site may change it)
ROUTE_LIFETIME = 600.0  # assumed life of a download-route URL (DCOR: ≥ 3600 s); renewed on 403
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
Listed = Callable[[str], tuple[int, str] | None]  # bucket/key -> (size, ETag) if listed


class Objects:
    """The objects of one mount's resources: where (URLs) and who (identities)."""

    def __init__(
        self,
        *,
        api: DcorApi | None,
        memo: Memo,
        http: Http,
        locator: Locator,
        cache: BlockCache,
        timeout: float,
        store: ObjectStore | None = None,
        listed: Listed | None = None,
        recheck: float = 300.0,
        bucket_template: str = BUCKET_TEMPLATE,
        shared: SharedTier | None = None,
    ) -> None:
        """`api`: DCOR's API, None without it (then `store` is needed); `store`: objects read
        directly; `listed`: sizes and ETags known from bucket listings; `recheck`: seconds
        after which a basins answer that may still grow is asked again; `bucket_template`:
        how the server names a circle's bucket (doc/DCOR.md §10); `shared`: the shared cache
        tier, told which objects may be shared (those of public datasets)."""
        if api is None and store is None:
            raise ValueError("without DCOR's API, objects need an object store")
        self._api = api
        self._store = store
        self._listed = listed
        self._template = bucket_template
        self._memo = memo
        self._http = http
        self._locator = locator
        self._cache = cache
        self._timeout = timeout
        self._recheck = recheck
        self._shared = shared

    def _deadline(self) -> float:
        return time.monotonic() + self._timeout

    def direct(self, dataset: Dataset) -> bool:
        """Whether the dataset's objects are read from the object store: with S3 credentials
        or without DCOR's API always, anonymously only for public datasets (DCOR's private
        objects are not anonymously readable: dcserv's presigned URLs are)."""
        store = self._store
        return store is not None and (store.signed or self._api is None or not dataset.private)

    def private(self, dataset: Dataset) -> bool:
        """Whether the dataset's objects are private: CKAN says so; without DCOR's API (a
        circle's bucket) they are unless the store is read anonymously."""
        if self._api is None:
            return self._store is None or self._store.signed
        return dataset.private

    def _share(self, dataset: Dataset, key: str) -> str:
        """Tell the shared tier whether the object at `key` may be shared."""
        if self._shared is not None:
            self._shared.allow(key, private=self.private(dataset))
        return key

    def key(self, resource: Resource, artifact: str = "resource") -> str:
        """The bucket/key of a resource's object (its identity)."""
        return resource_key(resource.circle_id, resource.id, artifact, self._template)

    def _place(self, key: str) -> str:
        """Register the object store's URL of `key` (renewed by signing it again)."""
        store = self._store
        assert store is not None
        url, lifetime = store.url(key)
        self._locator.register(key, url, lifetime=lifetime, renew=lambda _: store.url(key))
        return key

    def locate(self, dataset: Dataset, resource: Resource) -> dict[str, str]:
        """The keys of the resource's objects by kind, their URLs registered."""
        if self.direct(dataset):
            keys = {
                kind: self._place(self.key(resource, kind)) for kind in ("resource", "condensed")
            }
        else:
            keys = {kind: basin.key for kind, basin in self._basins(resource.id).items()}
        for key in keys.values():
            self._share(dataset, key)
        return keys

    def _dcor(self) -> DcorApi:
        if self._api is None:
            raise ProtocolError("this mount has no DCOR API")
        return self._api

    def _basins(self, resource_id: str) -> dict[str, Basin]:
        """The resource's basins by kind; URLs registered with the locator."""

        def ask(deadline: float) -> Any:
            answer = self._dcor().dcserv(resource_id, "basins", deadline=deadline)
            return {"asked": time.time(), "basins": answer, "growing": _growing(answer)}

        answer = self._memo.get(answers.basins(resource_id), ask, max_age=self._basins_age)
        age = time.time() - float(answer["asked"])  # presigned URLs age while stored
        found = {}
        for basin in parse_basins(answer["basins"]):
            found[basin.kind] = basin
            lifetime = None if basin.lifetime is None else basin.lifetime - age
            self._locator.register(
                basin.key, basin.url, lifetime=lifetime, renew=self._renew(resource_id, basin.kind)
            )
        return found

    def _basins_age(self, answer: Any) -> float:
        """How long dcserv's basins answer is kept: for good, unless its condensed basin has
        no `features` (its object does not exist yet; they come once it does, doc/DCOR.md §7):
        judged when asked (this is called on every use of the remembered answer)."""
        try:
            growing = answer["growing"]
            if not isinstance(growing, bool):  # remembered before it was judged when asked
                growing = _growing(answer["basins"])
        except (KeyError, TypeError):
            return self._recheck
        return self._recheck if growing else FOREVER

    def _renew(self, resource_id: str, kind: str) -> Renew:
        def renew(deadline: float) -> tuple[str, float | None]:
            for basin in self._dcor().basins(resource_id, deadline=deadline):
                if basin.kind == kind:
                    return basin.url, basin.lifetime
            raise NotFound(f"{kind} of resource {resource_id} is no longer offered")

        return renew

    def identify(
        self,
        key: str,
        size: int | None,
        etag: str | None,
        *,
        head: int = prefetch.HEAD,
        max_age: float = FOREVER,
    ) -> ObjectId:
        """Identity of an object: from CKAN's record or a bucket listing when they have size
        and ETag, else probed (the probe brings the object's first `head` bytes into the
        cache as well)."""
        if (size is None or etag is None) and self._listed is not None:
            size, etag = self._listed(key) or (None, None)
        if size is not None and etag is not None:
            return ObjectId(key=key, etag=etag, size=size)

        shared = self._shared if max_age == FOREVER else None  # kept for good, as here

        def ask(deadline: float) -> Any:
            known = shared.identity(key, deadline=deadline) if shared is not None else None
            if known is not None:
                return {"size": known[0], "etag": known[1]}
            url = self._locator.url(key, deadline=deadline)
            headers = self._locator.headers(key)
            try:
                info = self._http.probe(url, head=head, headers=headers, deadline=deadline)
            except (AccessDenied, Moved) as exc:
                url = self._locator.renew(key, deadline=deadline, cause=exc)
                info = self._http.probe(url, head=head, headers=headers, deadline=deadline)
            obj = ObjectId(key=key, etag=info.etag, size=info.size)
            self._cache.admit(obj, info.head)
            if shared is not None:
                shared.offer(obj, 0, info.head)
                shared.remember_identity(key, info.size, info.etag)
            return {"size": info.size, "etag": info.etag}

        info = self._memo.get(answers.object_info(key), ask, max_age=max_age)
        return ObjectId(key=key, etag=str(info["etag"]), size=int(info["size"]))

    def is_hdf5(self, dataset: Dataset, resource: Resource) -> bool:
        """Whether the resource's object starts like an HDF5 file (an .rtdc) — for resources
        found in buckets, which carry no file name."""
        key = self._share(dataset, self.key(resource))
        if self.direct(dataset) and not self._locator.known(key):
            self._place(key)
        obj = self.identify(key, resource.size, resource.etag)
        if obj.size < len(HDF5_SIGNATURE):
            return False
        head = self._cache.read(obj, 0, len(HDF5_SIGNATURE), deadline=self._deadline())
        return head == HDF5_SIGNATURE

    def plain(self, dataset: Dataset, resource: Resource) -> ObjectId:
        """A non-RT-DC resource as an object: a link's external URL (its identity, asked
        without the token, looked at again after LINK_AGE: it may change), a file on the
        site's disk through DCOR's download route (with the token: that is the DCOR host),
        or the S3 object from the object store (see `_direct`), the public S3 URL or the
        download route's redirect (doc/DCOR.md §6)."""
        link = resource.link
        if link is not None:
            self._share(dataset, link)
            if not self._locator.known(link):
                self._locator.register(link, link, lifetime=None, renew=self._follow(link))
            return self.identify(link, None, None, max_age=LINK_AGE)
        if resource.on_site_disk:
            api = self._dcor()
            route = self._share(dataset, api.route(dataset.id, resource.id, resource.name))
            if not self._locator.known(route):
                self._locator.register(route, route, lifetime=None, headers=api.auth_headers())
            return self.identify(route, resource.size, None)
        key = self._share(dataset, self.key(resource))
        if not self._locator.known(key):
            if self.direct(dataset):
                self._place(key)
            elif resource.s3_url and not dataset.private:
                self._locator.register(key, resource.s3_url, lifetime=None)
            else:

                def renew(deadline: float) -> tuple[str, float | None]:
                    url = self._dcor().download_url(
                        dataset.id, resource.id, resource.name, deadline=deadline
                    )
                    return url, ROUTE_LIFETIME

                self._locator.register(key, "", lifetime=0.0, renew=renew)
        return self.identify(key, resource.size, resource.etag)

    def _follow(self, link: str) -> Renew:
        """Where a link resource's URL leads now: links often redirect (DOIs, repositories'
        download URLs), and object reads do not follow redirects; without the token (the
        link is not DCOR's host). Its identity stays the link's URL."""

        def renew(deadline: float) -> tuple[str, float | None]:
            url = link
            for _ in range(MAX_REDIRECTS):
                target = self._http.redirect(url, deadline=deadline)
                if target == url:
                    return url, ROUTE_LIFETIME
                url = target
            raise ProtocolError(f"link {redact_url(link)}: more than {MAX_REDIRECTS} redirects")

        return renew


def _growing(basins: Any) -> bool:
    """Whether dcserv's basins answer will grow: its condensed basin has no `features`."""
    try:
        parsed = parse_basins(basins)
    except (ProtocolError, KeyError, TypeError):
        return True
    return any(b.kind == "condensed" and b.features is None for b in parsed)
