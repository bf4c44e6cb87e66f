"""`dcorfs warmup PATH...`: read files or trees of a mount once, so that their bytes are in the
persistent cache (before going offline or starting a long job).

Reads go through the mount like any reader's, several files at a time. Each finished file is
recorded in a journal in the mount's cache dir (host, path, size), so an interrupted or failed
warm-up resumes where it stopped; a warm-up that completes removes its files from the journal
(the cache may evict them later, so the next run reads them again, from the cache where they
still are). `--again` ignores the journal. Ctrl-C stops at once (reader threads blocked in the
mount are abandoned) and keeps the journal. Nothing is written to the mount.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from ..cache import cachedir
from ..daemon.report import counted, size
from ..errors import ConfigError
from .status import read_status

CHUNK = 1 << 20


@dataclass(frozen=True)
class Mount:
    root: Path
    host: str
    cache_dir: Path
    cache_limit: int | None  # bytes (None: not said); 0: no disk cache (`--cache-size 0`)


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
        cache_limit=_limit(status.get("cache", {}).get("disk_limit")),
    )


def _limit(value: Any) -> int | None:
    return None if value is None else int(value)


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
        try:
            info = candidate.stat()
        except OSError as exc:
            print(f"dcorfs warmup: {candidate}: {exc.strerror}", file=sys.stderr)
            continue
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

    def forget(self, items: list[Item]) -> None:
        """A run completed: its files leave the journal (other hosts' and paths' entries stay)."""
        gone = {(item.relative, item.size) for item in items}
        with self._lock:
            try:
                lines = self._path.read_text().splitlines()
            except OSError:
                return
            kept = []
            for line in lines:
                try:
                    entry = json.loads(line)
                    if entry["host"] == self._host and (entry["path"], entry["size"]) in gone:
                        continue
                except (ValueError, KeyError, TypeError):
                    continue
                kept.append(line + "\n")
            temp = self._path.with_name(self._path.name + ".tmp")
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.writelines(kept)
                temp.replace(self._path)
            except OSError:
                temp.unlink(missing_ok=True)
            self.done -= gone

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
    """Reads items in daemon threads, reporting bytes to a progress bar; stops on `stop`."""

    def __init__(self, bar: tqdm[Any], journal: Journal, items: list[Item], jobs: int) -> None:
        self.stop = threading.Event()
        self._bar = bar
        self._journal = journal
        self._lock = threading.Lock()
        self._todo: queue.SimpleQueue[Item] = queue.SimpleQueue()
        for item in items:
            self._todo.put(item)
        self.failed: list[tuple[Item, str]] = []
        self.finished = 0
        self.nbytes = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"warmup-{n}", daemon=True)
            for n in range(jobs)
        ]
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; whether all readers are done."""
        for thread in self._threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in self._threads)

    def _work(self) -> None:
        while not self.stop.is_set():
            try:
                item = self._todo.get_nowait()
            except queue.Empty:
                return
            try:
                self._read(item)
            except Exception as exc:  # a bug must not pass as a warmed file
                self._fail(item, repr(exc))

    def _read(self, item: Item) -> None:
        buffer = bytearray(CHUNK)
        try:
            fd = os.open(item.path, os.O_RDONLY)
        except OSError as exc:
            self._fail(item, exc.strerror or str(exc))
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
            self._fail(item, exc.strerror or str(exc))
            return
        finally:
            os.close(fd)
        if not self.stop.is_set():
            self._journal.record(item)
            with self._lock:
                self.finished += 1
                self._bar.update(item.size - total)  # a file that was shorter than stat said

    def _fail(self, item: Item, reason: str) -> None:
        with self._lock:
            self.failed.append((item, reason))
            self._bar.write(f"dcorfs warmup: {item.path}: {reason}", file=sys.stderr)


def warmup(
    paths: list[Path], *, dry_run: bool, again: bool, jobs: int, out: TextIO = sys.stdout
) -> int:
    mounts = {path: find_mount(path) for path in paths}
    mount = next(iter(mounts.values()))
    if any(m.root != mount.root for m in mounts.values()):
        raise ConfigError("all paths of one warm-up must lie in the same mount")
    print(f"dcorfs warmup: scanning {len(paths)} path(s) …", file=sys.stderr, flush=True)
    items = {item.relative: item for path in paths for item in collect(mount, path)}
    journal = Journal(mount.cache_dir / cachedir.JOURNAL, mount.host)
    todo = [item for item in items.values() if again or item not in journal]
    total = sum(item.size for item in items.values())
    left = sum(item.size for item in todo)
    skipped = len(items) - len(todo)
    out.write(
        f"{counted(len(items), 'file')}, {size(total)}"
        + (f"; {skipped} done by an interrupted run (--again re-reads them)" if skipped else "")
        + f"; to read: {counted(len(todo), 'file')}, {size(left)}\n"
    )
    if mount.cache_limit is not None and total > mount.cache_limit:
        out.write(
            f"warning: the cache holds {size(mount.cache_limit)}: not all of this stays "
            "cached (mount with a larger --cache-size)\n"
        )
    if dry_run:
        return 0
    bar = tqdm(
        total=left, unit="B", unit_scale=True, unit_divisor=1024, desc="warmup", disable=None
    )
    reader = Reader(bar, journal, todo, jobs)
    try:
        while not reader.join(timeout=0.5):
            pass
    except KeyboardInterrupt:
        reader.stop.set()
        bar.close()
        out.write(
            f"interrupted: {reader.finished} of {len(todo)} files done; "
            "run the same command again to go on\n"
        )
        return 130
    bar.close()
    out.write(f"warmed {counted(reader.finished, 'file')}, {size(reader.nbytes)} read\n")
    if reader.failed:
        failed = counted(len(reader.failed), "file")
        out.write(f"{failed} failed (see above); run again to retry them\n")
        return 1
    journal.forget(list(items.values()))
    return 0
