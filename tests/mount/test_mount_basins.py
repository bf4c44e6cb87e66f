"""Intra-dataset basins on a real mount (doc/DCOR.md §3): a dcnum-processed resource shows
the features of its raw upstream resource, read from the upstream's own objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dclab
import numpy as np
import pytest

from dcorfs.devserver.server import DevServer

from ..conftest import TOKENS, ServerProcess, resource, resource_dir
from ..mounts import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.fuse]


def pair(devserver: DevServer, dataset: str, processed: str) -> tuple[dict[str, Any], ...]:
    return resource(devserver, dataset, processed.replace("_dcn", "")), resource(
        devserver, dataset, processed
    )


def raw_index(processed: dict[str, Any]) -> np.ndarray:
    with dclab.new_dataset(processed["path"]) as ds:
        if "basinmap0" in ds.features_innate:
            return np.asarray(ds["basinmap0"][:])
        return np.arange(len(ds))


def object_requests(server: ServerProcess, resource_id: str) -> int:
    return sum(
        e["requests"]
        for e in server.stats.snapshot()["objects"].values()
        if e["resource_id"] == resource_id
    )


@pytest.mark.parametrize(
    "name", ["R001_data_dcn.rtdc", "R002_data_dcn.rtdc"], ids=["same", "mapped"]
)
def test_processed_resource_shows_the_raw_resources_features(
    devserver: DevServer, devserver_process: ServerProcess, tmp_path: Path, name: str
) -> None:
    raw, processed = pair(devserver, "dcnum-pairs", name)
    index = raw_index(processed)
    server = devserver_process
    with (
        mounted(tmp_path / "mnt", server.url, tmp_path / "cache") as mnt,
        dclab.new_dataset(raw["path"]) as local,
    ):
        raw_dir, processed_dir = resource_dir(mnt, raw), resource_dir(mnt, processed)
        for feature in ("image", "mask"):
            assert np.array_equal(np.load(raw_dir / f"{feature}.npy"), local[feature][:])
        # the upstream's values are the upstream resource's own: nothing fetched again
        server.stats.reset()
        for feature in ("image", "mask"):
            shown = np.load(processed_dir / f"{feature}.npy")
            assert np.array_equal(shown, local[feature][:][index]), feature
        if name == "R001_data_dcn.rtdc":
            assert np.array_equal(
                np.load(processed_dir / "trace" / "fl1_raw.npy"), local["trace"]["fl1_raw"][:]
            )
        assert object_requests(server, raw["id"]) == 0
        # the synthesized file has them too, as dclab reads it
        with dclab.new_dataset(processed_dir / name) as synthesized:
            assert len(synthesized) == len(index)
            for feature in ("image", "mask"):
                assert feature in synthesized.features_innate
                for i in (0, len(index) // 2, len(index) - 1):
                    assert np.array_equal(synthesized[feature][i], local[feature][int(index[i])]), (
                        feature,
                        i,
                    )
            assert np.array_equal(synthesized["deform"][:], np.load(processed_dir / "deform.npy"))


def test_private_upstream_is_read_with_the_token(
    devserver: DevServer, devserver_process: ServerProcess, tmp_path: Path
) -> None:
    """Also traces through a mapped basin, which dclab 0.73 cannot index."""
    server = devserver_process
    with mounted(tmp_path / "mnt", server.url, tmp_path / "cache", token=TOKENS["alice"]) as mnt:
        for name in ("R001_data_dcn.rtdc", "R002_data_dcn.rtdc"):
            raw, processed = pair(devserver, "secret-pairs", name)
            index = raw_index(processed)
            processed_dir = resource_dir(mnt, processed)
            with dclab.new_dataset(raw["path"]) as local:
                for feature in ("image", "mask"):
                    shown = np.load(processed_dir / f"{feature}.npy")
                    assert np.array_equal(shown, local[feature][:][index]), (name, feature)
                for trace in local["trace"]:
                    shown = np.load(processed_dir / "trace" / f"{trace}.npy")
                    assert np.array_equal(shown, local["trace"][trace][:][index]), (name, trace)
