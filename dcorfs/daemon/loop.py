"""The running daemon: build the layers, mount, answer FUSE requests on one trio thread, keep
systemd informed (READY, STATUS, WATCHDOG), and unmount on SIGTERM/SIGINT/SIGHUP
(`pyfuse3.close(unmount=True)` in any case).
"""

from __future__ import annotations

import faulthandler
import functools
import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from .. import __version__
from ..cache import cachedir
from ..errors import DcorfsError
from ..fs.fuse_ops import Operations
from ..hdf5.rtdc import CycleCollector
from ..settings import MountSettings
from .logs import configure
from .memory import limit_arenas
from .metrics import METRICS_PERIOD, write_metrics
from .notify import Notifier, watchdog_interval
from .report import one_line
from .tuning import tune
from .wiring import build

log = logging.getLogger(__name__)
STATUS_PERIOD = 10.0  # seconds between STATUS= lines to systemd


def run(settings: MountSettings, *, ready: Callable[[str], None]) -> int:
    """The daemon: build everything, mount, serve until unmounted or signalled."""
    prepare_process(settings, stderr=settings.foreground)
    notifier = Notifier.from_environment()
    try:
        ops, report, close = build(settings)
    except DcorfsError as exc:
        log.error("cannot start: %s", exc)
        ready(str(exc))
        return 1
    except Exception as exc:
        log.exception("cannot start")
        ready(f"cannot start: {exc}")
        return 1
    options = set(pyfuse3.default_options) | {
        f"fsname=dcorfs:{settings.source.split('://', 1)[1]}",
        "subtype=dcorfs",
        "ro",
    }
    if settings.allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, str(settings.mountpoint), options)
    except RuntimeError as exc:
        ready(f"cannot mount {settings.mountpoint}: {exc}")
        close()
        return 1
    log.info("dcorfs %s: %s mounted at %s", __version__, settings.source, settings.mountpoint)
    ready("ok")
    collector = CycleCollector()  # h5py in many threads: see its design note
    collector.start()
    notifier.send("READY=1", f"STATUS=mounted {settings.source} at {settings.mountpoint}")
    try:
        trio.run(
            _serve, ops, notifier, report, functools.partial(_tune, settings), settings.metrics_file
        )
    finally:
        notifier.send("STOPPING=1", "STATUS=unmounting")
        collector.stop()
        ops.stop_pushing()  # (done already on a signal)
        pyfuse3.close(unmount=True)
        close()
        log.info("unmounted %s", settings.mountpoint)
    return 0


def prepare_process(settings: MountSettings, *, stderr: bool, secrets: Sequence[str] = ()) -> None:
    """What a daemon (a mount or a share) sets up before its threads start: logging (to the
    cache dir's log unless --log-file, every secret redacted), a traceback of all threads on
    SIGUSR1, and glibc's malloc arenas (`memory`)."""
    configure(
        level=settings.log_level,
        log_file=settings.log_file or settings.cache_dir / cachedir.LOG,
        stderr=stderr,
        secrets=[*settings.secrets(), *secrets],
    )
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if limit_arenas(settings.malloc_arenas):
        log.debug("at most %d malloc arenas", settings.malloc_arenas)


async def _serve(
    ops: Operations,
    notifier: Notifier,
    report: Callable[[], dict[str, Any]],
    after_init: Callable[[], None],
    metrics_file: Path | None,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, ops.stop_pushing)
        nursery.start_soon(_after_init, ops, after_init)
        if metrics_file is not None:
            nursery.start_soon(_keep_metrics, metrics_file, report)
        if notifier.active:
            nursery.start_soon(_keep_systemd_informed, notifier, report, watchdog_interval())
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _keep_metrics(path: Path, report: Callable[[], dict[str, Any]]) -> None:
    """Rewrite `--metrics-file` every METRICS_PERIOD seconds (from the first moment on)."""
    while True:
        await trio.to_thread.run_sync(write_metrics, path, report)
        await trio.sleep(METRICS_PERIOD)


async def _after_init(ops: Operations, action: Callable[[], None]) -> None:
    await ops.initialized.wait()
    action()


def _tune(settings: MountSettings) -> None:
    """After INIT: the kernel sets the read-ahead from INIT's answer, so tuning comes later."""
    if settings.kernel_tuning and os.geteuid() == 0:
        tune(
            settings.mountpoint,
            read_ahead_kb=settings.read_ahead_kb,
            max_background=settings.max_background,
        )


async def _signals(stop_pushing: Callable[[], None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
        async for number in received:
            log.info("received %s: unmounting", signal.Signals(number).name)
            await trio.to_thread.run_sync(stop_pushing)  # while this loop still answers
            pyfuse3.terminate()
            return


async def _keep_systemd_informed(
    notifier: Notifier, report: Callable[[], dict[str, Any]], watchdog: float | None
) -> None:
    """STATUS= every few seconds; WATCHDOG=1 from the event loop itself, so that a blocked
    loop (the mount answering nothing) lets systemd's WatchdogSec= restart the service."""
    period = min(STATUS_PERIOD, watchdog) if watchdog else STATUS_PERIOD
    last_status = 0.0
    while True:
        fields = ["WATCHDOG=1"] if watchdog else []
        if trio.current_time() - last_status >= STATUS_PERIOD:
            last_status = trio.current_time()
            fields.append(f"STATUS={one_line(await trio.to_thread.run_sync(report))}")
        notifier.send(*fields)
        await trio.sleep(period)
