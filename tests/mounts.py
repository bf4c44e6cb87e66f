"""Real mounts for tests: run `dcorfs mount` as a user would, always unmount afterwards."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dcorfs.admin.unmount import is_mounted
from dcorfs.cache.cachedir import META
from dcorfs.cache.metastore import read_answers

FUSE_MISSING = (
    "/dev/fuse is missing"
    if not Path("/dev/fuse").exists()
    else "fusermount3 is not installed (apt install fuse3)"
    if shutil.which("fusermount3") is None
    else ""
)
needs_fuse = pytest.mark.skipif(bool(FUSE_MISSING), reason=FUSE_MISSING or "fuse ok")


def dcorfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dcorfs", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def daemon_pid(mnt: Path) -> int:
    return int(json.loads((mnt / ".dcorfs" / "status.json").read_text())["pid"])


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def drop_page_cache(fd: int) -> None:
    """Make the next read of this file reach the daemon (the mount keeps the page cache)."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def resident(path: Path) -> int:
    """Bytes of the file at `path` in the page cache now (util-linux's fincore: `mincore` of a
    mapping, which reads nothing)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def read_file(path: Path) -> bytes:
    """The whole file, from the daemon rather than the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_page_cache(fd)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def remembered_keys(cache: Path, prefix: str) -> list[str]:
    """The keys of the answers a mount with this cache directory has remembered that start
    with `prefix` (`cache.answers`: e.g. "rtdc-skeleton:"); none before the store exists."""
    try:
        return [key for key, _ in read_answers(cache / META, (prefix,))[1]]
    except sqlite3.OperationalError:  # not made yet
        return []


def eventually(check: Callable[[], bool], seconds: float = 60.0) -> bool:
    """Whether `check()` comes true within `seconds` (asked every half second): for what a
    mount does in the background."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if check():
            return True
        time.sleep(0.5)
    return check()


def steady(measure: Callable[[], object], seconds: float = 60.0) -> bool:
    """Whether `measure()` gives the same twice in a row, half a second apart, within `seconds`:
    for the background work a mount started (a description of an original, say) to have ended."""
    last: list[object] = [object()]

    def unchanged() -> bool:
        now = measure()
        same = now == last[0]
        last[0] = now
        return same

    return eventually(unchanged, seconds)


def log_lines(cache: Path, *needles: str) -> list[str]:
    text = (cache / "dcorfs.log").read_text(errors="replace")
    return [line for line in text.splitlines() if any(n in line for n in needles)]


def _wait_gone(pid: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError(f"the daemon {pid} did not exit after unmount")


def kill_and_unmount(process: subprocess.Popen[Any], mountpoint: Path) -> None:
    """After a test that ran dcorfs in the foreground: nothing left running or mounted."""
    if process.poll() is None:
        process.kill()
        process.wait()
    if is_mounted(mountpoint):  # also a dead one, which os.path.ismount does not see
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def unmount(mountpoint: Path, pid: int | None) -> None:
    result = dcorfs("umount", str(mountpoint))
    if result.returncode != 0 and is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    if pid is not None:
        _wait_gone(pid)


@contextmanager
def mounted(
    mountpoint: Path,
    host: str | None,
    cache_dir: Path,
    *extra: str,
    token: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Path]:
    """Mount (waits until ready), yield the mount point, unmount and wait for the daemon.
    `host` None: no --host (for --s3-only); `env`: more environment (S3 credentials), which
    is otherwise cleared of them."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    env = {
        "DCOR_API_KEY": token or "",
        "DCORFS_S3_ACCESS_KEY_ID": "",
        "DCORFS_S3_SECRET_ACCESS_KEY": "",
        "DCORFS_SHARED_CACHE_ACCESS_KEY_ID": "",
        "DCORFS_SHARED_CACHE_SECRET_ACCESS_KEY": "",
        **(env or {}),
    }
    result = dcorfs(
        "mount",
        str(mountpoint),
        *(["--host", host] if host is not None else []),
        "--cache-dir",
        str(cache_dir),
        "--log-level",
        "DEBUG",
        *extra,
        env=env,
    )
    if result.returncode != 0:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        raise AssertionError(f"mount failed ({result.returncode}): {result.stderr.strip()}")
    try:
        pid: int | None = daemon_pid(mountpoint)
    except (OSError, ValueError, KeyError):
        pid = None
    try:
        yield mountpoint
    finally:
        unmount(mountpoint, pid)
