"""Latency and fault injection for the devserver.

Every switch is a fraction of requests (0..1) except the durations. They apply to object-store
requests; with `api_faults` also to CKAN API calls (where range faults make no sense). The
configuration can be changed while the server runs (admin endpoint `/_devserver/faults`).
"""

from __future__ import annotations

import enum
import random
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any


class Fault(enum.Enum):
    NONE = "none"
    ERROR = "error"  # 500 InternalError / 503 SlowDown
    RESET = "reset"  # TCP reset after part of the body
    STALL = "stall"  # pause of `stall_seconds` in the middle of the body
    SHORT = "short"  # body ends early, connection closed cleanly
    WRONG_RANGE = "wrong_range"  # 206 for another range than asked (Content-Range says which)
    IGNORE_RANGE = "ignore_range"  # 200 with the whole object instead of 206


RANGE_FAULTS = (Fault.WRONG_RANGE, Fault.IGNORE_RANGE)


@dataclass(frozen=True)
class FaultConfig:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    reset_rate: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 5.0
    short_rate: float = 0.0
    wrong_range_rate: float = 0.0
    ignore_range_rate: float = 0.0
    url_lifetime: float = 3600.0
    api_faults: bool = False

    def __post_init__(self) -> None:
        rates = [self.rate(fault) for fault in Fault if fault is not Fault.NONE]
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0:
            raise ValueError("fault rates must lie in [0, 1] and add up to at most 1")
        if self.latency_ms < 0 or self.stall_seconds < 0 or self.url_lifetime <= 0:
            raise ValueError("latency and stall must be >= 0, the URL lifetime > 0")

    def rate(self, fault: Fault) -> float:
        return float(getattr(self, f"{fault.value}_rate"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, changes: dict[str, Any]) -> FaultConfig:
        known = {f.name: f.type for f in fields(self)}
        unknown = set(changes) - set(known)
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}")
        typed = {k: (bool(v) if known[k] == "bool" else float(v)) for k, v in changes.items()}
        return FaultConfig(**{**self.as_dict(), **typed})


class Faults:
    """The live configuration and the dice."""

    def __init__(self, config: FaultConfig, seed: int | None = None) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._random = random.Random(seed)

    @property
    def config(self) -> FaultConfig:
        return self._config

    def update(self, changes: dict[str, Any]) -> FaultConfig:
        with self._lock:
            self._config = self._config.updated(changes)
            return self._config

    def draw(self, *, api: bool, ranged: bool) -> Fault:
        """The fault for one request."""
        config = self._config
        if api and not config.api_faults:
            return Fault.NONE
        with self._lock:
            roll = self._random.random()
        for fault in Fault:
            if fault is Fault.NONE:
                continue
            roll -= config.rate(fault)
            if roll < 0:
                applicable = ranged and not api if fault in RANGE_FAULTS else True
                return fault if applicable else Fault.NONE
        return Fault.NONE

    def choice(self, options: tuple[Any, ...]) -> Any:
        with self._lock:
            return self._random.choice(options)
