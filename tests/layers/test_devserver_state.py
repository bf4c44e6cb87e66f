"""The devserver's state directory does not grow with every start: the condensed files that
carry a server's URLs are its own, and go when it stops (devserver/condense.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import requests

from dcorfs.devserver.condense import SITES
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.devserver.server import DevServer


def _condensed_url(server: DevServer) -> str:
    """The URL dclab would fetch the one resource's condensed file from."""
    site = server.site
    assert site is not None
    (obj,) = [o for o in site.objects.values() if o.artifact == "condensed"]
    return site.object_url(obj.bucket, obj.key)


def test_a_servers_condensed_files_go_when_it_stops(tmp_path: Path) -> None:
    data, state = tmp_path / "data", tmp_path / "data" / ".devserver"
    write_rtdc(data / "M001_data.rtdc", SampleSpec(events=40, seed=3, images=False))
    dead = subprocess.Popen(["true"])
    dead.wait()
    (state / SITES / f"{dead.pid}-left").mkdir(parents=True)  # a server that was killed
    (state / SITES / f"{dead.pid}-left" / "x.rtdc").write_bytes(b"x")
    # where earlier versions left them, one per resource and start
    (state / "condensed").mkdir()
    legacy = state / "condensed" / "0f6f3cbb-6c0c-5a4e-9a35-b5e4c1a8f0e2-0123456789ab.rtdc"
    legacy.write_bytes(b"x")

    with DevServer(data) as first:
        own = list((state / SITES).iterdir())
        assert [p.name.partition("-")[0] for p in own] == [str(os.getpid())]
        served = requests.get(_condensed_url(first), timeout=30)
        assert served.ok and served.content.startswith(b"\x89HDF")
        with DevServer(data) as second:  # side by side: each its own
            assert len(list((state / SITES).iterdir())) == 2
            assert requests.get(_condensed_url(second), timeout=30).content != served.content
        assert list((state / SITES).iterdir()) == own  # the first still serves its own
        assert requests.get(_condensed_url(first), timeout=30).content == served.content
    assert list((state / SITES).iterdir()) == []
    assert not legacy.exists()
    shared = sorted(p.name for p in (state / "condensed").iterdir())
    assert [name.split(".", 1)[1] for name in shared] == ["core.rtdc", "features.json"]
    digested = json.loads((state / "digests.json").read_text())
    assert all(Path(path).exists() for path in digested)
