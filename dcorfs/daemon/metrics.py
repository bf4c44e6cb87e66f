"""A mount's (or share's) status report as OpenMetrics text, for Prometheus: `dcorfs status
MOUNT --openmetrics`, and the file `--metrics-file` that the daemon rewrites every
`METRICS_PERIOD` seconds for node_exporter's textfile collector. A pure function of the report
(`.dcorfs/status.json`), no I/O but `write_metrics`.

Families (all `dcorfs_`): bytes fetched by source (DCOR, the shared cache tier) and served,
block reads by tier (memory, disk, network) for remote blocks and decoded values, fetches,
errors, fetches in flight, cache and memory use against their limits, read-ahead, requests by
kind, the shared tier's pieces by outcome, and the read latency histogram
(`fs.activity.LATENCY_BUCKETS`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
METRICS_PERIOD = 15.0  # seconds between rewrites of --metrics-file
TIERS = (("memory", "memory_hits"), ("disk", "disk_hits"), ("network", "misses"))


def _label(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _samples(
    name: str,
    kind: str,
    help_text: str,
    samples: list[tuple[dict[str, object], float]],
    *,
    text: bool = False,
) -> Iterator[str]:
    """One family. `text`: Prometheus' text format (counters named by their samples, as
    node_exporter's textfile collector reads them), else OpenMetrics."""
    suffix = "_total" if kind == "counter" else ""
    family = f"dcorfs_{name}{suffix if text else ''}"
    yield f"# TYPE {family} {kind}"
    yield f"# HELP {family} {help_text}"
    for labels, value in samples:
        labelled = ",".join(f"{key}={_label(val)}" for key, val in labels.items())
        yield (
            f"dcorfs_{name}{suffix}{{{labelled}}} {value}"
            if labelled
            else (f"dcorfs_{name}{suffix} {value}")
        )


def _histogram(histogram: dict[str, Any]) -> Iterator[str]:
    yield "# TYPE dcorfs_read_seconds histogram"
    yield "# HELP dcorfs_read_seconds How long reads took to answer (FUSE reads, GET reads)."
    bounds = list(histogram.get("buckets", []))
    counts = list(histogram.get("counts", [0] * (len(bounds) + 1)))
    cumulative = 0
    for bound, count in zip([*bounds, "+Inf"], counts, strict=True):
        cumulative += int(count)
        yield f'dcorfs_read_seconds_bucket{{le="{bound}"}} {cumulative}'
    yield f"dcorfs_read_seconds_count {cumulative}"
    yield f"dcorfs_read_seconds_sum {float(histogram.get('sum', 0.0))}"


