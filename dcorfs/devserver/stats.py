"""Request counters of the devserver, readable by tests (`/_devserver/stats`): API calls per
action (and dcserv calls per query), requests and bytes per object, faults, a request log."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any


class Stats:
    """Counts API calls per action and requests/bytes per object; keeps a recent request log.

    Object requests that carried an `Authorization` header are counted apart (the API token must
    never reach the object store) and the log says which host name each one was sent to."""

    def __init__(self, log_size: int = 20000) -> None:
        self._lock = threading.Lock()
        self._log_size = log_size
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._api: collections.Counter[str] = collections.Counter()
            self._dcserv: collections.Counter[str] = collections.Counter()
            self._objects: dict[str, dict[str, Any]] = {}
            self._faults: collections.Counter[str] = collections.Counter()
            self._log: collections.deque[dict[str, Any]] = collections.deque(maxlen=self._log_size)

    def record_api(self, action: str, status: int, fault: str, query: str | None = None) -> None:
        with self._lock:
            self._api[action] += 1
            if action == "dcserv" and query is not None:
                self._dcserv[query] += 1
            self._count_fault(fault)
            self._log.append({"t": time.time(), "api": action, "status": status, "fault": fault})

    def record_object(
        self,
        *,
        path: str,
        resource_id: str,
        artifact: str,
        method: str,
        byte_range: tuple[int, int] | None,
        status: int,
        sent: int,
        fault: str,
        host: str = "",
        authorized: bool = False,
    ) -> None:
        with self._lock:
            entry = self._objects.setdefault(
                path,
                {
                    "resource_id": resource_id,
                    "artifact": artifact,
                    "requests": 0,
                    "bytes": 0,
                    "authorized": 0,
                },
            )
            entry["requests"] += 1
            entry["bytes"] += sent
            entry["authorized"] += int(authorized)
            self._count_fault(fault)
            self._log.append(
                {
                    "t": time.time(),
                    "object": path,
                    "method": method,
                    "range": list(byte_range) if byte_range else None,
                    "status": status,
                    "bytes": sent,
                    "fault": fault,
                    "host": host,
                }
            )

    def _count_fault(self, fault: str) -> None:
        if fault != "none":
            self._faults[fault] += 1

    def snapshot(self, with_log: bool = False) -> dict[str, Any]:
        with self._lock:
            objects = {path: dict(entry) for path, entry in self._objects.items()}
            result: dict[str, Any] = {
                "api_requests": sum(self._api.values()),
                "api": dict(self._api),
                "dcserv_queries": dict(self._dcserv),
                "object_requests": sum(e["requests"] for e in objects.values()),
                "object_bytes": sum(e["bytes"] for e in objects.values()),
                "object_requests_authorized": sum(e["authorized"] for e in objects.values()),
                "objects": objects,
                "faults": dict(self._faults),
            }
            if with_log:
                result["log"] = list(self._log)
            return result
