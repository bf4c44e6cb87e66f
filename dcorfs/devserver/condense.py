"""Condensed files, made the way DCOR's background job makes them.

DCOR (`ckanext-dc_serve`, `jobs.py`) runs dclab's `condense_dataset` on every uploaded RT-DC
resource (all scalar features, computable ancillary features such as `volume` or `time`, logs,
tables) and then stores three remote basins in the result, each listing the original's
features that the condensed file lacks: "DCOR dcserv" (format dcor), "DCOR direct S3"
(format s3) and "DCOR public S3 via HTTP" (format http).

The expensive part (condensing) depends only on the source bytes and is cached by SHA-256
(`STATE/condensed`, shared by every server of the data directory); the basins hold this
server's URLs, so the final file is derived per server (a cheap copy) into a directory of its
own (`STATE/sites/<pid>-…`, `SiteDir`), removed when the server stops, or by the next server
to start once no server holds it (`tidy`): a server on a free port (the default) has other
URLs every time, and its files must not pile up with every start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from . import intra

log = logging.getLogger(__name__)


SITES = "sites"  # under the state directory: one directory per running server
LOCK = "lock"  # in a server's directory, locked (flock) by it while it runs
STARTING = 600.0  # seconds a server's directory may be without its lock file (being made)
ABANDONED = 3600.0  # seconds after its last change a temporary file is taken as left behind
# per-URL copies that earlier versions kept among the shared files (`<resource id>-<12 hex>.rtdc`,
# and their temporary files); the shared ones are `<sha256>.core.rtdc` and `….features.json`
_LEGACY_SITE_FILE = re.compile(r".+-[0-9a-f]{12}\.rtdc(\.\d+\.tmp)?")


def tidy(state_dir: Path) -> None:
    """Remove what servers no longer running left in `state_dir`: their own directories
    (`SiteDir`: locked by the server while it runs, across processes, containers and hosts
    sharing the directory), and the per-URL copies earlier versions kept."""
    sites = state_dir / SITES
    if sites.is_dir():
        for old in sites.iterdir():
            if old.is_dir() and _abandoned(old):
                shutil.rmtree(old, ignore_errors=True)
    shared = state_dir / "condensed"
    if shared.is_dir():
        for old in shared.iterdir():
            if _LEGACY_SITE_FILE.fullmatch(old.name) or _left_behind(old):
                old.unlink(missing_ok=True)


def _left_behind(path: Path) -> bool:
    """A temporary file of a condensing that ended without its file (interrupted)."""
    try:
        return path.name.endswith(".tmp") and time.time() - path.stat().st_mtime > ABANDONED
    except OSError:
        return False


def _abandoned(directory: Path) -> bool:
    """Whether no server holds `directory` (its lock is free, or it never got one)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:  # being made, or its server died making it
        try:
            return time.time() - directory.stat().st_mtime > STARTING
        except OSError:
            return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # its server runs
    finally:
        os.close(fd)  # (and with it the lock taken here)
    return True


class SiteDir:
    """A new directory for one server's own files (see the module's docstring), locked while
    the server runs; `remove` it when the server stops."""

    def __init__(self, state_dir: Path) -> None:
        sites = state_dir / SITES
        sites.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=sites))
        self._lock = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)

    def remove(self) -> None:
        if self._lock >= 0:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._lock)
            self._lock = -1


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
    cached in `state_dir`, the file with this server's basins made in `site` (`SiteDir`).

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
