"""`dcorfs webdav`: the tree served read-only over WebDAV (WsgiDAV on cheroot), in the
foreground until SIGTERM/SIGINT/SIGHUP. The same layers as a mount (`wiring.build_front`),
the same cache dir (a mount and a share may use one cache dir together), token and S3
options; `fs.dav` is the front end. Who may read: anyone who reaches a loopback address, or
the users of `--password-file` (HTTP basic or digest); the checks that a share beyond loopback,
or one that can read private data (a DCOR token, S3 credentials), has users are made before
anything starts (`check`).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cheroot import wsgi
from wsgidav.wsgidav_app import WsgiDAVApp

from .. import __version__
from ..errors import ConfigError, DcorfsError
from ..fs.dav import TreeProvider
from ..hdf5.rtdc import CycleCollector
from ..settings import MountSettings, WebDavSettings, is_loopback
from .loop import STATUS_PERIOD, prepare_process
from .metrics import METRICS_PERIOD, write_metrics
from .notify import Notifier
from .preflight import check_source
from .report import one_line
from .wiring import Front, build_front

log = logging.getLogger(__name__)
BLOCK = 1 << 20  # bytes WsgiDAV reads from a file at a time (then read-ahead takes over)


def check(settings: MountSettings, web: WebDavSettings) -> None:
    """Refuse what would expose data to people who should not read it (one-line errors)."""
    if web.users is not None:
        return
    if not is_loopback(web.host):
        raise ConfigError(
            f"listening on {web.host} (beyond this machine) needs --password-file; "
            "and a TLS reverse proxy in front (README, 'From Windows and macOS')"
        )
    # signed S3 reads take whatever the credentials may read (README)
    private = "a DCOR token" if settings.token is not None else "S3 credentials"
    if settings.token is not None or settings.s3_credentials is not None:
        raise ConfigError(
            f"with {private} the share can read private data: give --password-file, so "
            "that only authenticated clients read it"
        )


def app_config(provider: TreeProvider, web: WebDavSettings) -> dict[str, Any]:
    """WsgiDAV's configuration: one share at /, read-only, no locks (class 1), our users."""
    users: dict[str, Any] = (
        {"*": True}
        if web.users is None
        else {"*": {user: {"password": password} for user, password in web.users.items()}}
    )
    return {
        "host": web.host,
        "port": web.port,
        "provider_mapping": {"/": provider},
        "lock_storage": False,
        "property_manager": None,
        "block_size": BLOCK,
        "simple_dc": {"user_mapping": users},
        "http_authenticator": {
            "domain_controller": None,  # SimpleDomainController over simple_dc
            "accept_basic": True,
            "accept_digest": True,
            "default_to_digest": True,
        },
        "dir_browser": {"enable": True, "davmount": True, "ms_sharepoint_support": False},
        # Windows' WebClient asks OPTIONS before it authenticates (it tells nothing of data)
        "hotfixes": {"win_accept_anonymous_options": True},
        "suppress_version_info": True,
        "verbose": 1,
        "logging": {"enable": False},
    }


def serve(settings: MountSettings, web: WebDavSettings, *, ready: Callable[[str], None]) -> int:
    """Build, listen, tell `ready` the URL, serve until a signal; the exit code."""
    check(settings, web)
    check_source(settings)
    prepare_process(settings, stderr=True, secrets=web.secrets())
    _share_handlers("wsgidav", "cheroot")
    server = wsgi.Server(
        (web.host, web.port),
        None,  # the app once the layers are built: binding first finds a taken port first
        numthreads=settings.network_threads,
        server_name=f"dcorfs/{__version__}",
    )
    try:
        server.prepare()  # binds: port 0 is now the port given
    except OSError as exc:
        raise ConfigError(f"cannot listen on {web.host}:{web.port}: {exc.strerror}") from None
    host, port = server.bind_addr[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    try:
        front = build_front(settings, where=f"webdav {url}")
    except DcorfsError as exc:
        server.stop()
        log.error("cannot start: %s", exc)
        raise
    collector = CycleCollector()  # h5py in many threads: see its design note
    stopping = threading.Event()
    try:
        provider = TreeProvider(
            front.root,
            timeout=settings.timeout,
            prefetcher=front.prefetcher,
            activity=front.activity,
        )
        server.wsgi_app = WsgiDAVApp(app_config(provider, web))
        collector.start()
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, lambda *_: stopping.set())
        serving = threading.Thread(target=server.serve, name="webdav", daemon=True)
        serving.start()
        log.info("dcorfs %s: %s served read-only at %s", __version__, settings.source, url)
        ready(url)
        _keep_informed(Notifier.from_environment(), front, url, settings.metrics_file, stopping)
        log.info("stopping the WebDAV share at %s", url)
        server.stop()
        serving.join(timeout=10)
    finally:
        collector.stop()
        front.close()
    return 0


def _share_handlers(*names: str) -> None:
    """The WebDAV server's own loggers write where dcorfs's do (errors only: its warnings
    at start are about its own settings, which `check` has made; the redacting filter is on
    each handler). But for the refusals of writes: the share is read-only, and WsgiDAV
    answers PUT, DELETE, MKCOL … with 405 and logs each as an ERROR "Invalid HTTP method"
    (Finder and Explorer try to write at every step): a client's attempt, not a failure."""
    handlers = logging.getLogger("dcorfs").handlers
    for name in names:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.propagate = False
        for handler in handlers:
            logger.addHandler(handler)
    requests = logging.getLogger("wsgidav.request_server")
    if not any(isinstance(f, _Refusals) for f in requests.filters):
        requests.addFilter(_Refusals())


class _Refusals(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Invalid HTTP method")


def _keep_informed(
    notifier: Notifier, front: Front, url: str, metrics: Path | None, stopping: threading.Event
) -> None:
    """READY=1 to systemd, then STATUS= lines (and the metrics file) every few seconds, until
    `stopping` is set."""
    notifier.send("READY=1", f"STATUS=serving at {url}")
    period = min(STATUS_PERIOD, METRICS_PERIOD)
    while True:
        if metrics is not None:
            write_metrics(metrics, front.report)
        if stopping.wait(period):
            break
        notifier.send(f"STATUS={one_line(front.report())}")
    notifier.send("STOPPING=1", "STATUS=stopping")


def main(settings: MountSettings, web: WebDavSettings) -> int:
    """For the command line: prints the URL on stdout once serving (a line to wait for)."""

    def ready(url: str) -> None:
        print(f"dcorfs webdav: serving {url}", flush=True)
        if not is_loopback(web.host):
            print(
                "dcorfs webdav: plain HTTP beyond this machine: put a TLS reverse proxy in front",
                file=sys.stderr,
                flush=True,
            )

    return serve(settings, web, ready=ready)
