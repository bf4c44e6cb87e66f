"""Pieces of the operability commands below the CLI: sd_notify, report texts, key parsing."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from dcorfs.dcserv import parse_resource_key, resource_key
from dcorfs.notify import Notifier, watchdog_interval
from dcorfs.report import duration, hit_ratio, one_line, size, summary


def test_notifier_sends_datagrams_to_path_and_abstract_sockets(tmp_path: Path) -> None:
    for address in (str(tmp_path / "notify"), f"@dcorfs-test-{os.getpid()}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
            receiver.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
            receiver.settimeout(5)
            Notifier(address).send("READY=1", "STATUS=mounted\nsomewhere")
            assert receiver.recv(4096) == b"READY=1\nSTATUS=mounted somewhere"


def test_notifier_without_socket_or_listener_does_nothing(tmp_path: Path) -> None:
    Notifier(None).send("READY=1")
    assert not Notifier("").active
    Notifier(str(tmp_path / "nobody-listens")).send("READY=1")  # logged, not raised


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "120000000"}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": pid}) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_report_texts() -> None:
    assert size(0) == "0 B"
    assert size(1536) == "1.5 KiB"
    assert size(10 << 30) == "10.0 GiB"
    assert duration(42) == "42s"
    assert duration(3725) == "1h 2m"
    assert duration(2 * 86400 + 3600) == "2d 1h"
    cache = {"memory_hits": 3, "disk_hits": 1, "misses": 4, "disk_bytes": 2048}
    assert hit_ratio(cache) == 0.5
    assert hit_ratio({}) is None
    report = {
        "host": "https://dcor.example",
        "mountpoint": "/mnt/dcor",
        "started": 1000.0,
        "cache": {**cache, "disk_limit": 1 << 30, "in_flight": 2},
        "fuse": {"errors": 1},
        "recent_errors": [{"time": 1000.0, "operation": "read", "error": "HTTP 503"}],
    }
    assert one_line(report) == (
        "cache 2.0 KiB of 1.0 GiB, hits 50.0 %, fetched 0 B, 2 in flight, 1 errors"
    )
    text = summary(report, now=1000.0 + 90)
    assert "https://dcor.example at /mnt/dcor" in text
    assert "up 1m 30s" in text
    assert "50.0 % of block reads (3 memory, 1 disk, 4 network)" in text
    assert "read: HTTP 503" in text


def test_resource_keys_parse_back() -> None:
    rid = "0bccdcab-56f6-52dc-8c34-f3997e2125eb"
    assert parse_resource_key(resource_key("org", rid)) == (rid, "resource")
    assert parse_resource_key(resource_key("org", rid, "condensed")) == (rid, "condensed")
    assert parse_resource_key("bucket/some/other/key") is None


def test_kernel_tuning_raises_never_lowers_and_finds_escaped_paths(tmp_path: Path) -> None:
    from dcorfs.tuning import device_of, tune

    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / /proc rw - proc proc rw\n"
        "97 22 0:55 / /tmp/my\\040mount rw - fuse.dcorfs dcorfs:host ro\n"
    )
    assert device_of(Path("/tmp/my mount"), mountinfo.read_text()) == "0:55"
    assert device_of(Path("/tmp/other"), mountinfo.read_text()) is None
    bdi = tmp_path / "class" / "bdi" / "0:55"
    connection = tmp_path / "fs" / "fuse" / "connections" / "55"
    for directory, name, value in [
        (bdi, "read_ahead_kb", "128"),
        (connection, "max_background", "100"),
        (connection, "congestion_threshold", "9"),
    ]:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(value + "\n")
    done = tune(
        Path("/tmp/my mount"),
        read_ahead_kb=1024,
        max_background=64,
        sysfs=tmp_path,
        mountinfo=mountinfo,
    )
    assert (bdi / "read_ahead_kb").read_text() == "1024\n"
    assert (connection / "max_background").read_text() == "100\n"  # higher already: kept
    assert (connection / "congestion_threshold").read_text() == "48\n"
    assert done == [
        "read_ahead_kb 128 → 1024",
        "max_background 100 (kept)",
        "congestion_threshold 9 → 48",
    ]
    assert tune(Path("/nowhere"), read_ahead_kb=1, max_background=1, mountinfo=mountinfo) == []
