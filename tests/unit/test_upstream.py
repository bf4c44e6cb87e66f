"""Which intra-dataset basins of a condensed file the mount follows (doc/DCOR.md §3)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from dcorfs.hdf5.structure import Array
from dcorfs.hdf5.upstream import UpstreamBasin, intra_basins, parsed

OWN = "3f1c2a70-1111-4c4c-8d8d-000000000001"
RAW = "3f1c2a70-2222-4c4c-8d8d-000000000002"
HOST = "dcor.example.org"


def stored(basin: dict[str, Any]) -> Array:
    """A basin as dclab's writer stores it: JSON lines, as bytes."""
    lines = json.dumps(basin, indent=2).split("\n")
    return Array(np.array([line.encode() for line in lines]))


def dcor(rid: str, host: str = HOST, **more: Any) -> dict[str, Any]:
    return {
        "format": "dcor",
        "type": "remote",
        "urls": [f"https://{host}/api/3/action/dcserv?id={rid}"],
        **more,
    }


def test_only_basins_to_other_resources_of_the_host_are_followed() -> None:
    basins = {
        "a": stored(dcor(OWN, name="DCOR dcserv", features=[])),
        "b": stored(dcor(OWN, name=f"DCOR self-reference {OWN}", features=["deform"])),
        "c": stored(dcor(RAW, name="DCOR intra-dataset for X.rtdc", features=["image", "trace"])),
        "d": stored(dcor(RAW, host="other.example.org", features=["image"])),
        "e": stored({"format": "http", "type": "remote", "urls": ["https://s3/x"]}),
        "f": Array(np.array([b"{not json"])),
        "g": stored(dcor(RAW, features=["mask"], mapping="basinmap0")),
    }
    found = parsed(intra_basins(basins, own_id=OWN, host=HOST))
    assert found == [
        UpstreamBasin(RAW, ("image", "trace"), "same"),
        UpstreamBasin(RAW, ("mask",), "basinmap0"),
    ]
    assert found[0].offers("trace/fl1_raw") and not found[0].offers("mask")
    assert intra_basins(None, own_id=OWN, host=HOST) == []
