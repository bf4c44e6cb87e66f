"""Failures a retry at once does not cure, remembered for a while (doc/DCOR.md §8).

DCOR's dcserv answers 500 for every query about a file it cannot open, and will again on the
next read: asking on every read only makes each reader wait. A remembered failure answers
at once (EIO) until it expires; then the server is asked again, since files and servers get
fixed. Bounded: expired entries are dropped, and at most `limit` are kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import ServerError

log = logging.getLogger(__name__)

HOLD = 300.0  # seconds a server error is remembered


class Failures:
    """Thread-safe: `check(key)` raises the remembered error; `remember(key, exc)`."""

    def __init__(
        self,
        hold: float = HOLD,
        limit: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hold = hold
        self._limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._failed: dict[str, tuple[float, str]] = {}  # key -> (until, message)

    def check(self, key: str) -> None:
        with self._lock:
            found = self._failed.get(key)
            if found is not None and self._clock() >= found[0]:
                del self._failed[key]
                found = None
        if found is not None:
            raise ServerError(f"{found[1]} (remembered; asked again after {self._hold:.0f} s)")

    def remember(self, key: str, exc: ServerError) -> None:
        now = self._clock()
        with self._lock:
            self._failed = {k: v for k, v in self._failed.items() if v[0] > now}
            if len(self._failed) >= self._limit:
                self._failed.pop(next(iter(self._failed)))
            self._failed[key] = (now + self._hold, str(exc))
        log.warning("%s: the server fails on it; not asked again for %.0f s", exc, self._hold)
