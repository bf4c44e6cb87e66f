"""The keys of remembered answers (`meta.sqlite3` through `cache.metastore`), in one place.

Every kind of answer a mount remembers has one function here that makes its key, and says what
the value is. Values are JSON. A kind whose value's format changes gets a new version in its
key (`:v2:` …): answers of the old format are then never read again (they age out with
`cache clear`), so a new dcorfs never misreads what an older one stored. Keys are scoped by
the metastore (host and token), not here.

API answers (asked again when older than their age, see `remote.catalog`):
- `group_names(action)` — circles or collections: list of names.
- `dataset_search(fq)` — `package_search` records of a filter, all pages: list of records.
- `dataset(name_or_id)` — a `package_show` record.
- `resource_record(resource_id)` — a `resource_show` record.
- `dcserv(query, resource_id, settled=…)` — a dcserv answer (`metadata`, `tables`, `logs`);
  while DCOR may still change it (no condensed file yet), kept apart as unsettled.
- `basins(resource_id)` — dcserv's `basins` answer.
- `object_info(key)` — an object's size and ETag: `{"size": int, "etag": str}`.
- `bucket_listing(bucket)` — the objects of a bucket (`--s3-only`).

Made from files (for one object version, kept for good):
- `features(identity)` — `{name: [dtype, shape(, events per chunk)]}` of a file's features
  (`hdf5.rtdc.describe`).
- `intra_basins(identity)` — the intra-dataset basins a file declares (`hdf5.upstream`).
- `experiment(identity)` — the `experiment` section of a file's own metadata.
- `contour_lengths(identity, events)` — the number of points of each of a file's first
  `events` contours (`hdf5.contour`: zlib-compressed int64, base64).
- `file_texts(key, etag, made_from)` — metadata, logs and tables made from the files.
- `skeleton(resource_id, layout, digest)` — the HDF5 structure of a synthesized `.rtdc`
  (`hdf5.skeleton.Skeleton.to_json`) in a layout version, `digest` naming the features and
  files it was built from.
"""

from __future__ import annotations

# read back by `dcorfs cache info` (names of the resources a cache dir holds)
DATASET_RECORDS = ("package_show:", "package_search:")


def group_names(action: str) -> str:
    return f"{action}:names"


def dataset_search(fq: str) -> str:
    return f"package_search:{fq}"


def dataset(name_or_id: str) -> str:
    return f"package_show:{name_or_id}"


def resource_record(resource_id: str) -> str:
    return f"resource_show:{resource_id}"


def dcserv(query: str, resource_id: str, *, settled: bool) -> str:
    if not settled:
        return f"dcserv:{query}:{resource_id}:unsettled"
    if query == "logs":
        return f"dcserv:logs:v2:{resource_id}"
    return f"dcserv:{query}:{resource_id}"


def basins(resource_id: str) -> str:
    return f"basins:{resource_id}"


def object_info(key: str) -> str:
    return f"object:{key}"


def bucket_listing(bucket: str) -> str:
    return f"s3-listing:{bucket}"


def features(identity: bytes) -> str:
    # v4: events per chunk of the features of more than one dimension (their decoded values'
    # blocks hold whole chunks; a v3 answer lacks them, and an older dcorfs sharing the cache
    # dir could not read v4's). v3: dclab's rule (defective features left out) and the
    # contour group (earlier versions kept defective features and did not say whether a file
    # has a contour)
    return f"rtdc-features:v4:{identity.hex()}"


def intra_basins(identity: bytes) -> str:
    return f"rtdc-intra-basins:v1:{identity.hex()}"


def experiment(identity: bytes) -> str:
    return f"rtdc-experiment:v1:{identity.hex()}"


def contour_lengths(identity: bytes, events: int) -> str:
    return f"rtdc-contour:v1:{identity.hex()}:{events}"


def file_texts(key: str, etag: str, made_from: str) -> str:
    return f"file-texts:{key}:{etag}:{made_from}"


def skeleton(resource_id: str, layout: int, digest: str) -> str:
    return f"rtdc-skeleton:v{layout}:{resource_id}:{digest}"
