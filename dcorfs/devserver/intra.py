"""Intra-dataset basins, found the way DCOR's condensing job finds them (doc/DCOR.md §3).

A dcnum-processed `X_dcn.rtdc` holds scalar features and an HDF5 *file* basin to its raw input
`X.rtdc` (paths on the machine that ran dcnum, and the raw file's run identifier). When both
are resources of one dataset, ckanext-dc_serve's condense job (`jobs.py`
`_get_intra_dataset_upstream_basins` ~210-285, `_is_basin_of_dataset` ~297-345, enabled by
`ckanext.dc_serve.enable_intra_dataset_basins`, ~149-154) writes a basin of format `dcor` to
each resource of the dataset that the file basin names into the processed file's condensed
file (~199-201):

- a resource is named when its run identifier equals the basin's `identifier` and either the
  mapping is `same` and the processed file has that run identifier too, or the mapping is not
  `same` and the processed file's run identifier starts with it (dcnum appends `_dcn-<hash>`);
  with mapping `same` the processed resource itself matches as well ("DCOR self-reference");
- the basin: name "DCOR intra-dataset for <name>", the upstream's dcserv URL, every feature of
  the upstream resource and of its condensed file (with their remote basins' features,
  `_get_all_features_with_remote`), and the mapping's values (`basinmap0`) when mapped.

Every resource is opened with basins disabled, as DCOR opens them (dcor_shared `s3cc.py`
`get_s3_dc_handle` ~191-218). Other resources are skipped here; on DCOR, opening a resource
that is not RT-DC fails the whole job (the condensed file is then never made).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .repository import Dataset, Resource

UpstreamFeatures = Callable[[Resource], list[str]]


def run_identifier(path: Path) -> str:
    """The measurement identifier dclab computes for a file (`get_measurement_identifier`)."""
    import dclab

    with _quiet(), dclab.new_dataset(path, enable_basins=False) as ds:
        return str(ds.get_measurement_identifier() or "")


def upstream_basins(
    ds: Dataset,
    res: Resource,
    *,
    site_url: str,
    identifiers: Callable[[Resource], str],
    features: UpstreamFeatures,
) -> list[dict[str, Any]]:
    """The `store_basin` arguments of the intra-dataset basins of `res` (dc_serve `jobs.py`
    ~210-285); `identifiers`/`features` give the run identifier and all features (with its
    condensed file's) of another resource of the dataset."""
    import dclab

    found: list[dict[str, Any]] = []
    with _quiet(), dclab.new_dataset(res.path, enable_basins=False) as dc:
        own_id = str(dc.get_measurement_identifier() or "")
        for basin in dc.basins_get_dicts():
            if basin.get("type") != "file" or basin.get("format") != "hdf5":
                continue
            mapping = basin.get("mapping", "same")
            basin_map = None if mapping == "same" else np.asarray(dc[mapping][:])
            for other in ds.resources:
                if not other.is_rtdc or not _is_basin_of(own_id, identifiers(other), basin):
                    continue
                if other.id == res.id:
                    name = f"DCOR self-reference {other.name}"
                    descr = "Basin is the resource itself on DCOR"
                else:
                    name = f"DCOR intra-dataset for {other.name}"
                    descr = "Upstream DCOR intra-dataset resource"
                found.append(
                    {
                        "basin_name": name,
                        "basin_type": "remote",
                        "basin_format": "dcor",
                        "basin_locs": [f"{site_url}/api/3/action/dcserv?id={other.id}"],
                        "basin_descr": descr,
                        "basin_feats": features(other),
                        "basin_map": basin_map,
                    }
                )
    return found


def _is_basin_of(own_id: str, other_id: str, basin: dict[str, Any]) -> bool:
    """dc_serve `jobs.py` `_is_basin_of_dataset` ~297-345."""
    wanted = basin.get("identifier")
    if not other_id or not wanted or other_id != wanted:
        return False
    if basin.get("mapping", "same") == "same":
        return other_id == own_id
    return own_id.startswith(other_id)


def all_features(resource: Path, condensed: Path | None, condensed_remote: list[str]) -> list[str]:
    """Features of a resource and of its condensed file, with the features its condensed
    file's remote basins list (dc_serve `jobs.py` `_get_all_features_with_remote`, ~288-294:
    `ds.features`, i.e. innate and computable ones)."""
    import dclab

    with _quiet(), dclab.new_dataset(resource, enable_basins=False) as ds:
        found = set(ds.features)
    if condensed is not None:
        with _quiet(), dclab.new_dataset(condensed, enable_basins=False) as dc:
            found.update(dc.features)
        found.update(condensed_remote)
    return sorted(found)


def digest(basins: list[dict[str, Any]]) -> str:
    """A short digest of basins (for naming the condensed file that holds them)."""
    hasher = hashlib.sha1()
    for basin in basins:
        plain = {k: v for k, v in basin.items() if k != "basin_map"}
        hasher.update(json.dumps(plain, sort_keys=True).encode())
        if basin["basin_map"] is not None:
            hasher.update(np.ascontiguousarray(basin["basin_map"]).tobytes())
    return hasher.hexdigest()[:12]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """dclab warns that it ignores basins: intended, nothing is resolved here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
