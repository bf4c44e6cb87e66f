"""Root-only kernel settings of one mount: read-ahead size and background requests.

The kernel caps buffered FUSE reads at its read-ahead size (128 KiB by default) and keeps at
most `max_background` (12) read-ahead requests in flight. Raising both after mounting lets a
sequential reader's pages arrive in fewer, larger, more parallel requests (fewer trips through
Python per MiB). Not raised too far: a page fault of an mmap reader also reads around the
faulting page by up to the read-ahead size. Opt-in (`--kernel-tuning`): 1 MiB kernel reads
cut the daemon's CPU time of re-reading from the disk cache by a quarter, left cold sequential
reads unchanged within noise, and made mmap readers of random events decode 3.5× the bytes
(README, Speed). The settings belong to the mount's own device (bdi) and go with it at
unmount. Without
root, or where the sysfs files are missing (no fusectl mounted), nothing changes and the log
says why. The mount is found in /proc/self/mountinfo: the daemon
must never stat its own mount point (it would wait for itself).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda match: chr(int(match[1], 8)), field)


def device_of(mountpoint: Path, mountinfo: str) -> str | None:
    """'major:minor' of the (last) mount at `mountpoint` in a mountinfo text."""
    found = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) == str(mountpoint):
            found = fields[2]
    return found


def _set(path: Path, value: int) -> str:
    old = path.read_text().strip()
    if int(old) < value:
        path.write_text(f"{value}\n")
        return f"{path.name} {old} → {value}"
    return f"{path.name} {old} (kept)"


def tune(
    mountpoint: Path,
    *,
    read_ahead_kb: int,
    max_background: int,
    sysfs: Path = Path("/sys"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
) -> list[str]:
    """Raise the settings (never lower them); returns what was done, for the log."""
    try:
        device = device_of(mountpoint, mountinfo.read_text())
    except OSError as exc:
        log.info("kernel tuning skipped: %s", exc)
        return []
    if device is None:
        log.info("kernel tuning skipped: %s not in mountinfo", mountpoint)
        return []
    minor = device.split(":")[1]
    settings = [
        (sysfs / "class" / "bdi" / device / "read_ahead_kb", read_ahead_kb),
        (sysfs / "fs" / "fuse" / "connections" / minor / "max_background", max_background),
        (
            sysfs / "fs" / "fuse" / "connections" / minor / "congestion_threshold",
            max_background * 3 // 4,
        ),
    ]
    done = []
    for path, value in settings:
        try:
            done.append(_set(path, value))
        except (OSError, ValueError) as exc:
            log.info("kernel tuning: %s unchanged (%s)", path, exc)
    if done:
        log.info("kernel tuning of %s: %s", mountpoint, ", ".join(done))
    return done
