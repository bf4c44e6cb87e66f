"""`dcorfs umount`: fusermount3 -u, and lazily (-z) when the daemon is gone or the mount busy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..daemon.tuning import device_of


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


def is_mounted(mountpoint: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    """Whether something is mounted at `mountpoint` (by its absolute or its resolved path),
    as the kernel's mount table says: stat would hang on, or fail at, a stale FUSE mount;
    True when the table cannot be read (then fusermount is left to tell)."""
    try:
        table = mountinfo.read_text()
    except OSError:
        return True
    paths = {mountpoint, Path(os.path.realpath(mountpoint))}
    return any(device_of(path, table) is not None for path in paths)


def unmount(mountpoint: Path) -> int:
    if not is_mounted(mountpoint):
        print(f"dcorfs: {mountpoint} is not mounted", file=sys.stderr)
        return 1
    first = _fusermount("-u", str(mountpoint))
    if first.returncode == 0:
        return 0
    reason = first.stderr.strip().splitlines()[-1] if first.stderr.strip() else "failed"
    if "not mounted" in reason or "not found in" in reason:
        print(f"dcorfs: {mountpoint} is not mounted", file=sys.stderr)
        return 1
    lazy = _fusermount("-u", "-z", str(mountpoint))
    if lazy.returncode == 0:
        print(f"dcorfs: {mountpoint} unmounted lazily ({reason})", file=sys.stderr)
        return 0
    print(f"dcorfs: cannot unmount {mountpoint}: {reason}", file=sys.stderr)
    return 1
