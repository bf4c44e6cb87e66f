"""Condensed files, made the way DCOR's background job makes them.

DCOR (`ckanext-dc_serve`, `jobs.py`) runs dclab's `condense_dataset` on every uploaded RT-DC
resource (all scalar features, computable ancillary features such as `volume` or `time`, logs,
tables) and then stores three remote basins in the result, each listing the original's
features that the condensed file lacks: "DCOR dcserv" (format dcor), "DCOR direct S3"
(format s3) and "DCOR public S3 via HTTP" (format http).

The expensive part (condensing) depends only on the source bytes and is cached by SHA-256;
the basins hold this server's URLs, so the final file is derived per site URL (a cheap copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from . import intra

log = logging.getLogger(__name__)


def condensed_path(
    source: Path,
    source_sha256: str,
    state_dir: Path,
    *,
    resource_id: str,
    site_url: str,
    object_url: str,
    upstream: list[dict[str, Any]] | None = None,
) -> Path:
    """Return the condensed file for `source`, making it if needed (cached in `state_dir`).

    `object_url` is the original resource's object-store URL (for the S3/HTTP basins);
    `upstream`: intra-dataset basins (`store_basin` arguments, see `intra`).
    """
    upstream = upstream or []
    core, missing = condensed_core(source, source_sha256, state_dir)
    site_key = hashlib.sha1(
        f"{site_url}|{object_url}|{intra.digest(upstream)}".encode()
    ).hexdigest()[:12]
    final = core.with_name(f"{resource_id}-{site_key}.rtdc")
    if not final.exists():
        _with_dcor_basins(
            core,
            final,
            resource_id=resource_id,
            site_url=site_url,
            object_url=object_url,
            missing=missing,
            upstream=upstream,
        )
    return final


def condensed_core(source: Path, source_sha256: str, state_dir: Path) -> tuple[Path, list[str]]:
    """The condensed file without DCOR's basins (made once per content) and the original's
    features it lacks (those its remote basins list)."""
    cache = state_dir / "condensed"
    cache.mkdir(parents=True, exist_ok=True)
    core = cache / f"{source_sha256}.core.rtdc"
    missing_json = cache / f"{source_sha256}.features.json"
    if not (core.exists() and missing_json.exists()):
        missing = _condense(source, core)
        _write_atomic(missing_json, json.dumps(missing).encode())
        return core, missing
    missing = json.loads(missing_json.read_text())
    return core, missing


def _condense(source: Path, core: Path) -> list[str]:
    """Condense `source` into `core`; return the original's features the result lacks."""
    import dclab
    import h5py
    from dclab.cli import condense_dataset

    tmp = core.with_name(f"{core.name}.{os.getpid()}.tmp")
    log.info("condensing %s", source.name)
    # condense_dataset prints what it computes; that must not reach the devserver's stdout
    with (
        contextlib.redirect_stdout(io.StringIO()),
        dclab.new_dataset(source, enable_basins=False) as ds,
        h5py.File(tmp, "w") as h5_cond,
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            condense_dataset(
                ds=ds,
                h5_cond=h5_cond,
                store_ancillary_features=True,
                store_basin_features=True,
                warnings_list=caught,
            )
        missing = sorted(set(ds.features_innate) - set(h5_cond["events"].keys()))
    tmp.replace(core)
    return missing


def _with_dcor_basins(
    core: Path,
    final: Path,
    *,
    resource_id: str,
    site_url: str,
    object_url: str,
    missing: list[str],
    upstream: list[dict[str, Any]],
) -> None:
    import dclab

    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    shutil.copyfile(core, tmp)
    dcor_url = f"{site_url}/api/3/action/dcserv?id={resource_id}"
    basins = (
        ("DCOR dcserv", "dcor", dcor_url, "Original access via DCOR API"),
        ("DCOR direct S3", "s3", object_url, "Direct access via S3"),
        ("DCOR public S3 via HTTP", "http", object_url, "Public resource access via HTTP"),
    )
    with dclab.RTDCWriter(tmp) as hw:
        for name, fmt, url, description in basins:
            hw.store_basin(
                basin_name=name,
                basin_type="remote",
                basin_format=fmt,
                basin_locs=[url],
                basin_descr=description,
                basin_feats=missing,
                verify=False,
            )
        for basin in upstream:
            hw.store_basin(verify=False, **basin)
    tmp.replace(final)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
