"""What dcserv's `metadata`, `logs` and `tables` queries answer, made from a resource's files.

For mounts without dcserv (`--s3-only`). The shapes are dcserv's (doc/DCOR.md, "The calls"),
so the text views (`producers.text`) do not care where they came from: metadata `{section: {key:
value}}` from the root attributes `section:key` of the original file (no `filtering` section;
`experiment:event count` filled in when missing); logs as lists of lines, those of the
original file plus the ones of the condensed file that it lacks; tables as `[columns, rows]`.
Values are plain JSON (numbers, text, lists), made once per resource and remembered.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ProtocolError
from ..hdf5.rtdc import RtdcResource
from ..hdf5.structure import GROUPS, Array


def json_value(value: Any) -> Any:
    """An HDF5 attribute or array value as plain JSON (text decoded as UTF-8)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return json_value(value.tolist())
    if isinstance(value, np.generic):
        return json_value(value.item())
    if isinstance(value, list | tuple):
        return [json_value(item) for item in value]
    return value


def metadata(attrs: dict[str, Any], events: int) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for name, value in sorted(attrs.items()):
        section, colon, key = name.partition(":")
        if colon and section and key and section != "filtering":
            found.setdefault(section, {})[key] = json_value(value)
    experiment = found.setdefault("experiment", {})
    if not experiment.get("event count"):
        experiment["event count"] = events
    return found


def log_lines(log: Array) -> list[str]:
    return [str(json_value(line)) for line in log.data.reshape(-1).tolist()]


def table(stored: Array) -> list[Any]:
    names = stored.data.dtype.names
    return [list(names) if names else None, json_value(stored.data.tolist())]


def file_texts(resource: RtdcResource, *, deadline: float) -> dict[str, Any]:
    """{"metadata": …, "logs": …, "tables": …} of an opened resource (blocking: reads the
    HDF5 structure of its files through the cache)."""
    original = resource.source("resource")
    if original is None:
        raise ProtocolError("resource without its original file")
    arrays = original.arrays(GROUPS, deadline=deadline)
    logs = {name: log_lines(log) for name, log in (arrays["logs"] or {}).items()}
    condensed = resource.source("condensed")
    if condensed is not None:
        condensed_logs = condensed.arrays(["logs"], deadline=deadline)["logs"]
        for name, log in (condensed_logs or {}).items():
            logs.setdefault(name, log_lines(log))
    attrs = original.attrs(["/"], deadline=deadline)["/"]
    return {
        "metadata": metadata(attrs, resource.events),
        "logs": logs,
        "tables": {name: table(stored) for name, stored in (arrays["tables"] or {}).items()},
    }
