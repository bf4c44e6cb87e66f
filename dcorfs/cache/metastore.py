"""Remembered API answers, so a mount works offline and does not ask twice for immutable data.

`MetaStore` keeps JSON values in SQLite in the cache directory (file 0600), by scope: answers
given with a token are stored under a private scope that is only read when a token is set
again, so private metadata never leaks into an anonymous mount. No token is ever stored.

`Memo.get` returns a value younger than `max_age` (a number, or one computed from the stored
value: answers that may still grow are kept for less time) without asking the server; otherwise it
asks, and if the server cannot be reached (transient error, deadline) it falls back to the
stored value however old, logging that it did so once per key.

`Memo.listing` is for listings, which on a real-size DCOR take long to ask (doc/DCOR.md §4):
a stored listing is returned at once however old, and one that is older than `max_age` is asked
again in the background; the new one replaces it only once complete, a failed refresh keeps
it and is tried again after `REFRESH_RETRY`. Only a caller with nothing stored waits.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DcorfsError, unreachable

log = logging.getLogger(__name__)

FOREVER = float("inf")
STALE_ATTEMPT = 5.0  # seconds spent asking the server when a stored answer exists
REFRESH_RETRY = 30.0  # seconds before a failed background refresh of a listing is retried


def read_answers(path: Path, prefixes: tuple[str, ...]) -> tuple[int, list[tuple[str, Any]]]:
    """(number of answers, (key, value) of those whose key starts with one of `prefixes`) of
    every scope, read without changing anything (for `cache info`, and tests)."""
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        (count,) = db.execute("SELECT COUNT(*) FROM answers").fetchone()
        found = [
            (key, json.loads(text))
            for prefix in prefixes
            for key, text in db.execute(
                "SELECT key, value FROM answers WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
            )
        ]
    finally:
        db.close()
    return int(count), found


class MetaStore:
    """A small persistent key → JSON map with the time each value was stored."""

    def __init__(self, path: Path | None, *, scope: str) -> None:
        self._scope = scope
        # two locks, so that answers in memory are never kept waiting by the database: `_lock`
        # guards `_memory` (held only for dict operations), `_db_lock` the connection (and
        # orders writes: memory and database see them in the same order). Order: `_db_lock`
        # first, then `_lock`.
        self._lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._memory: dict[str, tuple[Any, float]] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None:
            try:
                self._db = self._open(path)
            except (OSError, sqlite3.Error) as exc:
                log.warning("metadata store %s unusable (%s): keeping answers in memory", path, exc)

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        db = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # WAL: durable at checkpoints, not at each commit (an answer lost in a power cut is
            # asked again); FULL synced every answer stored, each in the way of the others
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS answers (scope TEXT, key TEXT, value TEXT,"
                " stored REAL, PRIMARY KEY (scope, key))"
            )
            db.execute("SELECT COUNT(*) FROM answers").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def get(self, key: str) -> tuple[Any, float] | None:
        """(value, wall time stored) or None."""
        with self._lock:
            hit = self._memory.get(key)
        if hit is not None:
            return hit
        with self._db_lock:
            row = self._row("value, stored", key)
            if row is None:
                return None
            value = (json.loads(row[0]), float(row[1]))
            with self._lock:
                return self._memory.setdefault(key, value)

    def has(self, key: str) -> bool:
        """Whether a value is stored for `key` (without reading it)."""
        with self._lock:
            if key in self._memory:
                return True
        with self._db_lock:
            return self._row("1", key) is not None

    def _row(self, columns: str, key: str) -> Any:
        """The stored row of `key` (`columns` of it), None if none (call with `_db_lock`)."""
        if self._db is None:
            return None
        try:
            return self._db.execute(
                f"SELECT {columns} FROM answers WHERE scope=? AND key=?", (self._scope, key)
            ).fetchone()
        except sqlite3.Error as exc:
            log.warning("metadata store read failed: %s", exc)
            return None

    def put(self, key: str, value: Any) -> None:
        now = time.time()
        text = json.dumps(value, separators=(",", ":"))
        with self._db_lock:
            with self._lock:
                self._memory[key] = (value, now)
            if self._db is None:
                return
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)",
                    (self._scope, key, text, now),
                )
            except sqlite3.Error as exc:
                log.warning("metadata store write failed: %s", exc)

    def clear(self) -> int:
        """Forget every stored answer (of every scope); returns how many."""
        with self._db_lock:
            with self._lock:
                self._memory.clear()
            if self._db is None:
                return 0
            count = self._db.execute("DELETE FROM answers").rowcount
            return int(count)

    def close(self) -> None:
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class Memo:
    """Ask the server at most once per `max_age`; serve stored answers when it is unreachable."""

    def __init__(
        self,
        store: MetaStore,
        *,
        timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._timeout = timeout  # for one question (with its retries)
        self._clock = clock
        self._lock = threading.Lock()
        self._flights: dict[str, threading.Lock] = {}
        self._warned: set[str] = set()
        self._refreshing: set[str] = set()
        self._failed: dict[str, float] = {}  # key -> when its last refresh failed (clock)

    def stored(self, key: str) -> bool:
        """Whether an answer is stored for `key` (any age)."""
        return self._store.has(key)

    def _deadline(self) -> float:
        """A deadline for one question (one page of a listing)."""
        return self._clock() + self._timeout

    def listing(
        self, key: str, ask: Callable[[Callable[[], float]], Any], *, max_age: float
    ) -> tuple[Any, float]:
        """(value, wall time it was asked): stored at once, however old (a refresh is
        started when it is older than `max_age`); with nothing stored, asked now.
        `ask(deadline)` calls `deadline()` for each question it asks: each gets the
        timeout of its own."""
        stored = self._store.get(key)
        if stored is None:
            with self._lock:
                flight = self._flights.setdefault(key, threading.Lock())
            with flight:  # the first listing: one question at a time, followers reuse it
                stored = self._store.get(key)
                if stored is None:
                    self._store.put(key, ask(self._deadline))
                    stored = self._store.get(key)
                    assert stored is not None
            return stored
        if time.time() - stored[1] >= max_age:
            self._refresh(key, ask)
        return stored

    def _refresh(self, key: str, ask: Callable[[Callable[[], float]], Any]) -> None:
        """Ask for `key` again in a thread of its own, unless that is under way or failed
        less than `REFRESH_RETRY` ago."""
        with self._lock:
            failed = self._failed.get(key)
            if key in self._refreshing or (
                failed is not None and self._clock() - failed < REFRESH_RETRY
            ):
                return
            self._refreshing.add(key)

        def refresh() -> None:
            try:
                value = ask(self._deadline)
            except Exception as exc:  # a thread of its own: nothing above to catch it
                with self._lock:
                    self._failed[key] = self._clock()
                level = logging.WARNING if isinstance(exc, DcorfsError) else logging.ERROR
                log.log(level, "refreshing %s failed (%s); showing the older listing", key, exc)
            else:
                self._store.put(key, value)
                with self._lock:
                    self._failed.pop(key, None)
                log.debug("refreshed %s", key)
            finally:
                with self._lock:
                    self._refreshing.discard(key)

        threading.Thread(target=refresh, name=f"refresh {key}", daemon=True).start()

    def get(
        self,
        key: str,
        ask: Callable[[float], Any],
        *,
        max_age: float | Callable[[Any], float],
    ) -> Any:
        def young(hit: tuple[Any, float] | None) -> bool:
            if hit is None:
                return False
            limit = max_age(hit[0]) if callable(max_age) else max_age
            return time.time() - hit[1] < limit

        stored = self._store.get(key)
        if young(stored):
            assert stored is not None
            return stored[0]
        with self._lock:
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:  # one question per key at a time; followers reuse the answer
            fresh = self._store.get(key)  # another thread may have asked meanwhile
            if young(fresh):
                assert fresh is not None
                return fresh[0]
            wait = STALE_ATTEMPT if stored is not None else self._timeout
            deadline = self._clock() + wait
            try:
                value = ask(deadline)
            except DcorfsError as exc:
                if stored is None or not unreachable(exc):
                    raise
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("server unreachable (%s); using the stored answer for %s", exc, key)
                return stored[0]
            self._store.put(key, value)
            return value
