"""OpenMetrics text of a status report (daemon/metrics.py), read back by prometheus_client's
own OpenMetrics parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import (
    text_string_to_metric_families as text_string_to_metric_families_text,
)

from dcorfs.daemon.metrics import openmetrics, write_metrics
from dcorfs.fs.activity import LATENCY_BUCKETS, Activity


def parsed(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def report() -> dict[str, Any]:
    activity = Activity()
    for seconds in (0.00005, 0.002, 0.002, 0.3, 99.0):
        activity.observe_read(seconds)
    activity.counters.update(
        {"bytes_served": 4096, "pushed_bytes": 8192, "pushes": 3, "push_failures": 1, "errors": 2}
    )
    return {
        "version": "0.1",
        "host": 'http://h"st',
        "mountpoint": "/mnt/dcor",
        "cache": {"fetched_bytes": 10, "memory_hits": 3, "disk_hits": 4, "misses": 5},
        "decoded": {"misses": 1, "memory_bytes": 7, "errors": 1},
        "fuse": dict(activity.counters),
        "read_latency": activity.histogram(),
        "requests": {"range": 5, "api": 2},
        "memory": {"limit": 300, "fetching": {"used": 9}, "decoding": {}, "writing": {"queued": 6}},
        "prefetch": {"memory_bytes": 11},
    }


def test_the_parser_reads_every_family_with_its_values(tmp_path: Path) -> None:
    text = openmetrics(report())
    assert text.endswith("# EOF\n")
    values = parsed(text)
    assert values[("dcorfs_fetched_bytes_total", (("source", "dcor"),))] == 10
    assert values[("dcorfs_served_bytes_total", ())] == 4096
    assert values[("dcorfs_pushed_bytes_total", ())] == 8192
    assert values[("dcorfs_pushes_total", (("result", "pushed"),))] == 3
    assert values[("dcorfs_pushes_total", (("result", "failed"),))] == 1
    assert values[("dcorfs_block_reads_total", (("cache", "remote"), ("tier", "disk")))] == 4
    assert values[("dcorfs_block_reads_total", (("cache", "decoded"), ("tier", "network")))] == 1
    assert values[("dcorfs_errors_total", (("where", "cache"),))] == 1
    assert values[("dcorfs_requests_total", (("kind", "range"),))] == 5
    assert values[("dcorfs_memory_bytes", (("part", "fetching"),))] == 9
    assert values[("dcorfs_memory_bytes", (("part", "writing"),))] == 6
    assert values[("dcorfs_info_info", (("host", 'http://h"st'), ("mountpoint", "/mnt/dcor"),
                                        ("version", "0.1")))] == 1  # fmt: skip
    buckets = {
        float(dict(labels)["le"]): value
        for (name, labels), value in values.items()
        if name == "dcorfs_read_seconds_bucket"
    }
    assert buckets[0.0001] == 1 and buckets[0.005] == 3 and buckets[0.5] == 4
    assert buckets[LATENCY_BUCKETS[-1]] == 4 and buckets[float("inf")] == 5
    assert values[("dcorfs_read_seconds_count", ())] == 5
    assert abs(values[("dcorfs_read_seconds_sum", ())] - 99.30405) < 1e-9


def test_the_metrics_file_is_prometheus_text_for_the_textfile_collector(tmp_path: Path) -> None:
    """node_exporter's textfile collector reads Prometheus' text format (no `info` type, no
    EOF): the file is that, read back by prometheus_client's parser of that format."""
    path = tmp_path / "dcorfs.prom"
    write_metrics(path, report)
    text = path.read_text()
    assert text == openmetrics(report(), text=True) and "# EOF" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["dcorfs.prom"]
    families = {family.name: family for family in text_string_to_metric_families_text(text)}
    assert families["dcorfs_info"].type == "gauge"
    assert families["dcorfs_fetched_bytes"].type == "counter"  # (the parser drops _total)
    assert families["dcorfs_read_seconds"].type == "histogram"
    samples = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert samples["dcorfs_served_bytes_total"] == 4096
    assert samples["dcorfs_read_seconds_count"] == 5

    def broken() -> dict[str, Any]:
        raise KeyError("a report that cannot be made")

    write_metrics(path, broken)  # logged, never raised: the daemon goes on
    write_metrics(tmp_path / "nowhere" / "x.prom", report)
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["dcorfs.prom"]


def test_an_empty_report_is_still_valid_openmetrics() -> None:
    values = parsed(openmetrics({}))
    assert values[("dcorfs_read_seconds_count", ())] == 0


def test_the_shared_tier_has_its_source_and_counters() -> None:
    from dcorfs.daemon.report import summary

    shared = {
        "url": "s3://dcorfs-cache/c",
        "endpoint": "http://s3:9000",
        "up": False,
        "hits": 7,
        "misses": 2,
        "uploads": 3,
        "errors": 1,
        "corrupt": 1,
        "completions": 2,
        "dropped": 0,
        "pending": 4,
        "memory_bytes": 5,
        "hit_bytes": 7 << 20,
        "dcor_bytes": 12,
    }
    values = parsed(openmetrics({**report(), "shared": shared}))
    assert values[("dcorfs_fetched_bytes_total", (("source", "dcor"),))] == 12
    assert values[("dcorfs_fetched_bytes_total", (("source", "shared"),))] == 7 << 20
    for event in ("hits", "misses", "uploads", "errors", "corrupt"):
        assert values[("dcorfs_shared_pieces_total", (("event", event),))] == shared[event]
    assert values[("dcorfs_shared_pending", ())] == 4
    assert values[("dcorfs_memory_bytes", (("part", "shared"),))] == 5
    without = parsed(openmetrics({**report(), "shared": None}))
    assert without[("dcorfs_fetched_bytes_total", (("source", "shared"),))] == 0
    assert not any(name.startswith("dcorfs_shared") for name, _ in without)
    text = openmetrics({**report(), "shared": shared}, text=True)
    assert list(text_string_to_metric_families_text(text))
    line = next(x for x in summary({**report(), "shared": shared}).splitlines() if "shared" in x)
    assert "7 hits, 2 misses, 3 uploads (4 queued), 1 errors, 1 corrupt" in line
    assert "unreachable" in line and "7.0 MiB from the tier" in line
