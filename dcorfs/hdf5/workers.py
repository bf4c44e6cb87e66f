"""HDF5 work on bytes in memory, in processes of their own (doc/ARCHITECTURE.md, "Speed"
and "Memory").

h5py runs every call under one global lock, and the daemon's Python under one GIL: listing a
dataset of many small resources spent 70% of the time the GIL was held reading their files'
structure and writing their synthesized files' skeletons, on one core. That work needs
nothing of the mount's state when the file is in memory (a small file fetched whole) or is
being written (a skeleton): its input and its result are plain values. `HDF5Workers.run`
hands such a call to a pool of worker processes, so it runs beside the daemon on the other
cores. They are forked from a server process (multiprocessing's forkserver: a fresh
interpreter, not a fork of the daemon's threads, that imported what the calls run once),
started with the mount; they start with work side by side, and stop when idle (see
`HDF5Workers`).

A call's exceptions come back as they were raised (dcorfs' errors are plain values too); its
log records (at the level the daemon logs) are emitted in the daemon, as if the daemon had
made them. A worker that dies (libhdf5 crashing on a damaged file) fails the calls it was
running with a `ProtocolError`; later calls run in the daemon until new ones are started,
so one bad file never ends the mount. `HDF5Workers(0)` runs every call in the calling
thread instead (unit tests, and `--hdf5-workers 0`).
"""

from __future__ import annotations

import concurrent.futures
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from ..errors import DeadlineExceeded, ProtocolError, TransientError

T = TypeVar("T")
log = logging.getLogger(__name__)
IDLE = 60.0  # seconds without a call after which the processes are stopped
SERVER_ERRORS = (OSError, EOFError)  # what starting the forkserver or forking from it raises


