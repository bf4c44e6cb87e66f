"""Human-readable views of a mount's status report (`.dcorfs/status.json`): for `dcorfs status`
and systemd's STATUS= line. Pure functions of the report's dict; no I/O."""

from __future__ import annotations

import time
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def size(nbytes: float) -> str:
    """1536 → '1.5 KiB' (binary units, as --cache-size takes them)."""
    value = float(nbytes)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def counted(number: int, noun: str) -> str:
    """(1, 'file') → '1 file'; (3, 'file') → '3 files'."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def duration(seconds: float) -> str:
    """3725 → '1h 2m'; 42 → '42s'."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def hit_ratio(cache: dict[str, Any]) -> float | None:
    """Share of block reads served without the network; None before the first read."""
    hits = int(cache.get("memory_hits", 0)) + int(cache.get("disk_hits", 0))
    total = hits + int(cache.get("misses", 0))
    return hits / total if total else None


def _percent(ratio: float | None) -> str:
    return "–" if ratio is None else f"{100 * ratio:.1f} %"


def one_line(report: dict[str, Any]) -> str:
    """For systemd's STATUS=: what `systemctl status` shows next to the unit."""
    cache = report.get("cache", {})
    return (
        f"cache {size(cache.get('disk_bytes', 0))} of {size(cache.get('disk_limit', 0))}, "
        f"hits {_percent(hit_ratio(cache))}, fetched {size(cache.get('fetched_bytes', 0))}, "
        f"{cache.get('in_flight', 0)} in flight, "
        f"{report.get('fuse', {}).get('errors', 0)} errors"
    )


def summary(report: dict[str, Any], now: float | None = None) -> str:
    """The whole report as aligned lines, for people."""
    now = time.time() if now is None else now
    cache = report.get("cache", {})
    fuse = report.get("fuse", {})
    prefetch = report.get("prefetch", {})
    errors = report.get("recent_errors", [])
    started = float(report.get("started", now))
    rows = [
        ("mounted", f"{report.get('host', '?')} at {report.get('mountpoint', '?')}"),
        (
            "daemon",
            f"dcorfs {report.get('version', '?')}, pid {report.get('pid', '?')}, "
            f"up {duration(now - started)}",
        ),
        (
            "cache",
            f"{size(cache.get('disk_bytes', 0))} of {size(cache.get('disk_limit', 0))} "
            f"in {report.get('cache_dir', '?')} "
            f"(+ {size(cache.get('memory_bytes', 0))} in memory)",
        ),
        (
            "hit ratio",
            f"{_percent(hit_ratio(cache))} of block reads "
            f"({cache.get('memory_hits', 0)} memory, {cache.get('disk_hits', 0)} disk, "
            f"{cache.get('misses', 0)} network)",
        ),
        (
            "network",
            f"fetched {size(cache.get('fetched_bytes', 0))} in "
            f"{cache.get('fetches', 0)} requests; "
            f"served {size(cache.get('served_bytes', 0))} from the cache layer",
        ),
        (
            "in flight",
            f"{cache.get('in_flight', 0)} transfers; read-ahead "
            f"{size(prefetch.get('memory_bytes', 0))} of {size(prefetch.get('memory_limit', 0))}",
        ),
        (
            "readers",
            f"{fuse.get('opens', 0)} opens, "
            f"{fuse.get('reads_inline', 0) + fuse.get('reads_waited', 0)} reads "
            f"({fuse.get('reads_waited', 0)} waited for the network or disk), "
            f"{size(fuse.get('bytes_served', 0))} read"
            + (f", {size(pushed)} pushed ahead" if (pushed := fuse.get("pushed_bytes", 0)) else ""),
        ),
        (
            "errors",
            f"{fuse.get('errors', 0)} since mounting, {cache.get('errors', 0)} in the cache",
        ),
    ]
    shared = report.get("shared")
    if shared:
        mode = ", read-only" if shared.get("readonly") else ""
        mode += ", private datasets too" if shared.get("private") else ""
        rows.append(
            (
                "shared",
                f"{shared.get('url', '?')} at {shared.get('endpoint', '?')}{mode}"
                f"{'' if shared.get('up', True) else ' (unreachable: reads go to DCOR)'}; "
                f"{shared.get('hits', 0)} hits, {shared.get('misses', 0)} misses, "
                f"{shared.get('uploads', 0)} uploads ({shared.get('pending', 0)} queued), "
                f"{shared.get('errors', 0)} errors, {shared.get('corrupt', 0)} corrupt; "
                f"{size(shared.get('hit_bytes', 0))} from the tier, "
                f"{size(shared.get('dcor_bytes', 0))} from DCOR",
            )
        )
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {text}" for label, text in rows]
    if errors:
        lines.append("recent errors:")
        for error in errors[-5:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(float(error.get("time", 0))))
            lines.append(f"  {stamp}  {error.get('operation', '?')}: {error.get('error', '?')}")
    return "\n".join(lines)
