"""What a front end (FUSE, WebDAV) did, for status.json: counters and the most recent errors."""

from __future__ import annotations

import bisect
import collections
import logging
import time
from typing import Any

from ..errors import AccessDenied, NotFound

log = logging.getLogger(__name__)
# upper bounds (seconds) of the read latency histogram: from a page of memory to a stall
LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class Activity:
    """Counters of a front end's operations and its most recent errors (not-found is no error)."""

    def __init__(self) -> None:
        self.counters: collections.Counter[str] = collections.Counter()
        self.recent_errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        # reads answered, by how long they took: counts per bucket of LATENCY_BUCKETS (not
        # cumulative; the last one counts the slower reads), and their sum
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe_read(self, seconds: float) -> None:
        """A read answered after `seconds` (for the latency histogram of the metrics)."""
        self.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def histogram(self) -> dict[str, Any]:
        return {
            "buckets": list(LATENCY_BUCKETS),
            "counts": list(self.latency),
            "sum": self.latency_sum,
        }

    def note_error(self, operation: str, exc: BaseException) -> None:
        if isinstance(exc, NotFound):
            log.debug("%s: %s", operation, exc)
            return
        level = logging.INFO if isinstance(exc, AccessDenied) else logging.WARNING
        log.log(level, "%s failed: %s", operation, exc)
        self.counters["errors"] += 1
        self.recent_errors.append({"time": time.time(), "operation": operation, "error": str(exc)})