class HDF5Workers:
    """`processes` worker processes for HDF5 work on in-memory bytes (0: none, every call
    runs in the caller's thread). They are forked from one server process (the forkserver,
    a fresh interpreter started by `serve`: the mount, which waits until it can fork,
    `served`) that imported `preload` (the modules of the functions they run, with h5py and
    NumPy: ~0.3 CPU-s) once, so each is ready in ~10 ms and shares the server's pages. They
    are started when there is HDF5 work side by side (a call comes while another runs: a
    listed dataset's resources opened together), or by `start`, not for a reader's one
    resource (a call alone runs in the caller's thread: sending a condensed file of a few MB
    to a worker and back costs more than the work); until they are ready calls run in the
    calling thread (never waiting for their start). Stopped once no call came for `idle`
    seconds (their memory is the daemon's: ~30 MB each, mostly shared with the server, which
    stays: see `stats`)."""

    def __init__(
        self,
        processes: int,
        preload: Sequence[str] = ("dcorfs.hdf5.rtdc",),
        *,
        idle: float = IDLE,
    ) -> None:
        self.processes = processes
        self._preload = tuple(preload)
        self._context = _forkserver(self._preload) if processes > 0 else None
        self._idle = idle
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._warming: list[concurrent.futures.Future[int]] = []  # the pool's first calls
        self._closed = threading.Event()
        self._running = 0  # calls under way
        self._last = time.monotonic()  # when the last call ended
        self._watch: threading.Thread | None = None
        self.calls = 0
        self.crashes = 0
        self.started = 0  # pools started (again after being idle, or after a crash)
        self._retry_at = 0.0  # no pool started before then (the last start failed)

    def serve(self) -> None:
        """Start the server the workers are forked from, in the background (it imports what
        they run: ~0.3 CPU-s, once); see `served`. A server that cannot start is logged:
        calls then run in the daemon."""
        if self.processes > 0:
            try:
                multiprocessing.forkserver.ensure_running()  # (with `_context`'s preload)
            except SERVER_ERRORS as exc:
                log.warning("HDF5 workers' server not started (%s): HDF5 work in the daemon", exc)

    def served(self, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) until the server can fork workers, its imports
        done (a process that does nothing is forked, in a thread of its own, and joined);
        whether it can."""
        if self._context is None:
            return False
        process = self._context.Process(target=_nothing, daemon=True)
        forked: list[bool] = []

        def fork() -> None:
            try:
                process.start()  # (blocks until the server has imported what it preloads)
            except SERVER_ERRORS as exc:
                log.warning("HDF5 workers' server cannot fork (%s): HDF5 work in the daemon", exc)
                return
            process.join()
            forked.append(process.exitcode == 0)

        thread = threading.Thread(target=fork, name="hdf5-served", daemon=True)
        thread.start()
        thread.join(timeout)
        return forked == [True]

    def start(self) -> None:
        """Start the processes now, in the background (calls run here until they are
        ready)."""
        if self.processes > 0:
            with self._lock:
                self._ready_pool(start=True)

    def ready(self, timeout: float) -> bool:
        """Wait until the processes started are ready (at most `timeout` seconds); whether
        they are."""
        with self._lock:
            warming = list(self._warming) if self._pool is not None else []
        done, _ = concurrent.futures.wait(warming, timeout=timeout)
        return bool(warming) and len(done) == len(warming)

    def run(self, fn: Callable[..., T], *args: Any, deadline: float) -> T:
        """`fn(*args)` in a worker (blocking until `deadline`). `fn` and its arguments and
        result are pickled: module-level functions and plain values only."""
        if self.processes <= 0:
            self.calls += 1
            return fn(*args)
        level = logging.getLogger("dcorfs").getEffectiveLevel()
        with self._lock:
            self.calls += 1
            self._running += 1
            pool = self._ready_pool(start=self._running > 1)
        try:
            if pool is None:  # not started, or starting: here
                return fn(*args)
            try:
                future = pool.submit(_traced, level, fn, args)
            except BrokenProcessPool:  # (it died between two calls: here, new ones start)
                self._broken(pool)
                return fn(*args)
            try:
                result, records = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise DeadlineExceeded("timed out waiting for an HDF5 worker") from None
            except BrokenProcessPool:
                self._broken(pool)
                raise ProtocolError("an HDF5 worker process died reading this file") from None
        finally:
            with self._lock:
                self._running -= 1
                self._last = time.monotonic()
        for record in records:
            logging.getLogger(record.name).handle(record)
        return result

    def pids(self) -> list[int]:
        """The running worker processes' ids."""
        processes = getattr(self._pool, "_processes", None) or {}
        return sorted(int(pid) for pid in processes)

    def stats(self) -> dict[str, Any]:
        """For status.json: processes (at most), running ones and their resident memory,
        calls, pools started, crashes."""
        running = self.pids()
        server = _server_pid()
        return {
            "processes": self.processes,
            "running": len(running),
            "rss_bytes": sum(_rss(pid) for pid in running),
            "server_rss_bytes": _rss(server) if server is not None else 0,
            "calls": self.calls,
            "started": self.started,
            "crashes": self.crashes,
        }

    def _ready_pool(self, *, start: bool) -> concurrent.futures.ProcessPoolExecutor | None:
        """The pool if its processes are ready, else None; `start`: start it if there is
        none. Call with the lock held."""
        if self._closed.is_set():
            raise TransientError("the mount is closing")
        if self._pool is None:
            if not start:
                return None
            if time.monotonic() < self._retry_at:
                return None
            pool = concurrent.futures.ProcessPoolExecutor(
                self.processes,
                mp_context=self._context,
                initializer=_preload,
                initargs=(self._preload,),
            )
            try:
                self._warming = [pool.submit(os.getpid) for _ in range(self.processes)]
            except (*SERVER_ERRORS, BrokenProcessPool) as exc:  # (the server is gone)
                log.warning("HDF5 workers not started (%s): HDF5 work in the daemon", exc)
                pool.shutdown(wait=False, cancel_futures=True)
                self._retry_at = time.monotonic() + self._idle
                return None
            self._pool = pool
            self.started += 1
            self._last = time.monotonic()
            if self._watch is None:
                self._watch = threading.Thread(
                    target=self._stop_when_idle, name="hdf5-idle", daemon=True
                )
                self._watch.start()
        if all(future.done() for future in self._warming):
            return self._pool
        return None

    def _stop_when_idle(self) -> None:
        while not self._closed.wait(min(5.0, self._idle / 2)):
            with self._lock:
                pool = self._pool
                idle = time.monotonic() - self._last >= self._idle and not self._running
                if pool is None or not idle:
                    continue
                self._pool = None
            log.debug("HDF5 workers idle for %.0f s: stopped", self._idle)
            pool.shutdown(wait=True)

    def _broken(self, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self.crashes += 1
                log.warning("an HDF5 worker process died; starting new ones")
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop the processes (calls under way fail)."""
        with self._lock:
            self._closed.set()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


INLINE = HDF5Workers(0)


def _rss(pid: int) -> int:
    """Resident bytes of a process (0 once it is gone)."""
    try:
        statm = Path(f"/proc/{pid}/statm").read_text()
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _forkserver(preload: tuple[str, ...]) -> multiprocessing.context.ForkServerContext:
    """The context whose processes are forked from multiprocessing's forkserver (one per
    daemon, started at its first use, ended with the daemon), which imports `preload` (those
    of the first pool started) before it forks any."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *preload])
    return context


def _nothing() -> None:
    """What `served` has a forked process do."""


def _server_pid() -> int | None:
    """The forkserver's process id, if it was started."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    return pid if isinstance(pid, int) else None


def _preload(modules: tuple[str, ...]) -> None:
    """In a new worker: end it when the daemon ends, however it ends (its pool's shutdown is
    not waited for: `os._exit` or SIGKILL would leave the worker waiting for calls, and with
    it the server it was forked from); import what its calls run (before the first call)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_end_with, args=(parent,), name="parent", daemon=True).start()
    for name in modules:
        importlib.import_module(name)


def _end_with(parent: multiprocessing.process.BaseProcess) -> None:
    """Wait until the process that started this one has ended, then end this one."""
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(0)


def _traced(level: int, fn: Callable[..., T], args: tuple[Any, ...]) -> tuple[T, list[Any]]:
    """In a worker: `fn(*args)` and the log records it made at `level` or above, made
    picklable (their message formatted, their traceback as text)."""
    records: list[logging.LogRecord] = []
    handler = _Keep(records)
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(level)
    try:
        return fn(*args), records
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self._records = records

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args, record.exc_info = record.getMessage(), None, None
        self._records.append(record)
