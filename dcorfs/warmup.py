"""`dcorfs warmup PATH...`: read files or trees of a mount once, so that their bytes are in the
persistent cache (before going offline or starting a long job).

Reads go through the mount like any reader's, several files at a time. Each finished file is
recorded in a journal in the mount's cache dir (host, path, size), so an interrupted warm-up
resumes where it stopped; `--again` ignores the journal. Ctrl-C stops at the next chunk and
keeps the journal. Nothing is written to the mount.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from .errors import ConfigError
from .report import size
from .status import read_status

JOURNAL = "warmup.journal"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Mount:
    root: Path
    host: str
    cache_dir: Path
    cache_limit: int


@dataclass(frozen=True)
class Item:
    path: Path
    relative: str  # to the mount's root: the journal's key with the host
    size: int


def find_mount(path: Path) -> Mount:
    """The dcorfs mount `path` lies in (from its status report)."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    root = path.absolute()
    while not os.path.ismount(root) and root != root.parent:
        root = root.parent
    try:
        status = read_status(root)
    except ConfigError:
        raise ConfigError(f"{path} is not inside a dcorfs mount") from None
    return Mount(
        root=root,
        host=str(status.get("host", "")),
        cache_dir=Path(status.get("cache_dir", "")),
        cache_limit=int(status.get("cache", {}).get("disk_limit", 0)),
    )


def _files(path: Path) -> Iterator[Path]:
    if not path.is_dir():
        yield path
        return

    def complain(exc: OSError) -> None:
        print(f"dcorfs warmup: cannot list {exc.filename}: {exc.strerror}", file=sys.stderr)

    for top, dirs, files in os.walk(path, onerror=complain):
        dirs[:] = sorted(d for d in dirs if d != ".dcorfs")
        for name in sorted(files):
            yield Path(top) / name


def collect(mount: Mount, path: Path) -> Iterator[Item]:
    """Regular files at or below `path` (not `.dcorfs/`, not zero-sized views like status)."""
    for candidate in _files(path.absolute()):
        info = candidate.stat()
        if info.st_size > 0:
            yield Item(candidate, str(candidate.relative_to(mount.root)), info.st_size)


class Journal:
    """Files warmed before: one JSON line per finished file, appended as each finishes."""

    def __init__(self, path: Path, host: str) -> None:
        self._path = path
        self._host = host
        self._lock = threading.Lock()
        self.done: set[tuple[str, int]] = set()
        try:
            lines = path.read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
                if entry["host"] == host:
                    self.done.add((str(entry["path"]), int(entry["size"])))
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash: that file is simply warmed again

    def __contains__(self, item: Item) -> bool:
        return (item.relative, item.size) in self.done

    def record(self, item: Item) -> None:
        line = json.dumps({"host": self._host, "path": item.relative, "size": item.size})
        with self._lock:
            self.done.add((item.relative, item.size))
            try:
                fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, (line + "\n").encode())
                finally:
                    os.close(fd)
            except OSError:
                pass  # without a journal a later run re-reads (from the cache): still correct


class Reader:
    """Reads items in threads, reporting bytes to a progress bar; stops on `stop`."""

    def __init__(self, bar: tqdm[Any], journal: Journal) -> None:
        self.stop = threading.Event()
        self._bar = bar
        self._journal = journal
        self._lock = threading.Lock()
        self.failed: list[tuple[Item, str]] = []
        self.finished = 0
        self.nbytes = 0

    def read(self, item: Item) -> None:
        buffer = bytearray(CHUNK)
        try:
            fd = os.open(item.path, os.O_RDONLY)
        except OSError as exc:
            self._fail(item, exc)
            return
        total = 0
        try:
            while not self.stop.is_set():
                count = os.readv(fd, [buffer])
                if count == 0:
                    break
                total += count
                with self._lock:
                    self.nbytes += count
                    self._bar.update(count)
        except OSError as exc:
            self._fail(item, exc)
            return
        finally:
            os.close(fd)
        if not self.stop.is_set():
            self._journal.record(item)
            with self._lock:
                self.finished += 1
                self._bar.update(item.size - total)  # a file that was shorter than stat said

    def _fail(self, item: Item, exc: OSError) -> None:
        with self._lock:
            self.failed.append((item, exc.strerror or str(exc)))
            self._bar.write(f"dcorfs warmup: {item.path}: {exc.strerror or exc}", file=sys.stderr)


def warmup(
    paths: list[Path], *, dry_run: bool, again: bool, jobs: int, out: TextIO = sys.stdout
) -> int:
    mounts = {path: find_mount(path) for path in paths}
    mount = next(iter(mounts.values()))
    if any(m.root != mount.root for m in mounts.values()):
        raise ConfigError("all paths of one warm-up must lie in the same mount")
    print(f"dcorfs warmup: scanning {len(paths)} path(s) …", file=sys.stderr, flush=True)
    items = {item.relative: item for path in paths for item in collect(mount, path)}
    journal = Journal(mount.cache_dir / JOURNAL, mount.host)
    todo = [item for item in items.values() if again or item not in journal]
    total = sum(item.size for item in items.values())
    left = sum(item.size for item in todo)
    skipped = len(items) - len(todo)
    out.write(
        f"{len(items)} files, {size(total)}"
        + (f"; {skipped} warmed before (--again re-reads them)" if skipped else "")
        + f"; to read: {len(todo)} files, {size(left)}\n"
    )
    if mount.cache_limit and total > mount.cache_limit:
        out.write(
            f"warning: the cache holds {size(mount.cache_limit)}: not all of this stays "
            "cached (mount with a larger --cache-size)\n"
        )
    if dry_run or not todo:
        return 0
    bar = tqdm(
        total=left, unit="B", unit_scale=True, unit_divisor=1024, desc="warmup", disable=None
    )
    reader = Reader(bar, journal)
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="warmup")
    pending: set[Future[None]] = {pool.submit(reader.read, item) for item in todo}
    try:
        while pending:
            _, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
    except KeyboardInterrupt:
        reader.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        out.write(
            f"interrupted: {reader.finished} of {len(todo)} files done; "
            "run the same command again to go on\n"
        )
        return 130
    pool.shutdown()
    bar.close()
    out.write(f"warmed {reader.finished} files, {size(reader.nbytes)} read\n")
    if reader.failed:
        out.write(f"{len(reader.failed)} files failed (see above); run again to retry them\n")
        return 1
    return 0
