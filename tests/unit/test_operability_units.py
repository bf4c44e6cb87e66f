"""Pieces of the operability commands below the CLI: sd_notify, report texts, key parsing."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dcorfs.daemon.notify import Notifier, watchdog_interval
from dcorfs.daemon.report import counted, duration, hit_ratio, one_line, size, summary
from dcorfs.remote.dcserv import parse_resource_key, resource_key

from ..conftest import REPO


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
    assert (counted(0, "file"), counted(1, "file"), counted(2, "file")) == (
        "0 files",
        "1 file",
        "2 files",
    )
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
        "fuse": {"errors": 1, "bytes_served": 1536, "pushed_bytes": 2048},
        "recent_errors": [{"time": 1000.0, "operation": "read", "error": "HTTP 503"}],
    }
    assert one_line(report) == (
        "cache 2.0 KiB of 1.0 GiB, hits 50.0 %, fetched 0 B, 2 in flight, 1 errors"
    )
    text = summary(report, now=1000.0 + 90)
    assert "https://dcor.example at /mnt/dcor" in text
    assert "up 1m 30s" in text
    assert "1.5 KiB read, 2.0 KiB pushed ahead" in text
    assert "50.0 % of block reads (3 memory, 1 disk, 4 network)" in text
    assert "read: HTTP 503" in text


def test_resource_keys_parse_back() -> None:
    rid = "0bccdcab-56f6-52dc-8c34-f3997e2125eb"
    assert parse_resource_key(resource_key("org", rid)) == (rid, "resource")
    assert parse_resource_key(resource_key("org", rid, "condensed")) == (rid, "condensed")
    assert parse_resource_key("bucket/some/other/key") is None


def test_kernel_tuning_raises_never_lowers_and_finds_escaped_paths(tmp_path: Path) -> None:
    from dcorfs.daemon.tuning import device_of, tune

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


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze missing (apt install systemd; scripts/bootstrap.sh test does)",
)
@pytest.mark.parametrize(
    ("unit", "instance", "user"),
    [("dcorfs@.service", "dcorfs@mnt-dcor.service", True), ("dcorfs.service", None, False)],
)
def test_systemd_units_pass_verification(
    tmp_path: Path, unit: str, instance: str | None, user: bool
) -> None:
    text = (REPO / "systemd" / unit).read_text()
    assert "Type=notify" in text and "NotifyAccess=main" in text
    assert "After=network-online.target" in text and "ExecStop=-/usr/bin/fusermount3 -u" in text
    assert "ExecStartPre=-/usr/bin/fusermount3 -u -z" in text  # restarts after a crash work
    verify_unit(tmp_path, text, instance or unit, user=user)


def verify_unit(tmp_path: Path, text: str, name: str, *, user: bool) -> None:
    """systemd's own verification of a unit file (as unit `name`) passes without a word."""
    # verification checks that ExecStart's program exists: point it at this checkout's dcorfs
    dcorfs_program = shutil.which("dcorfs") or str(Path(sys.executable).with_name("dcorfs"))
    path = tmp_path / name
    path.write_text(text.replace("/usr/local/bin/dcorfs", dcorfs_program))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    result = subprocess.run(
        ["systemd-analyze", *(["--user"] if user else []), "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze missing (apt install systemd; scripts/bootstrap.sh test does)",
)
def test_the_webdav_unit_passes_verification(tmp_path: Path) -> None:
    text = (REPO / "systemd" / "dcorfs-webdav.service").read_text()
    assert "Type=notify" in text and "NotifyAccess=main" in text
    assert "ExecStart=/usr/local/bin/dcorfs webdav " in text
    verify_unit(tmp_path, text, "dcorfs-webdav.service", user=True)


def test_cache_info_only_reads(tmp_path: Path) -> None:
    import io

    from dcorfs.admin import cache_admin
    from dcorfs.cache.diskstore import DiskStore
    from dcorfs.cache.identity import ObjectId

    cache = tmp_path / "cache"
    store = DiskStore(cache, limit_bytes=1 << 20, block_size=1024)
    rid = "0bccdcab-56f6-52dc-8c34-f3997e2125eb"
    obj = ObjectId(key=resource_key("org", rid), etag="e", size=10)
    assert store.put_many(obj, {0: b"0123456789"}) == 1
    stray = cache / "objects" / "ab" / ("ab" * 32 + ".1024.9")  # another process is writing
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"x")
    before = sorted(p.name for p in cache.rglob("*"))
    out = io.StringIO()
    assert cache_admin.info(cache, as_json=True, out=out) == 0
    report = json.loads(out.getvalue())
    # (the disk space of its one block: a page)
    assert report["in_use"] and report["bytes"] == 4096 and report["answers"] == 0
    assert report["resources"][0]["id"] == rid
    assert stray.exists() and not (cache / "meta.sqlite3").exists()
    assert sorted(p.name for p in cache.rglob("*")) == before
    store.close()


