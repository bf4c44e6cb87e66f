"""Intra-dataset basins: features a resource reads from another resource of its dataset.

DCOR's condense job stores, in the condensed file of a dcnum-processed `X_dcn.rtdc`, a basin
of format `dcor` to the raw resource `X.rtdc` of the same dataset ("DCOR intra-dataset for
X.rtdc": its dcserv URL, its features, the mapping `same` or a mapping feature such as
`basinmap0`); dclab's DCOR client follows it for `image`, `mask`, … (doc/DCOR.md §3).

Here: which such basins a condensed file holds (`intra_basins`, from its `basins` group). The
resource then shows the upstream's features (`RtdcResource.with_upstream`), read from the
upstream resource's own objects. Basins naming the resource itself (DCOR's "DCOR dcserv" and
"self-reference" basins) and those of other hosts are not followed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .structure import Array

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpstreamBasin:
    """A `dcor` basin to another resource of the same DCOR host."""

    resource_id: str
    features: tuple[str, ...]  # what the basin says it offers (`trace` for all traces)
    mapping: str  # "same", or the name of this resource's mapping feature (`basinmap0`)

    def offers(self, name: str) -> bool:
        """Whether the basin offers a feature as the mount names it (`trace/fl1_raw` …)."""
        return name.split("/", 1)[0] in self.features


def intra_basins(
    basins: dict[str, Array] | None, *, own_id: str, host: str
) -> list[dict[str, Any]]:
    """The `dcor` basins (as JSON, to be remembered) of a condensed file's `basins` group
    that name another resource on `host` (the DCOR host's netloc)."""
    found = []
    for key, array in sorted((basins or {}).items()):
        try:
            text = "\n".join(_text(line) for line in array.data.ravel())
            basin = json.loads(text)
        except (ValueError, TypeError) as exc:
            log.warning("basin %s of resource %s is not readable: %s", key, own_id, exc)
            continue
        if not isinstance(basin, dict) or basin.get("format") != "dcor":
            continue
        for url in basin.get("urls") or basin.get("paths") or []:
            rid = _resource_id(str(url), host)
            if rid and rid != own_id:
                found.append(
                    {
                        "resource_id": rid,
                        "features": [str(f) for f in basin.get("features") or []],
                        "mapping": str(basin.get("mapping") or "same"),
                    }
                )
                break
    return found


def parsed(value: list[dict[str, Any]]) -> list[UpstreamBasin]:
    """`intra_basins`' JSON as basins."""
    return [
        UpstreamBasin(
            resource_id=str(b["resource_id"]),
            features=tuple(b["features"]),
            mapping=str(b["mapping"]),
        )
        for b in value
    ]


def _resource_id(url: str, host: str) -> str:
    """The resource id of a dcserv URL on `host`, else ''."""
    parts = urlsplit(url)
    if parts.netloc.lower() != host.lower() or not parts.path.endswith("/action/dcserv"):
        return ""
    return (parse_qs(parts.query).get("id") or [""])[0]


def _text(line: Any) -> str:
    return line.decode("utf-8") if isinstance(line, bytes) else str(line)
