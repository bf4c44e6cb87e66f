"""The namespace of an `--s3-only` mount: circles' buckets, read without DCOR's API.

```
MOUNT/
  README.txt
  circles/<circle-id>/<resource-id>/   the circles given with --circle; listing = the bucket's
  by-id/<resource-id>/                 any resource of those circles (listing: opened so far)
  .dcorfs/status.json
```
Without CKAN there are no dataset or file names: a circle directory holds one directory per
resource, named by its id, with what an RT-DC resource directory holds anywhere else (README,
"The tree";
the synthesized file is `<resource-id>.rtdc`, metadata, logs and tables come from the file).
A resource whose object is not an HDF5 file (DCOR also stores .csv, .pdf …) shows that object
as one plain file, `resource`. Listing a circle needs the right to list its bucket (on DCOR:
S3 credentials); any resource id still resolves by lookup.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..errors import AccessDenied, NotFound
from ..remote.buckets import BucketCatalog
from ..remote.catalog import Dataset, Resource
from .names import sanitize
from .tree import (
    UUID,
    ByIdDir,
    Context,
    Dir,
    Node,
    PlainFile,
    ResourceDir,
    StaticDir,
    static_file,
    status_dir,
)

PLAIN_NAME = "resource"  # DCOR's name of the artifact: the uploaded file itself
README = """\
dcorfs: DCOR's object store as a read-only filesystem (--s3-only: no DCOR API)

  circles/<circle-id>/<resource-id>/   the resources in the bucket of each circle
  by-id/<resource-id>/                 any resource of these circles by its id
  .dcorfs/status.json                  live counters of this mount (`dcorfs status MOUNT`)

Listing a circle needs the right to list its bucket (S3 credentials); any resource resolves
by its id without it.

In an RT-DC resource directory:
  <resource-id>.rtdc     the whole measurement as one HDF5 file (dclab, h5py, HDFView …)
  <feature>.npy          one per feature (numpy.load(path, mmap_mode="r") works)
  trace/<name>.npy       fluorescence traces, shape (events, samples)
  features.tsv           all scalar features as a fixed-width, tab-separated table
  features.fcs           the same table as an FCS 3.1 file (FlowJo, flowCore, FlowKit)
  image.tif, mask.tif    the images as TIFF stacks, one page per event (Fiji/ImageJ)
  metadata.json          the measurement's metadata, from the file itself
  logs/<name>.txt        logs;  tables/<name>.csv  tables
A resource that is not an RT-DC file shows its bytes as one file, `resource`.

Everything is fetched lazily and cached; only the bytes you read cross the network.
"""


def build_s3_root(
    ctx: Context, buckets: BucketCatalog, status: Callable[[], bytes], *, mtime: float
) -> Dir:
    circles: dict[str, Node] = {
        sanitize(cid): CircleDir(f"/circles/{sanitize(cid)}", ctx, buckets, cid, mtime=mtime)
        for cid in buckets.circles
    }
    children: dict[str, Node] = {
        "README.txt": static_file("/README.txt", README.encode(), mtime),
        "by-id": BucketByIdDir("/by-id", ctx, buckets.find, mtime=mtime),
        "circles": StaticDir("/circles", circles, mtime=mtime),
        ".dcorfs": status_dir(status, mtime),
    }
    return StaticDir("/", children, mtime=mtime)


class BucketResourceDir(ResourceDir):
    """A resource found in a bucket: an RT-DC resource directory if its object is HDF5,
    else a directory holding the object as the plain file `resource`."""

    def _rtdc(self) -> bool:
        return self._ctx.objects.is_hdf5(self.dataset, self.resource)

    def _load(self) -> dict[str, Node]:
        if self._rtdc():
            return super()._load()
        path = self.child_path(PLAIN_NAME)
        return {PLAIN_NAME: PlainFile(path, self._ctx, self.dataset, self.resource).node}


class BucketByIdDir(ByIdDir):
    def _node(self, path: str, dataset: Dataset, resource: Resource) -> Node:
        return BucketResourceDir(path, self._ctx, dataset, resource)


class CircleDir(Dir):
    """The resources in a circle's bucket, by id; unlisted ids resolve on lookup."""

    def __init__(
        self, path: str, ctx: Context, buckets: BucketCatalog, circle_id: str, *, mtime: float
    ) -> None:
        super().__init__(path, mtime=mtime, max_age=ctx.dir_cache_time)
        self._ctx = ctx
        self._buckets = buckets
        self._circle_id = circle_id
        self._dataset = buckets.dataset(circle_id)
        self._resolved: dict[str, Node] = {}
        self._resolving = threading.Lock()  # not `_lock`: that one is held while loading

    def _node(self, resource: Resource) -> Node:
        with self._resolving:
            node = self._resolved.get(resource.id)
            if node is None:
                node = BucketResourceDir(
                    self.child_path(resource.id), self._ctx, self._dataset, resource
                )
                self._resolved[resource.id] = node
            return node

    def _load(self) -> dict[str, Node]:
        resources = self._buckets.resources(self._circle_id)
        return {r.id: self._node(r) for r in resources}

    def lookup(self, name: str) -> Node:
        try:
            return super().lookup(name)
        except AccessDenied:  # not allowed to list: resolve the id by itself
            if not UUID.match(name):
                raise NotFound(f"{name} is not a resource id") from None
        return self._node(self._buckets.resource(self._circle_id, name))