def openmetrics(report: dict[str, Any], *, text: bool = False) -> str:
    """The report as OpenMetrics text (ends with `# EOF`); `text`: in Prometheus' text
    format instead, as node_exporter's textfile collector reads it (no info type, no EOF)."""
    family = functools.partial(_samples, text=text)
    info = (
        f"version={_label(report.get('version', '?'))},host={_label(report.get('host', '?'))},"
        f"mountpoint={_label(report.get('mountpoint', '?'))}"
    )
    cache, decoded = report.get("cache", {}), report.get("decoded", {})
    front, prefetch = report.get("fuse", {}), report.get("prefetch", {})
    memory = report.get("memory", {})
    caches = (("remote", cache), ("decoded", decoded))
    in_memory = int(cache.get("memory_bytes", 0)) + int(decoded.get("memory_bytes", 0))
    kind, sample = ("gauge", "dcorfs_info") if text else ("info", "dcorfs_info_info")
    lines: list[str] = [
        f"# TYPE dcorfs_info {kind}",
        "# HELP dcorfs_info What serves: version, host, where.",
        f"{sample}{{{info}}} 1",
    ]
    shared = report.get("shared") or {}
    lines += family(
        "fetched_bytes",
        "counter",
        "Bytes fetched, by source (dcor: DCOR's server or object store; shared: the shared "
        "cache tier).",
        [
            ({"source": "dcor"}, int(shared.get("dcor_bytes", cache.get("fetched_bytes", 0)))),
            ({"source": "shared"}, int(shared.get("hit_bytes", 0))),
        ],
    )
    lines += family(
        "served_bytes",
        "counter",
        "Bytes answered to readers.",
        [({}, int(front.get("bytes_served", 0)))],
    )
    lines += family(
        "pushed_bytes",
        "counter",
        "Bytes of read-ahead pushed into the kernel's page cache (read there without a request).",
        [({}, int(front.get("pushed_bytes", 0)))],
    )
    lines += family(
        "pushes",
        "counter",
        "Pushes of read-ahead into the kernel's page cache, by result (failed: the kernel "
        "took no more of that stream's, which it then reads through requests).",
        [
            ({"result": "pushed"}, int(front.get("pushes", 0))),
            ({"result": "failed"}, int(front.get("push_failures", 0))),
        ],
    )
    lines += family(
        "block_reads",
        "counter",
        "Block reads by tier: memory, disk (hits) or network (misses; decoded: made).",
        [
            ({"cache": name, "tier": tier}, int(stats.get(key, 0)))
            for name, stats in caches
            for tier, key in (
                ("memory", "memory_hits"),
                ("disk", "disk_hits"),
                ("network", "misses"),
            )
        ],
    )
    lines += family(
        "fetches",
        "counter",
        "Range requests (remote) or decodes (decoded) made.",
        [({"cache": name}, int(stats.get("fetches", 0))) for name, stats in caches],
    )
    lines += family(
        "errors",
        "counter",
        "Failed operations (readers got an error) and failed cache or network work.",
        [
            ({"where": "readers"}, int(front.get("errors", 0))),
            ({"where": "cache"}, int(cache.get("errors", 0)) + int(decoded.get("errors", 0))),
        ],
    )
    lines += family(
        "requests",
        "counter",
        "HTTP requests sent, by kind.",
        [({"kind": kind}, int(n)) for kind, n in sorted(report.get("requests", {}).items())],
    )
    lines += family(
        "in_flight",
        "gauge",
        "Blocks being fetched or made now.",
        [({"cache": name}, int(stats.get("in_flight", 0))) for name, stats in caches],
    )
    lines += family(
        "cache_bytes",
        "gauge",
        "Bytes kept, by tier (disk: the cache dir, shared with other mounts of it).",
        [
            ({"tier": "disk"}, int(cache.get("disk_bytes", 0))),
            (
                {"tier": "memory"},
                in_memory,
            ),
        ],
    )
    lines += family(
        "cache_limit_bytes",
        "gauge",
        "The disk cache's size limit (--cache-size).",
        [({}, int(cache.get("disk_limit", 0)))],
    )
    lines += family(
        "memory_bytes",
        "gauge",
        "Bytes held in memory now, by part (fetching and decoding: in flight; writing: queued "
        "for the disk cache; shared: uploads queued for the shared cache tier and pieces kept "
        "from it).",
        [
            ({"part": "prefetch"}, int(prefetch.get("memory_bytes", 0))),
            ({"part": "fetching"}, int(memory.get("fetching", {}).get("used", 0))),
            ({"part": "decoding"}, int(memory.get("decoding", {}).get("used", 0))),
            ({"part": "writing"}, int(memory.get("writing", {}).get("queued", 0))),
            ({"part": "shared"}, int(shared.get("memory_bytes", 0))),
        ],
    )
    lines += family(
        "memory_limit_bytes",
        "gauge",
        "All in-memory buffers together may hold this (--memory-limit).",
        [({}, int(memory.get("limit", 0)))],
    )
    if shared:
        lines += family(
            "shared_pieces",
            "counter",
            "Pieces of the shared cache tier: hits, misses, uploads, errors, corrupt (skipped, "
            "written again), completions (fetched whole from DCOR to be uploaded), dropped.",
            [
                ({"event": event}, int(shared.get(event, 0)))
                for event in (
                    "hits",
                    "misses",
                    "uploads",
                    "errors",
                    "corrupt",
                    "completions",
                    "dropped",
                )  # fmt: skip
            ],
        )
        lines += family(
            "shared_pending",
            "gauge",
            "Uploads to the shared cache tier queued now.",
            [({}, int(shared.get("pending", 0)))],
        )
    lines += _histogram(report.get("read_latency", {}))
    if not text:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


def write_metrics(path: Path, make_report: Callable[[], dict[str, Any]]) -> None:
    """Replace `path` with the metrics of a report made now, at once (a collector never
    reads half a file), in the text format of node_exporter's textfile collector. Blocking
    (the report reads the cache's accounting): never on the trio thread. Never raises: a
    failure is logged (metrics never stop the daemon)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_text(openmetrics(make_report(), text=True))
        temp.replace(path)
    except Exception as exc:
        log.warning("cannot write the metrics file %s: %s", path, exc)
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
