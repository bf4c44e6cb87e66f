"""Hardening of real mounts (issue #6): a hostile server, damaged, shared and full cache
directories, other users, where the token goes, a daemon that does not answer.

The hostile server is a proxy in front of a devserver process (tests/hostile.py) that spoils
chosen answers; everything else is the real command line against a real devserver.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from dcorfs.cache import cachedir

from ..cachefiles import damage, intact, object_files, on_disk, stored_blocks
from ..conftest import TOKENS, ServerProcess, rtdc_entries
from ..hostile import HostileProxy
from ..mounts import (
    alive,
    daemon_pid,
    dcorfs,
    is_mounted,
    log_lines,
    mounted,
    needs_fuse,
    read_file,
    steady,
)

pytestmark = [needs_fuse, pytest.mark.fuse]

GENERATED = Path("datasets", "generated")
M001 = GENERATED / "M001_data"
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tmpfs, other users)")


def tree_files(root: Path) -> dict[str, bytes]:
    """Every file below `root` (relative name → bytes, read from the daemon)."""
    return {
        str(path.relative_to(root)): read_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def names_in(directory: Path) -> list[str]:
    return [path.name for path in directory.iterdir()]


# -- a hostile server ------------------------------------------------------------------------------

HOSTILE_NAMES: list[object] = [
    "../generated",
    "a/b",
    "nul\0byte",
    "é" * 200,  # 400 bytes of UTF-8
    "same",
    "same",
    ".",
    "..",
    "",  # not a name: the entry is skipped
    None,  # no name at all: skipped
]


def with_hostile_names(action: str, query: str, body: bytes) -> bytes:
    """The first page of `datasets/` gains copies of `generated` under hostile names, each with
    resources whose names are hostile too."""
    if action != "package_search" or "fq=" in query or "start=0" not in query:
        return body
    answer = json.loads(body)
    results = answer["result"]["results"]
    base = next((r for r in results if r["name"] == "generated"), None)
    if base is None:
        return body
    for name in HOSTILE_NAMES:
        copy = json.loads(json.dumps(base))
        copy["name"] = name
        for resource in copy["resources"]:
            resource["name"] = "../" + resource["name"]
        copy["resources"].append(dict(copy["resources"][0]))  # the same resource twice
        results.append(copy)
    answer["result"]["count"] += len(HOSTILE_NAMES)
    return json.dumps(answer).encode()


def test_hostile_names_become_safe_unique_names(
    devserver_process: ServerProcess, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with HostileProxy(devserver_process.url) as proxy:
        proxy.api = with_hostile_names
        with mounted(tmp_path / "mnt", proxy.url, cache) as mnt:
            names = names_in(mnt / "datasets")
            clean = tree_files(mnt / GENERATED)
            assert len(names) == len(set(names))
            ordinary = ("generated", "scalars-only", "field-fixtures", "dcnum-pairs")
            hostile = [n for n in names if n not in ordinary]
            assert len(hostile) == len(HOSTILE_NAMES) - 2, names  # "" and None are skipped
            listed: dict[str, list[str]] = {}
            for name in hostile:
                assert name not in (".", "..") and "/" not in name and "\0" not in name
                assert 0 < len(os.fsencode(name)) <= 255
                resources = listed[name] = names_in(mnt / "datasets" / name)
                assert len(resources) == len(set(resources)) == len(names_in(mnt / GENERATED)) + 1
                copy = mnt / "datasets" / name
                deform = next(p for p in copy.rglob("deform.npy") if "M001" in str(p))
                assert read_file(deform) == clean["M001_data/deform.npy"], name
        # by path on a new cache, before any listing: a name made unique is no dataset's name
        # in CKAN (package_show finds none): the listing has it
        suffixed = [name for name in listed if "~" in name]
        assert suffixed
        with mounted(tmp_path / "mnt", proxy.url, tmp_path / "cache-2") as mnt:
            for name in suffixed:
                assert names_in(mnt / "datasets" / name) == listed[name]
        assert log_lines(cache, "skipping a dataset")
        assert not log_lines(cache, "unexpected error", "Traceback")


def spoiled_answers(action: str, query: str, body: bytes) -> bytes:
    """Broken JSON for one circle's listing; absurd sizes and missing fields in resources,
    in the listings and in a dataset asked for by name alike."""
    if action == "package_search" and "fq=organization" in query:
        return body[: len(body) // 2]
    if action not in ("package_search", "package_show"):
        return body
    answer = json.loads(body)
    result = answer.get("result")
    if not isinstance(result, dict):  # an error's answer
        return body
    for dataset in result["results"] if action == "package_search" else [result]:
        for resource in dataset["resources"]:
            if resource["name"] == "notes.txt":
                resource["size"] = 10**30
            elif resource["name"] == "M002_data.rtdc":
                resource["size"] = -5
                resource["etag"] = 12
            elif resource["name"] == "M001_data.rtdc" and dataset["name"] == "scalars-only":
                del resource["id"]
    return json.dumps(answer).encode()


def test_malformed_answers_fail_alone(devserver_process: ServerProcess, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with HostileProxy(devserver_process.url) as proxy:
        proxy.api = spoiled_answers
        with mounted(tmp_path / "mnt", proxy.url, cache, "--timeout", "4") as mnt:
            started = time.monotonic()
            with pytest.raises(OSError) as caught:
                names_in(mnt / "circles" / "public-lab")
            assert caught.value.errno == errno.EIO
            assert time.monotonic() - started < 4 + 15  # the deadline, not a hang
            assert "M001_data" not in names_in(mnt / "datasets" / "scalars-only")
            notes = mnt / GENERATED / "notes.txt"  # its absurd size is ignored: probed
            assert read_file(notes) == b"a plain text resource\n"
            m002 = tree_files(mnt / GENERATED / "M002_data")
            assert m002["deform.npy"][:6] == b"\x93NUMPY"
            assert daemon_pid(mnt)  # still serving
        assert log_lines(cache, "skipping a resource")
        assert not log_lines(cache, "unexpected error", "Traceback")
    with mounted(tmp_path / "clean", devserver_process.url, tmp_path / "cache2") as mnt:
        assert m002 == tree_files(mnt / GENERATED / "M002_data")


def test_an_object_that_changes_under_a_reader(
    devserver_process: ServerProcess, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    changed = threading.Event()

    def new_etag(path: str, headers: dict[str, str]) -> dict[str, str]:
        if changed.is_set() and "ETag" in headers:
            headers["ETag"] = '"0123456789abcdef0123456789abcdef"'
        return headers

    with HostileProxy(devserver_process.url) as proxy:
        proxy.objects = new_etag
        with mounted(tmp_path / "mnt", proxy.url, cache) as mnt:
            deform = read_file(mnt / M001 / "deform.npy")
            changed.set()
            started = time.monotonic()
            with pytest.raises(OSError) as caught:
                read_file(mnt / M001 / "image.npy")
            assert caught.value.errno == errno.EIO
            assert time.monotonic() - started < 30  # a permanent error: no retries to the end
            assert read_file(mnt / M001 / "deform.npy") == deform  # cached: still the same
            assert daemon_pid(mnt)
        assert log_lines(cache, "ETag '0123456789abcdef0123456789abcdef', expected")
        assert not log_lines(cache, "unexpected error", "Traceback")


# -- the cache directory ---------------------------------------------------------------------------


def test_damaged_cache_files_are_refetched_never_served(
    devserver_process: ServerProcess, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    server = devserver_process
    with mounted(tmp_path / "mnt", server.url, cache) as mnt:
        truth = tree_files(mnt / GENERATED)

    def integrity_failures() -> int:
        return len(log_lines(cache, "failed its integrity check"))

    # 1. block files, while not mounted
    done = damage(stored_blocks(cache))
    with mounted(tmp_path / "mnt", server.url, cache) as mnt:
        assert tree_files(mnt / GENERATED) == truth
    detected = integrity_failures()
    # each bad block read again is caught (some are not read again: other ranges, read-ahead)
    assert 0 < detected <= done["flipped"] + done["truncated"] + done["swapped"]
    # 2. both databases, while not mounted: renewed, the valid block files are kept
    for database in (cachedir.INDEX, cachedir.META):
        for journal in cache.glob(f"{database}-*"):
            journal.unlink()
        (cache / database).write_bytes(b"not a database at all" * 100)
    # (damaged blocks the last mount did not read again are still there: not taken in)
    blocks = sum(intact(block) for block in stored_blocks(cache))
    with mounted(tmp_path / "mnt", server.url, cache) as mnt:
        assert tree_files(mnt / GENERATED) == truth
    assert len(log_lines(cache, "is damaged")) == 2
    assert log_lines(cache, f"renewed cache index: {blocks} cached blocks kept")
    # 3. block files, while mounted: the daemon has the index open, its memory tier is empty
    with mounted(tmp_path / "mnt", server.url, cache) as mnt:
        done_mounted = damage(stored_blocks(cache))
        assert tree_files(mnt / GENERATED) == truth
        # what the reads started in the background (a condensed file fetched whole, scalars
        # warmed) has ended: it may refetch damaged blocks the reads did not need
        assert steady(lambda: server.stats.snapshot()["object_requests"])
        server.stats.reset()
        assert tree_files(mnt / GENERATED) == truth  # now from memory and the repaired disk
        again = server.stats.snapshot()
        assert again["object_requests"] == 0, again["objects"]
    assert integrity_failures() > detected
    print(f"\ndamaged while not mounted: {done}; while mounted: {done_mounted}")
    assert min(done.values()) > 0 and min(done_mounted.values()) > 0


def test_two_daemons_share_one_small_cache_dir(
    devserver_process: ServerProcess, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    limit = 2 << 20  # smaller than what is read: both evict while the other writes
    with mounted(tmp_path / "clean", devserver_process.url, tmp_path / "clean-cache") as mnt:
        truth = tree_files(mnt / GENERATED)
    with (
        mounted(tmp_path / "a", devserver_process.url, cache, "--cache-size", "2M") as first,
        mounted(tmp_path / "b", devserver_process.url, cache, "--cache-size", "2M") as second,
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        assert daemon_pid(first) != daemon_pid(second)
        runs = [pool.submit(tree_files, m / GENERATED) for m in (first, second) * 3]
        for run in runs:
            assert run.result() == truth
        # (blocks still queued for the disk are written behind the readers, evicting others)
        assert steady(lambda: on_disk(cache))
        stored = on_disk(cache)
        assert stored <= limit + 4096 * len(object_files(cache)), stored  # + entry tables
    info = json.loads(dcorfs("cache", "info", "--cache-dir", str(cache), "--json").stdout)
    assert info["bytes"] <= limit


@AS_ROOT
def test_a_full_disk_turns_caching_off_not_reading(
    devserver_process: ServerProcess, tmp_path: Path
) -> None:
    cache = tmp_path / "tiny"
    cache.mkdir()
    mounted_tmpfs = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k,mode=0700", "tmpfs", str(cache)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted_tmpfs.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted_tmpfs.stderr.strip()}")
    try:
        with mounted(tmp_path / "clean", devserver_process.url, tmp_path / "clean-cache") as mnt:
            truth = tree_files(mnt / GENERATED)
        log = tmp_path / "dcorfs.log"  # not on the full tmpfs
        extra = ("--log-level", "INFO", "--log-file", str(log))
        with mounted(tmp_path / "mnt", devserver_process.url, cache, *extra) as mnt:
            assert tree_files(mnt / GENERATED) == truth
            assert tree_files(mnt / GENERATED) == truth
        assert "cache disabled for now" in log.read_text()
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


# -- other users, the token ------------------------------------------------------------------------


def as_nobody(*command: str, text: bool = True) -> subprocess.CompletedProcess[Any]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command],
        capture_output=True,
        text=text,
        timeout=60,
        check=False,
    )


@AS_ROOT
def test_other_users_need_allow_other(devserver_process: ServerProcess, tmp_path: Path) -> None:
    target = M001 / "deform.npy"
    with tempfile.TemporaryDirectory(prefix="dcorfs-users-") as name:
        base = Path(name)  # outside pytest's private tmp dirs: other users can reach it
        base.chmod(0o755)
        with mounted(base / "own", devserver_process.url, tmp_path / "cache") as mnt:
            expected = read_file(mnt / target)
            denied = as_nobody("cat", str(mnt / target))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
            assert as_nobody("ls", str(mnt)).returncode != 0
            assert as_nobody("ls", str(base)).returncode == 0  # the mount point, not the path
        with mounted(
            base / "shared", devserver_process.url, tmp_path / "cache", "--allow-other"
        ) as mnt:
            allowed = as_nobody("cat", str(mnt / target), text=False)
            assert allowed.returncode == 0, allowed.stderr
            assert allowed.stdout == expected


def test_the_token_stays_with_the_dcor_host(data_dir: Path, tmp_path: Path) -> None:
    """Objects are served under another host name (localhost vs 127.0.0.1): none of the
    requests that reach them carries the token, private data included."""
    server = ServerProcess(data_dir, "--object-host", "localhost")
    try:
        private = {e["id"] for e in rtdc_entries(server, private=True)}
        mount = mounted(tmp_path / "mnt", server.url, tmp_path / "cache", token=TOKENS["alice"])
        with mount as mnt:
            tree_files(mnt / "datasets" / "secret-study")
            tree_files(mnt / M001)
            read_file(mnt / GENERATED / "notes.txt")
        stats = requests.get(f"{server.url}/_devserver/stats?log=1", timeout=10).json()
    finally:
        server.close()
    objects = [entry for entry in stats["log"] if "object" in entry]
    assert private & {e["resource_id"] for e in stats["objects"].values() if e["bytes"]}
    assert {entry["host"].rsplit(":", 1)[0] for entry in objects} == {"localhost"}
    assert stats["api_requests"] > 0 and stats["object_requests_authorized"] == 0


# -- a daemon that does not answer -----------------------------------------------------------------


def test_a_stopped_daemon_is_unmounted_and_then_exits(
    devserver_process: ServerProcess, tmp_path: Path
) -> None:
    """SIGSTOP: the daemon ignores SIGTERM and answers nothing. `dcorfs umount` still frees the
    mount point at once; a reader stuck in it gets its answer when the daemon runs again."""
    with mounted(tmp_path / "mnt", devserver_process.url, tmp_path / "cache") as mnt:
        pid = daemon_pid(mnt)
        target = mnt / M001 / "image.npy"
        target.stat()
        os.kill(pid, signal.SIGSTOP)
        try:
            outcome: list[object] = []

            def read() -> None:
                try:
                    outcome.append(len(read_file(target)))
                except OSError as exc:
                    outcome.append(exc)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            time.sleep(0.5)
            assert reader.is_alive()  # waiting for the stopped daemon
            os.kill(pid, signal.SIGTERM)  # stays pending
            started = time.monotonic()
            unmounted = dcorfs("umount", str(mnt))
            assert unmounted.returncode == 0, unmounted.stderr
            assert time.monotonic() - started < 15
            assert not is_mounted(mnt)
        finally:
            os.kill(pid, signal.SIGCONT)
        reader.join(timeout=60)
        assert not reader.is_alive() and outcome, "the reader still hangs"
        deadline = time.monotonic() + 30
        while alive(pid):
            assert time.monotonic() < deadline, "the daemon did not exit"
            time.sleep(0.1)
