"""What `dcserv` knows about an RT-DC resource, computed as `ckanext-dc_serve` computes it.

DCOR's `get_resource_kernel` opens the resource with dclab and caches its metadata
(`config.as_dict(pop_filtering=True)`, with `experiment:event count` filled in), logs, tables
(column names + rows, NaN sent as null), trace names and innate features; the condensed file
adds its logs (those not already present) and its features, once it exists (`resource_logs`:
the answer before; doc/DCOR.md §7). With
`ckanext.dc_serve.enable_intra_dataset_basins` (the production default) the condensed basin also
advertises every feature listed by the basins stored inside the condensed file, i.e. `image`,
`mask`, `trace`, … although the condensed file holds scalar features only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Kernel:
    metadata: dict[str, dict[str, Any]]
    logs: dict[str, list[str]]  # with the condensed file's logs
    resource_logs: dict[str, list[str]]  # the original's only (no condensed file yet)
    tables: dict[str, tuple[list[str] | None, list[Any]]]
    trace_list: list[str] | None  # None: the file has no traces (dcserv then fails, see dcserv)
    resource_features: list[str]
    condensed_features: list[str] | None  # None: no condensed file (yet)


def compute(resource: Path, condensed: Path | None, intra_basin_features: bool) -> Kernel:
    import dclab

    # opened with basins disabled, as DCOR opens resources (dcor_shared s3cc.py ~191-218)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Ignored basin …": intended
        ds = dclab.new_dataset(resource, enable_basins=False)
    with ds:
        metadata = jsonable(ds.config.as_dict(pop_filtering=True))
        metadata.setdefault("experiment", {})
        if not metadata["experiment"].get("event count"):
            metadata["experiment"]["event count"] = len(ds)
        trace_list = sorted(ds["trace"].keys()) if "trace" in ds else None
        tables = {name: _table(ds.tables[name]) for name in ds.tables}
        logs = {name: list(ds.logs[name]) for name in ds.logs}
        resource_features = sorted(ds.features_innate)
    resource_logs = {name: list(lines) for name, lines in logs.items()}
    condensed_features = None
    if condensed is not None:
        with warnings.catch_warnings():
            # dclab says it ignores the remote basins: intended, nothing is fetched here
            warnings.simplefilter("ignore", UserWarning)
            with dclab.new_dataset(condensed, enable_basins=False) as dc:
                for name in dc.logs:
                    logs.setdefault(name, list(dc.logs[name]))
                features = list(dc.features_innate)
                if intra_basin_features:
                    for basin in dc.basins_get_dicts():
                        features += basin.get("features") or []
                condensed_features = sorted(set(features))
    return Kernel(
        metadata=metadata,
        logs=logs,
        resource_logs=resource_logs,
        tables=tables,
        trace_list=trace_list,
        resource_features=resource_features,
        condensed_features=condensed_features,
    )


def _table(table: Any) -> tuple[list[str] | None, list[Any]]:
    rows = _nan_to_none(np.asarray(table[:]).tolist())
    columns = table.keys()
    return (list(columns) if columns is not None else None), rows


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: DCOR sends null (records of compound tables become lists)."""
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def jsonable(value: Any) -> Any:
    """Plain JSON types for metadata that may hold numpy scalars, arrays or bytes."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
