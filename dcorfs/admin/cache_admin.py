"""`dcorfs cache info|clear`: what a cache dir holds, per resource; emptying it safely.

Blocks of the resources' files and of their decoded feature values (derived objects, see
`derived`) are counted together, per resource; the decoded part is also shown apart.

Works on the directory alone (no mount, no network). `info` only reads (its databases opened
read-only), so it is safe beside running mounts. `clear` takes the directory's lock
exclusively, so it refuses while a mount uses it unless forced; forced, it empties the
accounting and block files under the mount, which then refetches what it needs.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..cache import cachedir
from ..cache.answers import DATASET_RECORDS
from ..cache.derived import is_derived, source_key
from ..cache.diskstore import CacheInUse, DiskStore, StoredObject, in_use, read_inventory
from ..cache.metastore import MetaStore, read_answers
from ..daemon.report import size
from ..errors import ConfigError
from ..remote.dcserv import parse_resource_key


@dataclass
class ResourceUse:
    resource_id: str
    name: str
    nbytes: int = 0
    object_bytes: int = 0  # the remote objects' full sizes, where known
    decoded_bytes: int = 0  # of it: decoded feature values (derived objects)
    objects: list[StoredObject] = field(default_factory=list)


def _names(answers: list[object]) -> dict[str, str]:
    """resource id → 'dataset/resource name', from the package records the mounts remembered
    (package_show answers are records, package_search answers lists of them)."""
    names: dict[str, str] = {}
    records: list[object] = []
    for answer in answers:
        records.extend(answer if isinstance(answer, list) else [answer])
    for record in records:
        if not isinstance(record, dict):
            continue
        for resource in record.get("resources") or []:
            if isinstance(resource, dict) and resource.get("id"):
                dataset, name = record.get("name", "?"), resource.get("name", "?")
                names[str(resource["id"])] = f"{dataset}/{name}"
    return names


def _by_resource(objects: list[StoredObject], names: dict[str, str]) -> list[ResourceUse]:
    groups: dict[str, ResourceUse] = {}
    for obj in objects:
        parsed = parse_resource_key(source_key(obj.key)) if obj.key else None
        rid = parsed[0] if parsed else (obj.key or "(stored by an older dcorfs)")
        use = groups.setdefault(rid, ResourceUse(rid, names.get(rid, "") if parsed else ""))
        use.nbytes += obj.nbytes
        if obj.key and is_derived(obj.key):
            use.decoded_bytes += obj.nbytes
        else:
            use.object_bytes += obj.size or 0
        use.objects.append(obj)
    return sorted(groups.values(), key=lambda use: use.nbytes, reverse=True)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def inventory(cache_dir: Path) -> dict[str, Any]:
    """Everything `cache info` shows, as plain data."""
    busy = in_use(cache_dir)
    try:
        objects = read_inventory(cache_dir)
        answers, records = 0, list[Any]()
        if (cache_dir / cachedir.META).exists():
            answers, found = read_answers(cache_dir / cachedir.META, DATASET_RECORDS)
            records = [value for _, value in found]
    except sqlite3.Error as exc:
        hint = " (damaged: the next mount renews it)" if cachedir.is_damaged(exc) else ""
        raise ConfigError(f"cannot read the cache dir {cache_dir}: {exc}{hint}") from None
    names = _names(records)
    resources = _by_resource(objects, names)
    return {
        "cache_dir": str(cache_dir),
        "in_use": busy,
        "bytes": sum(obj.nbytes for obj in objects),
        "decoded_bytes": sum(use.decoded_bytes for use in resources),
        "blocks": sum(obj.blocks for obj in objects),
        "objects": len(objects),
        "answers": answers,
        "answers_bytes": _file_size(cache_dir / cachedir.META),
        "log_bytes": _file_size(cache_dir / cachedir.LOG),
        "resources": [
            {
                "id": use.resource_id,
                "name": use.name,
                "bytes": use.nbytes,
                "object_bytes": use.object_bytes,
                "decoded_bytes": use.decoded_bytes,
                "objects": [
                    {
                        "key": o.key,
                        "etag": o.etag,
                        "size": o.size,
                        "bytes": o.nbytes,
                        "decoded": bool(o.key and is_derived(o.key)),
                    }
                    for o in use.objects
                ],
            }
            for use in resources
        ],
    }


def _print_info(report: dict[str, Any], out: TextIO) -> None:
    state = " (in use by a mount)" if report["in_use"] else ""
    out.write(f"cache dir  {report['cache_dir']}{state}\n")
    out.write(
        f"blocks     {size(report['bytes'])} in {report['blocks']} blocks "
        f"of {report['objects']} objects ({size(report['decoded_bytes'])} decoded values)\n"
    )
    out.write(
        f"answers    {report['answers']} remembered API answers ({size(report['answers_bytes'])})\n"
    )
    out.write(f"log        {size(report['log_bytes'])}\n")
    if not report["resources"]:
        return
    out.write("\ncached       of objects    resource\n")
    for use in report["resources"]:
        whole = size(use["object_bytes"]) if use["object_bytes"] else "?"
        label = f"{use['id']}  {use['name']}".rstrip()
        out.write(f"{size(use['bytes']):>11}  {whole:>11}    {label}\n")


def info(cache_dir: Path, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    if not as_json and not (cache_dir / cachedir.INDEX).exists():
        out.write(f"no cache in {cache_dir} yet\n")
        return 0
    report = inventory(cache_dir)
    if as_json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_info(report, out)
    return 0


def clear(cache_dir: Path, *, force: bool, out: TextIO = sys.stdout) -> int:
    """Empty the cache dir (blocks, remembered answers, the warm-up journal; not the log)."""
    if not (cache_dir / cachedir.INDEX).exists():
        out.write(f"no cache in {cache_dir}: nothing to clear\n")
        return 0
    try:
        store = DiskStore(cache_dir, limit_bytes=0, exclusive=not force)
    except CacheInUse:
        raise CacheInUse(
            f"the cache dir {cache_dir} is in use by a mount: unmount it first, "
            "or pass --force (the mount then refetches what it reads)"
        ) from None
    meta = MetaStore(cache_dir / cachedir.META, scope="")
    try:
        nbytes, blocks = store.clear()
        answers = meta.clear()
        (cache_dir / cachedir.JOURNAL).unlink(missing_ok=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot clear the cache dir {cache_dir}: {exc}") from None
    finally:
        meta.close()
        store.close()
    out.write(
        f"cleared {cache_dir}: {size(nbytes)} in {blocks} blocks, {answers} remembered answers\n"
    )
    return 0
