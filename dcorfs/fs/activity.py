"""What a front end (FUSE, WebDAV) did, for status.json: counters and the most recent errors."""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from ..errors import AccessDenied, NotFound

log = logging.getLogger(__name__)


class Activity:
    """Counters of a front end's operations and its most recent errors (not-found is no error)."""

    def __init__(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()
        self.recent_errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)

    def note_error(self, operation: str, exc: BaseException) -> None:
        if isinstance(exc, NotFound):
            log.debug("%s: %s", operation, exc)
            return
        level = logging.INFO if isinstance(exc, AccessDenied) else logging.WARNING
        log.log(level, "%s failed: %s", operation, exc)
        self.counters["errors"] += 1
        self.recent_errors.append({"time": time.time(), "operation": operation, "error": str(exc)})