ARENAS = """
import ctypes, os, sys, tempfile, threading
from dcorfs.daemon.memory import limit_arenas
if sys.argv[1] == "limit":
    assert limit_arenas(2)
barrier = threading.Barrier(16)
def churn():
    barrier.wait()
    for _ in range(200):
        blocks = [bytearray(100_000) for _ in range(20)]
        del blocks
threads = [threading.Thread(target=churn) for _ in range(16)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(None)
libc.fdopen.restype = ctypes.c_void_p
with tempfile.TemporaryFile() as out:
    stream = ctypes.c_void_p(libc.fdopen(os.dup(out.fileno()), b"w"))
    libc.malloc_info(0, stream)
    libc.fflush(stream)
    out.seek(0)
    print(out.read().decode().count("<heap nr="))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_the_daemons_threads_share_at_most_two_malloc_arenas() -> None:
    """glibc's own report of its arenas (malloc_info) after 16 threads allocated at once: as
    many as it likes by default, two once `limit_arenas(2)` ran (as the daemon does)."""

    def arenas(how: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", ARENAS, how], capture_output=True, text=True, check=True
        )
        return int(done.stdout)

    assert arenas("default") > 2
    assert arenas("limit") <= 2


def test_umount_of_what_is_not_mounted_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dcorfs umount` of a directory nothing is mounted at: one line saying so (not
    fusermount's "Invalid argument"); the kernel's mount table decides, by the absolute or
    the resolved path, and an unreadable table leaves it to fusermount."""
    from dcorfs.admin.unmount import is_mounted, unmount

    table = tmp_path / "mountinfo"
    table.write_text(
        "36 35 0:40 / /proc rw - proc proc rw\n"
        f"90 29 0:71 / {tmp_path}/with\\040space rw,nosuid - fuse.dcorfs dcorfs rw\n"
    )
    (tmp_path / "with space").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "with space")
    assert is_mounted(tmp_path / "with space", table)
    assert is_mounted(tmp_path / "link", table)  # (resolved)
    assert not is_mounted(tmp_path / "other", table)
    assert is_mounted(tmp_path / "other", tmp_path / "missing")  # (fusermount tells)
    assert unmount(tmp_path) == 1
    assert capsys.readouterr().err == f"dcorfs: {tmp_path} is not mounted\n"


def test_files_of_secrets_others_may_read_are_refused(tmp_path: Path) -> None:
    """An API key file, like a share's password file and an S3 credentials file (also the
    shared cache's), is refused (one line, without its text) when its group or others may
    read it: chmod 600."""
    from dcorfs.errors import ConfigError
    from dcorfs.settings import read_password_file, read_s3_credentials, read_token

    key = tmp_path / "key"
    key.write_text("secret-token\n")
    key.chmod(0o644)
    with pytest.raises(ConfigError) as refused:
        read_token(key)
    assert str(refused.value) == f"API key file {key} is readable by others: chmod 600 {key}"
    key.chmod(0o600)
    token = read_token(key)
    assert token is not None and token.reveal() == "secret-token"
    users = tmp_path / "users"
    users.write_text("alice:pw\n")
    users.chmod(0o640)
    with pytest.raises(ConfigError, match="password file .* is readable by others"):
        read_password_file(users)
    s3 = tmp_path / "s3.ini"
    s3.write_text("[default]\naws_access_key_id = k\naws_secret_access_key = secret-s3\n")
    s3.chmod(0o604)
    with pytest.raises(
        ConfigError, match="S3 credentials file .* is readable by others"
    ) as s3_refused:
        read_s3_credentials(s3, {})
    assert "secret-s3" not in str(s3_refused.value)
