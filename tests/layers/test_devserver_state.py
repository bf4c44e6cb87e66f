"""The devserver's state directory does not grow with every start: the condensed files that
carry a server's URLs are its own, and go when it stops, or with the next server to start
once none holds them (devserver/condense.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import requests

from dcorfs.devserver.condense import ABANDONED, LOCK, SITES, STARTING
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.devserver.server import DevServer

from ..conftest import ServerProcess


def _condensed_url(server: DevServer) -> str:
    """The URL dclab would fetch the one resource's condensed file from."""
    site = server.site
    assert site is not None
    (obj,) = [o for o in site.objects.values() if o.artifact == "condensed"]
    return site.object_url(obj.bucket, obj.key)


def _aged(path: Path, seconds: float) -> Path:
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def test_a_servers_condensed_files_go_when_it_stops(tmp_path: Path) -> None:
    data, state = tmp_path / "data", tmp_path / "data" / ".devserver"
    write_rtdc(data / "M001_data.rtdc", SampleSpec(events=40, seed=3, images=False))
    sites, shared = state / SITES, state / "condensed"
    sites.mkdir(parents=True)
    shared.mkdir()
    killed = sites / "1-killed"  # its lock file free: its server is gone
    killed.mkdir()
    (killed / LOCK).touch()
    (killed / "x.rtdc").write_bytes(b"x")
    made = sites / "2-being-made"  # no lock yet: its server is starting
    made.mkdir()
    unlocked = sites / "3-never-locked"  # no lock for long: its server died making it
    unlocked.mkdir()
    _aged(unlocked, STARTING + 60)
    # where earlier versions kept them, one per resource and start, with their digests
    legacy = shared / "0f6f3cbb-6c0c-5a4e-9a35-b5e4c1a8f0e2-0123456789ab.rtdc"
    legacy.write_bytes(b"x")
    left = shared / f"{'0' * 64}.core.rtdc.123.tmp"  # a condensing interrupted long ago
    left.write_bytes(b"x")
    _aged(left, ABANDONED + 60)
    writing = shared / f"{'1' * 64}.core.rtdc.124.tmp"  # another server condensing now
    writing.write_bytes(b"x")
    (state / "digests.json").write_text(
        json.dumps({str(legacy): {"size": 1, "mtime_ns": 0, "md5": "", "etag": "", "sha256": ""}})
    )

    with ServerProcess(data) as other, DevServer(data) as first:
        assert not killed.exists() and not legacy.exists() and not left.exists()
        assert made.exists() and writing.exists() and not unlocked.exists()
        assert str(legacy) not in json.loads((state / "digests.json").read_text())
        ours = [p for p in sites.iterdir() if p.name.startswith(f"{os.getpid()}-")]
        assert len(ours) == 1 and len(list(sites.iterdir())) == 3  # the other process's kept
        served = requests.get(_condensed_url(first), timeout=30)
        assert served.ok and served.content.startswith(b"\x89HDF")
        with DevServer(data) as second:  # side by side in one process: each its own
            assert len(list(sites.iterdir())) == 4
            assert requests.get(_condensed_url(second), timeout=30).content != served.content
        assert len(list(sites.iterdir())) == 3
        assert requests.get(_condensed_url(first), timeout=30).content == served.content
        assert requests.get(f"{other.url}/api/3/action/status_show", timeout=30).ok
    assert sorted(p.name for p in sites.iterdir()) == [made.name]
    kinds = sorted(p.name.split(".", 1)[1] for p in shared.iterdir())
    assert kinds == ["core.rtdc", "core.rtdc.124.tmp", "features.json"]
