"""Checks before mounting: what can be found wrong while the user still waits for the command.

The mount point (exists, a directory, empty, not mounted, /dev/fuse there), the cache dir
(made, writable), and the origin: the host must answer like CKAN and take the API token for a
user (doc/DCOR.md §9), or with `--s3-only` the S3 endpoint must answer and have each circle's
bucket. An unreachable origin is fine only when answers are cached (the mount then starts
offline, with a warning). The shared cache tier must have its bucket and take the credentials
(or anonymous reads); unreachable, it is a warning (reads go to DCOR until it answers). Every
failure is a `ConfigError` with one line for the user.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..cache import cachedir
from ..cache.metastore import MetaStore
from ..errors import AccessDenied, ConfigError, DcorfsError, NotFound, StaleMount, unreachable
from ..remote.dcserv import DcorApi, bucket_name
from ..remote.http import Http, RetryPolicy
from ..remote.s3 import sigv4_presigner
from ..settings import SHARED_KEY_ID_ENV, MountSettings
from .wiring import object_store, scope, shared_tier

PREFLIGHT_SECONDS = 15.0
REJECTED_CREDENTIALS = ("SignatureDoesNotMatch", "InvalidAccessKeyId")


def check(settings: MountSettings) -> None:
    """Everything that can be checked before mounting: mount point, cache dir, and the host
    (or, with `--s3-only`, the S3 endpoint); botocore for S3 credentials."""
    check_mountpoint(settings.mountpoint)
    check_source(settings)


def check_source(settings: MountSettings) -> None:
    """The cache dir, and the host (or, with `--s3-only`, the S3 endpoint); botocore for S3
    credentials: what a mount and a WebDAV share both need."""
    check_cache_dir(settings.cache_dir)
    store = MetaStore(settings.cache_dir / cachedir.META, scope=scope(settings))
    try:
        if settings.s3_only:
            check_endpoint(settings, store)
        else:
            check_host(settings, store)
            if settings.s3_credentials is not None:
                sigv4_presigner(settings.s3_credentials)  # botocore is there
    finally:
        store.close()
    check_shared(settings)


def check_mountpoint(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"mount point {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise StaleMount(path) from None
        raise ConfigError(f"mount point {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"mount point {path} is not a directory")
    if path.is_mount():
        raise ConfigError(f"{path} is already a mount point (busy)")
    try:
        occupied = any(path.iterdir())
    except OSError as exc:
        raise ConfigError(f"mount point {path}: {exc.strerror}") from None
    if occupied:
        raise ConfigError(f"mount point {path} is not empty (the mount would hide its files)")
    if not Path("/dev/fuse").exists():
        raise ConfigError("/dev/fuse is missing: install fuse3 and load the fuse module")


def check_cache_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create cache dir {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"cache dir {path} is not writable")


def _preflight(
    origin: str,
    like: str,
    marker: str,
    store: MetaStore,
    ask: Callable[[Http], None],
    *,
    unchecked: str = "",
) -> None:
    """`ask` the origin what only a working `like` server answers (a ConfigError from it goes
    out as it is); unreachable is fine only when answers are stored: `marker`, kept in the
    store after a success (then the warning says what was left `unchecked`)."""
    http = Http(policy=RetryPolicy(attempts=3, connect_timeout=5.0, read_timeout=10.0))
    try:
        ask(http)
    except ConfigError:
        raise
    except DcorfsError as exc:
        if not unreachable(exc):
            raise ConfigError(f"{origin} does not answer like {like}: {exc}") from None
        if store.get(marker) is None:
            raise ConfigError(f"cannot reach {origin}: {exc}") from None
        print(f"dcorfs: {origin} unreachable; serving what is cached{unchecked}", file=sys.stderr)
    else:
        store.put(marker, {"checked": time.time()})
    finally:
        http.close()


def check_host(settings: MountSettings, store: MetaStore) -> None:
    """The host must answer like CKAN, and take a token for a user (it would silently treat
    a wrong or expired one as anonymous: doc/DCOR.md §9); unreachable is fine only when
    answers are stored."""

    def ask(http: Http) -> None:
        api = DcorApi(http=http, base_url=settings.host, token=settings.token)
        api.action("status_show", {}, deadline=time.monotonic() + PREFLIGHT_SECONDS)
        if (
            api.authenticated
            and api.token_user(deadline=time.monotonic() + PREFLIGHT_SECONDS) is None
        ):
            raise ConfigError(
                f"{settings.host} rejects the API token (wrong or expired; it would read "
                "as anonymous): check --api-key-file or DCOR_API_KEY"
            )

    unchecked = " (the API token was not checked)" if settings.token else ""
    _preflight(settings.host, "DCOR", "status_show", store, ask, unchecked=unchecked)


def check_endpoint(settings: MountSettings, store: MetaStore) -> None:
    """The S3 endpoint must answer (a refusal to list is an answer) unless answers are stored,
    each circle must have a bucket there, and signing must be possible (botocore installed)
    when there are credentials."""

    def ask(http: Http) -> None:
        objects = object_store(settings, http)
        assert objects is not None
        for circle_id in settings.circles:
            bucket = bucket_name(circle_id, settings.s3_bucket_template)
            deadline = time.monotonic() + PREFLIGHT_SECONDS
            try:
                objects.list(bucket, "resource/", max_keys=1, pages=1, deadline=deadline)
            except AccessDenied as exc:  # there, but not listable with these credentials
                if exc.code in REJECTED_CREDENTIALS:
                    print(
                        f"dcorfs: warning: {settings.s3_endpoint} rejects these S3 credentials "
                        f"({exc.code}): their reads will fail with EACCES",
                        file=sys.stderr,
                    )
            except NotFound:
                raise ConfigError(f"{settings.s3_endpoint} has no bucket {bucket}") from None

    assert settings.s3_endpoint is not None
    _preflight(settings.s3_endpoint, "S3", "s3_checked", store, ask)


def check_shared(settings: MountSettings) -> None:
    """The shared cache tier: its bucket must be there and take the credentials (or, without
    them, anonymous reads); unreachable is a warning, not a refusal."""
    shared = settings.shared_cache
    if shared is None:
        return
    where = f"the shared cache {shared.url} at {shared.endpoint}"
    http = Http(policy=RetryPolicy(attempts=3, connect_timeout=5.0, read_timeout=10.0))
    tier = shared_tier(settings, http)
    assert tier is not None
    try:
        tier.check(deadline=time.monotonic() + PREFLIGHT_SECONDS)
    except NotFound:
        raise ConfigError(f"{where}: no bucket {shared.bucket}") from None
    except AccessDenied as exc:
        if shared.credentials is None:
            raise ConfigError(
                f"{where} refuses anonymous reads: give ${SHARED_KEY_ID_ENV} and its secret, "
                "or --shared-cache-credentials"
            ) from None
        why = "rejects these credentials" if exc.code in REJECTED_CREDENTIALS else "refuses reads"
        raise ConfigError(f"{where} {why} ({exc.code or 'HTTP 403'})") from None
    except DcorfsError as exc:
        print(f"dcorfs: warning: {where} unreachable ({exc}); reads go to DCOR", file=sys.stderr)
    finally:
        tier.close()
        http.close()
