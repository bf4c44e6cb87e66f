"""`dcorfs webdav` with real clients: rclone lists and reads the tree as the mount shows it,
davfs2 mounts the share and numpy reads features from it, a ranged GET fetches what a read of
the mount would, private data only with credentials, nothing written, no secret in the log."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import formatdate
from pathlib import Path

import dclab
import numpy as np
import pytest
import requests

from dcorfs.admin.demo import terminate
from dcorfs.devserver.datadir import write_json
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.devserver.server import DevServer

from ..conftest import TOKENS, innate_features, rtdc_entries
from ..mounts import dcorfs, mounted, needs_fuse

pytestmark = [pytest.mark.fuse, needs_fuse]
needs_rclone = pytest.mark.skipif(
    shutil.which("rclone") is None, reason="rclone is not installed (apt install rclone)"
)
needs_davfs2 = pytest.mark.skipif(
    shutil.which("mount.davfs") is None, reason="davfs2 is not installed (apt install davfs2)"
)
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount -t davfs)")
USER, PASSWORD = "carol", "a-webdav-password-4321"


@contextmanager
def webdav(
    host: str, cache: Path, *extra: str, token: str | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`dcorfs webdav` on a free loopback port: (its URL, the process); always stopped."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dcorfs", "webdav", "--listen", "127.0.0.1:0", "--host", host]
        + ["--cache-dir", str(cache), "--log-level", "DEBUG", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DCOR_API_KEY": token or ""},
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        if "serving " not in line:
            process.wait(timeout=60)
            raise AssertionError(f"dcorfs webdav did not start: {process.stderr.read()}")
        yield line.split("serving ", 1)[1].strip(), process
    finally:
        terminate(process, grace=30)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    assert process.returncode == 0, process.returncode


def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(f"# who may read\n{USER}:{PASSWORD}\n")
    path.chmod(0o600)
    return path


def rclone(url: str, tmp_path: Path, *args: str, user: str | None = None) -> bytes:
    env = {
        **os.environ,
        "RCLONE_CONFIG": str(tmp_path / "rclone.conf"),
        "RCLONE_CONFIG_DAV_TYPE": "webdav",
        "RCLONE_CONFIG_DAV_URL": url,
        "RCLONE_CONFIG_DAV_VENDOR": "other",
    }
    if user is not None:
        obscured = subprocess.run(
            ["rclone", "obscure", PASSWORD], capture_output=True, text=True, check=True
        ).stdout.strip()
        env.update({"RCLONE_CONFIG_DAV_USER": user, "RCLONE_CONFIG_DAV_PASS": obscured})
    done = subprocess.run(["rclone", *args], check=False, capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def walk(root: Path) -> dict[str, int]:
    """Every file under `root`: path relative to it → size."""
    return {
        str(path.relative_to(root)): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@needs_rclone
def test_rclone_lists_and_reads_what_the_mount_shows(devserver: DevServer, tmp_path: Path) -> None:
    with (
        webdav(devserver.url, tmp_path / "dav-cache") as (url, _),
        mounted(tmp_path / "mnt", devserver.url, tmp_path / "cache") as mnt,
    ):
        top = rclone(url, tmp_path, "lsf", "dav:").decode().split()
        assert sorted(top) == sorted(f"{p.name}/" if p.is_dir() else p.name for p in mnt.iterdir())
        listed = rclone(url, tmp_path, "lsf", "-R", "--format", "ps", "dav:")  # the whole tree
        served = {
            path: int(size)
            for path, size in (line.rsplit(";", 1) for line in listed.decode().splitlines())
            if not path.endswith("/")
        }
        truth = walk(mnt)
        # the one dynamic file: size 0 in the mount (direct I/O), its bytes' length over HTTP
        assert served.pop(".dcorfs/status.json") > 0 and truth.pop(".dcorfs/status.json") == 0
        assert any(path.startswith("datasets/generated/") for path in served)
        assert served == truth
        kinds = {".npy", ".rtdc", ".tsv", ".tif", ".fcs", ".txt", ".json", ".csv"}
        checked: set[str] = set()
        for path, size in walk(mnt / "datasets" / "generated").items():
            suffix = Path(path).suffix
            if suffix not in kinds or suffix in checked and suffix != ".npy" or size < 2:
                continue
            checked.add(suffix)
            offset, count = size // 3, min(size - size // 3, 100_000)
            got = rclone(
                url,
                tmp_path,
                "cat",
                "--offset",
                str(offset),
                "--count",
                str(count),
                f"dav:datasets/generated/{path}",
            )
            with (mnt / "datasets" / "generated" / path).open("rb") as handle:
                handle.seek(offset)
                assert got == handle.read(count), path
        assert {".npy", ".rtdc", ".tsv", ".tif", ".fcs", ".txt"} <= checked  # notes.txt: plain


@needs_davfs2
@AS_ROOT
def test_davfs2_mounts_the_share_and_numpy_reads_features(
    devserver: DevServer, tmp_path: Path
) -> None:
    entry = next(e for e in rtdc_entries(devserver) if e["dataset"] == "generated")
    secrets = tmp_path / "secrets"
    conf = tmp_path / "davfs2.conf"
    mnt = tmp_path / "davfs"
    mnt.mkdir()
    # mount.davfs works as the user davfs2 (the package's): its cache dir outside root's tmp
    cache = Path(tempfile.mkdtemp(prefix="dcorfs-davfs-"))
    shutil.chown(cache, group="davfs2")
    cache.chmod(0o775)
    with webdav(
        devserver.url, tmp_path / "dav-cache", "--password-file", str(password_file(tmp_path))
    ) as (url, _):
        secrets.write_text(f"{url} {USER} {PASSWORD}\n")
        secrets.chmod(0o600)
        conf.write_text(f"secrets {secrets}\nuse_locks 0\ncache_dir {cache}\nask_auth 0\n")
        done = subprocess.run(
            ["mount", "-t", "davfs", url, str(mnt), "-o", f"ro,conf={conf}"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stderr
        try:
            directory = mnt / "datasets" / "generated" / entry["name"].rsplit(".", 1)[0]
            with dclab.new_dataset(entry["path"]) as ds:
                for name in ("deform", "area_um", "image"):
                    assert name in innate_features(ds)
                    values = np.load(directory / f"{name}.npy", mmap_mode="r")
                    equal = np.array_equal(values, ds[name][:])
                    del values  # the map holds the file open: umount would be refused
                    assert equal, name
        finally:
            unmounted = subprocess.run(
                ["umount", str(mnt)], check=False, capture_output=True, text=True, timeout=60
            )
            if mounted_at(mnt):
                subprocess.run(
                    ["umount", "-l", str(mnt)], check=False, capture_output=True, timeout=60
                )
            shutil.rmtree(cache, ignore_errors=True)
    assert unmounted.returncode == 0, unmounted.stderr
    assert not mounted_at(mnt)


def mounted_at(path: Path) -> bool:
    """Whether the mount table lists `path` (`os.path.ismount` says no once the share that
    a davfs2 mount reads is gone)."""
    return any(
        line.split()[1] == str(path) for line in Path("/proc/self/mounts").read_text().splitlines()
    )


@pytest.fixture
def large_measurement(tmp_path: Path) -> Iterator[DevServer]:
    """A devserver of one measurement with 40 MB of images (its own counters)."""
    data = tmp_path / "large"
    write_json(data / "dcor.json", {"users": {}})
    write_json(data / "lab" / "large" / "dataset.json", {"title": "Large"})
    write_rtdc(data / "lab" / "large" / "M001_data.rtdc", SampleSpec(events=2000, seed=5))
    with DevServer(data) as server:
        yield server


def test_a_ranged_get_fetches_what_a_read_of_the_mount_would(
    large_measurement: DevServer, tmp_path: Path
) -> None:
    server = large_measurement
    (entry,) = rtdc_entries(server)
    resource_bytes = Path(entry["path"]).stat().st_size
    image = "datasets/large/M001_data/image.npy"
    with mounted(tmp_path / "mnt", server.url, tmp_path / "cache") as mnt:
        size = (mnt / image).stat().st_size
        at = size // 2
        server.stats.reset()
        with (mnt / image).open("rb") as handle:
            handle.seek(at)
            truth = handle.read(65536)
        by_mount = server.stats.snapshot()["object_bytes"]
    with webdav(server.url, tmp_path / "dav-cache") as (url, _):
        requests.get(url + "datasets/large/M001_data/", timeout=60).raise_for_status()
        server.stats.reset()
        answer = requests.get(
            url + image, headers={"Range": f"bytes={at}-{at + 65535}"}, timeout=60
        )
        by_share = server.stats.snapshot()["object_bytes"]
        status = dcorfs("status", url, "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["mountpoint"] == f"webdav {url}"
        assert report["fuse"]["bytes_served"] >= 65536 and report["cache"]["fetched_bytes"] > 0
        metrics = dcorfs("status", url, "--openmetrics")
        assert metrics.returncode == 0 and "dcorfs_cache_limit_bytes" in metrics.stdout
    assert answer.status_code == 206 and answer.content == truth
    assert answer.headers["Content-Range"] == f"bytes {at}-{at + 65535}/{size}"
    print(f"\n64 KiB of {size} B: mount fetched {by_mount} B, share {by_share} B")
    assert 0 < by_share <= max(2 * by_mount, 1 << 20)
    assert by_share < resource_bytes / 10


def test_private_data_needs_credentials_and_nothing_is_written(
    devserver: DevServer, tmp_path: Path
) -> None:
    entry = rtdc_entries(devserver, private=True)[0]
    path = f"datasets/{entry['dataset']}/{entry['name'].rsplit('.', 1)[0]}/deform.npy"
    users = password_file(tmp_path)
    with webdav(
        devserver.url, tmp_path / "cache", "--password-file", str(users), token=TOKENS["alice"]
    ) as (url, process):
        assert requests.get(url + path, timeout=60).status_code == 401
        assert requests.get(url + path, auth=(USER, "wrong"), timeout=60).status_code == 401
        answer = requests.get(url + path, auth=(USER, PASSWORD), timeout=60)
        assert answer.status_code == 200
        with dclab.new_dataset(entry["path"]) as ds:
            assert np.array_equal(np.load(io.BytesIO(answer.content)), ds["deform"][:])
        for method in ("PUT", "DELETE", "MKCOL", "MOVE", "COPY", "PROPPATCH", "LOCK"):
            refused = requests.request(
                method, url + path, data=b"x", auth=(USER, PASSWORD), timeout=60
            )
            assert refused.status_code in (403, 405), (method, refused.status_code)
        assert requests.get(url + path, auth=(USER, PASSWORD), timeout=60).content == (
            answer.content
        )
        status = requests.get(url + ".dcorfs/status.json", auth=(USER, PASSWORD), timeout=60)
        assert status.status_code == 200 and TOKENS["alice"] not in status.text
        anonymous = dcorfs("status", url)
        assert anonymous.returncode != 0 and anonymous.stdout == ""
        assert (
            anonymous.stderr.strip() == f"dcorfs: {url.rstrip('/')} has users: give --password-file"
        )
        summary = dcorfs("status", url, "--password-file", str(users))
        assert summary.returncode == 0, summary.stderr
        assert f"at webdav {url}" in summary.stdout and TOKENS["alice"] not in summary.stdout
        options = requests.options(url, auth=(USER, PASSWORD), timeout=60)
        assert options.headers["DAV"].split(",")[0].strip() == "1"  # class 1: no locks
    assert process.stderr is None or process.stderr.closed
    log = (tmp_path / "cache" / "dcorfs.log").read_text()
    assert "served read-only" in log
    assert PASSWORD not in log and TOKENS["alice"] not in log


def test_what_would_expose_data_is_refused_before_it_starts(
    devserver: DevServer, tmp_path: Path
) -> None:
    def refused(*args: str, token: str = "", **env: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "dcorfs", "webdav", "--host", devserver.url, *args]
            + ["--cache-dir", str(tmp_path / "cache")],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "DCOR_API_KEY": token, **env},
        )
        assert done.returncode != 0 and done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        return lines[0]

    assert "needs --password-file" in refused("--listen", "0.0.0.0:0")
    assert "--password-file" in refused("--listen", "127.0.0.1:0", token=TOKENS["alice"])
    s3 = {"DCORFS_S3_ACCESS_KEY_ID": "a-key-id", "DCORFS_S3_SECRET_ACCESS_KEY": "a-s3-secret"}
    message = refused("--listen", "127.0.0.1:0", "--s3-endpoint", devserver.url, **s3)
    assert "S3 credentials" in message and "--password-file" in message
    assert "a-s3-secret" not in message
    users = tmp_path / "open"
    users.write_text(f"{USER}:{PASSWORD}\n")
    users.chmod(0o644)
    message = refused("--listen", "127.0.0.1:0", "--password-file", str(users))
    assert "readable by others" in message and PASSWORD not in message
    assert "not an address" in refused("--listen", "nowhere")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in refused("--listen", f"127.0.0.1:{port}")


DAV = "{DAV:}"


def propfind(url: str, depth: str | None) -> tuple[int, dict[str, dict[str, str | None]]]:
    """PROPFIND (allprop) at `url`: the status and, for a 207, each href's name → its props
    (`collection` for a collection's resourcetype)."""
    answer = requests.request(
        "PROPFIND", url, headers={} if depth is None else {"Depth": depth}, timeout=120
    )
    if answer.status_code != 207:
        return answer.status_code, {}
    found: dict[str, dict[str, str | None]] = {}
    for response in ET.fromstring(answer.content).iter(f"{DAV}response"):
        href = response.findtext(f"{DAV}href") or ""
        props: dict[str, str | None] = {}
        for prop in response.iter(f"{DAV}prop"):
            for item in prop:
                name = item.tag.removeprefix(DAV)
                props[name] = item.text
                if name == "resourcetype" and item.find(f"{DAV}collection") is not None:
                    props["collection"] = "yes"
        found[href.rstrip("/").rsplit("/", 1)[-1]] = props
    return 207, found


def test_propfind_and_head_tell_what_the_mount_tells(devserver: DevServer, tmp_path: Path) -> None:
    server = devserver
    entry = next(e for e in rtdc_entries(server) if e["dataset"] == "generated")
    here = f"datasets/generated/{entry['name'].rsplit('.', 1)[0]}"
    with mounted(tmp_path / "mnt", server.url, tmp_path / "cache") as mnt:
        entries = {p.name: p.stat() for p in (mnt / here).iterdir()}
        kinds = {name: (mnt / here / name).is_dir() for name in entries}
    with webdav(server.url, tmp_path / "dav-cache") as (url, _):
        status, listed = propfind(f"{url}{here}/", "1")
        assert status == 207
        assert set(listed) == {here.rsplit("/", 1)[1], *entries}
        assert listed[here.rsplit("/", 1)[1]].get("collection") == "yes"
        for name, stat in entries.items():
            props = listed[name]
            assert (props.get("collection") == "yes") == kinds[name], name
            assert props["getlastmodified"] == formatdate(stat.st_mtime, usegmt=True), name
            if not kinds[name]:
                assert props["getcontentlength"] == str(stat.st_size), name
                assert props["getetag"], name
        status, alone = propfind(f"{url}{here}/deform.npy", "0")
        assert status == 207 and list(alone) == ["deform.npy"]
        assert alone["deform.npy"] == listed["deform.npy"]
        head = requests.head(f"{url}{here}/deform.npy", timeout=60)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Length"] == str(entries["deform.npy"].st_size)
        assert head.headers["ETag"].strip('"') == alone["deform.npy"]["getetag"]
        assert head.headers["Accept-Ranges"] == "bytes"
        for depth in ("infinity", None):  # none means infinity (RFC 4918): all of DCOR
            refused = requests.request(
                "PROPFIND", url, headers={} if depth is None else {"Depth": depth}, timeout=60
            )
            assert refused.status_code == 403 and b"propfind-finite-depth" in refused.content
        assert requests.get(f"{url}{here}/nothing.npy", timeout=60).status_code == 404
        assert requests.get(f"{url}datasets/no-such-dataset/", timeout=60).status_code == 404


def test_a_failing_remote_is_a_502_with_one_line_and_no_traceback(
    large_measurement: DevServer, tmp_path: Path
) -> None:
    server = large_measurement
    image = "datasets/large/M001_data/image.npy"
    with webdav(server.url, tmp_path / "dav-cache", "--timeout", "5") as (url, _):
        size = int(propfind(url + image, "0")[1]["image.npy"]["getcontentlength"])
        server.faults.update({"error_rate": 1.0})  # every object request fails from now
        try:
            at = size // 2  # not read yet: the resource's metadata is, its images are not
            failed = requests.get(
                url + image, headers={"Range": f"bytes={at}-{at + 65535}"}, timeout=120
            )
        finally:
            server.faults.update({"error_rate": 0.0})
    assert failed.status_code in (502, 503, 504), failed.status_code
    reason = re.findall(rb"<p>(.*?)</p>", failed.content, flags=re.S)
    assert (
        len(reason) == 1 and b"\n" not in reason[0].strip() and b"Traceback" not in failed.content
    )
    log = (tmp_path / "dav-cache" / "dcorfs.log").read_text()
    assert "read failed" in log and "Traceback" not in log
