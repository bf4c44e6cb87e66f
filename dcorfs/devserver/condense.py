"""Condensed files, made the way DCOR's background job makes them.

DCOR (`ckanext-dc_serve`, `jobs.py`) runs dclab's `condense_dataset` on every uploaded RT-DC
resource (all scalar features, computable ancillary features such as `volume` or `time`, logs,
tables) and then stores three remote basins in the result, each listing the original's
features that the condensed file lacks: "DCOR dcserv" (format dcor), "DCOR direct S3"
(format s3) and "DCOR public S3 via HTTP" (format http).

The expensive part (condensing) depends only on the source bytes and is cached by SHA-256
(`STATE/condensed`, shared by every server of the data directory); the basins hold this
server's URLs, so the final file is derived per server (a cheap copy) into a directory of its
own (`STATE/sites/<pid>-…`, `site_dir`), removed when the server stops (`remove_site_dir`), or
by the next server to start once its process is gone: a server on a free port (the default)
has other URLs every time, and its files must not pile up with every start.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from . import intra

log = logging.getLogger(__name__)


SITES = "sites"  # under the state directory: one directory per running server
# per-URL files that earlier versions left among the shared ones (`<resource id>-<key>.rtdc`)
_LEGACY_SITE_FILE = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}-[0-9a-f]{12}\.rtdc")


def site_dir(state_dir: Path) -> Path:
    """A new directory for one server's own files (see the module's docstring), after
    removing those of servers whose process is gone."""
    sites = state_dir / SITES
    sites.mkdir(parents=True, exist_ok=True)
    for old in sites.iterdir():
        pid = old.name.partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    shared = state_dir / "condensed"
    if shared.is_dir():
        for old in shared.iterdir():
            if _LEGACY_SITE_FILE.fullmatch(old.name):
                old.unlink(missing_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=sites))


def remove_site_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's)
        return True
    return True


def condensed_path(
    source: Path,
    source_sha256: str,
    state_dir: Path,
    *,
    site: Path,
    resource_id: str,
    site_url: str,
    object_url: str,
    upstream: list[dict[str, Any]] | None = None,
) -> Path:
    """Return the condensed file for `source`, making it if needed: its condensed core is
    cached in `state_dir`, the file with this server's basins made in `site` (`site_dir`).

    `object_url` is the original resource's object-store URL (for the S3/HTTP basins);
    `upstream`: intra-dataset basins (`store_basin` arguments, see `intra`).
    """
    upstream = upstream or []
    core, missing = condensed_core(source, source_sha256, state_dir)
    site_key = hashlib.sha1(
        f"{site_url}|{object_url}|{intra.digest(upstream)}".encode()
    ).hexdigest()[:12]
    final = site / f"{resource_id}-{site_key}.rtdc"
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
