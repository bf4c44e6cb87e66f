"""`dcorfs status MOUNTPOINT|URL`: a running mount's or WebDAV share's status report, for
people or as JSON. A share serves the same report at the same path (`/.dcorfs/status.json`,
doc/ARCHITECTURE.md, "Two front ends"); a share with users is asked as the first user of its
password file, with HTTP digest (the password does not cross the wire)."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import requests

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
    return _checked(report, root)


def read_share_status(url: str, users: dict[str, str] | None) -> dict[str, Any]:
    """The report of the `dcorfs webdav` share at `url`; `users`: its password file's."""
    auth = None
    if users:
        user, password = next(iter(users.items()))
        auth = requests.auth.HTTPDigestAuth(user, password)
    where = url.rstrip("/")
    try:
        answer = requests.get(f"{where}/{STATUS.as_posix()}", auth=auth, timeout=30)
    except requests.RequestException as exc:
        raise ConfigError(f"{where}: no answer ({type(exc).__name__})") from None
    if answer.status_code == 401:
        raise ConfigError(f"{where} has users: give --password-file")
    if answer.status_code != 200:
        raise ConfigError(f"{where} is not a dcorfs share (HTTP {answer.status_code})")
    try:
        report = answer.json()
    except ValueError:
        raise ConfigError(f"{where}: unreadable status report") from None
    return _checked(report, where)


def _checked(report: object, where: object) -> dict[str, Any]:
    if not isinstance(report, dict):
        raise ConfigError(f"{where}: unreadable status report")
    return report


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def show(
    target: str,
    *,
    as_json: bool,
    as_metrics: bool = False,
    users: dict[str, str] | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """`target`: a mount point, or the URL of a share."""
    if is_url(target):
        report = read_share_status(target, users)
    else:
        report = read_status(Path(target).absolute())
    if as_metrics:
        out.write(openmetrics(report))
        return 0
    out.write(json.dumps(report, indent=2, sort_keys=True) if as_json else summary(report))
    out.write("\n")
    return 0
