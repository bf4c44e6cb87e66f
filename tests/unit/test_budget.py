"""One memory limit shared out (cache/budget.py): the plan stays within the limit, and the
in-flight bound makes a holder wait for room (back-pressure), never forever."""

from __future__ import annotations

import threading
import time

import pytest

from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.budget import BASELINE, SMALLEST, InFlight, MemoryPlan
from dcorfs.cache.identity import ObjectId
from dcorfs.errors import DeadlineExceeded


@pytest.mark.parametrize("limit", [SMALLEST, 300 << 20, 1 << 30])
def test_the_plan_shares_out_what_the_limit_leaves(limit: int) -> None:
    plan = MemoryPlan.of(limit)
    parts = (plan.blocks, plan.decoded, plan.prefetch, plan.fetching, plan.decoding, plan.writing)
    assert all(part > 0 for part in parts)
    assert BASELINE + sum(parts) <= limit
    assert BASELINE + sum(parts) > limit * 0.99


def test_a_holder_waits_for_room_and_one_larger_than_the_limit_goes_alone() -> None:
    bound = InFlight(100)
    order: list[str] = []
    with bound.hold(80, deadline=time.monotonic() + 5, what="first"):

        def second() -> None:
            with bound.hold(50, deadline=time.monotonic() + 5, what="second"):
                order.append("second")

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        assert order == [] and bound.stats()["waits"] == 1  # waiting: 80 + 50 > 100
        order.append("first done")
    thread.join(5)
    assert order == ["first done", "second"]
    with bound.hold(500, deadline=time.monotonic() + 1, what="alone"):  # the limit: alone
        assert bound.stats()["used"] == 100
    assert bound.stats() == {"used": 0, "peak": 100, "limit": 100, "waits": 1}


def test_a_large_holder_is_not_passed_over_by_small_ones() -> None:
    """Three threads hold 10 each in turn, without pause; one that needs the whole limit
    gets it in its turn (first come, first served), long before its deadline."""
    bound = InFlight(100)
    stop = threading.Event()

    def small() -> None:
        while not stop.is_set():
            with bound.hold(10, deadline=time.monotonic() + 5, what="small"):
                time.sleep(0.005)

    threads = [threading.Thread(target=small) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    try:
        started = time.monotonic()
        with bound.hold(100, deadline=time.monotonic() + 2, what="large"):
            assert bound.stats()["used"] == 100
        assert time.monotonic() - started < 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    assert bound.stats()["used"] == 0


def test_a_holder_that_finds_no_room_by_its_deadline_fails() -> None:
    bound = InFlight(100)
    with bound.hold(90, deadline=time.monotonic() + 5, what="first"):
        started = time.monotonic()
        with (
            pytest.raises(DeadlineExceeded, match="no memory free"),
            bound.hold(20, deadline=time.monotonic() + 0.3, what="late"),
        ):
            pass
        assert time.monotonic() - started >= 0.3
    assert bound.stats()["used"] == 0


def test_concurrent_fetches_hold_no_more_than_the_bound() -> None:
    """16 readers of different blocks through one BlockCache: the bytes held by fetches in
    flight never exceed the bound (each fetch is two blocks: one holds 2 × 4 KiB)."""
    bound = InFlight(3 * 2 * 4096)
    peak_seen = 0
    lock = threading.Lock()

    def fetch(obj: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        nonlocal peak_seen
        with lock:
            peak_seen = max(peak_seen, bound.stats()["used"])
        time.sleep(0.02)
        return bytes(stop - start)

    cache = BlockCache(
        fetch=fetch, store=None, block_size=2048, max_fetch_bytes=4096, in_flight=bound
    )
    obj = ObjectId(key="k", etag="e", size=16 * 4096)
    deadline = time.monotonic() + 30
    threads = [
        threading.Thread(
            target=cache.read, args=(obj, i * 4096, (i + 1) * 4096), kwargs={"deadline": deadline}
        )
        for i in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    cache.close()
    stats = bound.stats()
    assert stats["used"] == 0 and stats["waits"] > 0
    assert 0 < peak_seen <= bound.limit and stats["peak"] <= bound.limit
