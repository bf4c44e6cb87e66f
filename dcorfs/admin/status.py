"""`dcorfs status MOUNTPOINT`: a running mount's status report, for people or as JSON."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from ..daemon.metrics import openmetrics
from ..daemon.report import summary
from ..errors import ConfigError, StaleMount

STATUS = Path(".dcorfs") / "status.json"


def read_status(root: Path) -> dict[str, Any]:
    """The report of the dcorfs mount at `root`; ConfigError with the reason when there is none."""
    try:
        report = json.loads((root / STATUS).read_text())
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise StaleMount(root) from None
        raise ConfigError(f"{root} is not a dcorfs mount") from None
    except ValueError:
        raise ConfigError(f"{root}: unreadable status report") from None
    if not isinstance(report, dict):
        raise ConfigError(f"{root}: unreadable status report")
    return report


def show(
    mountpoint: Path, *, as_json: bool, as_metrics: bool = False, out: TextIO = sys.stdout
) -> int:
    report = read_status(mountpoint)
    if as_metrics:
        out.write(openmetrics(report))
        return 0
    out.write(json.dumps(report, indent=2, sort_keys=True) if as_json else summary(report))
    out.write("\n")
    return 0
