"""The worker pools of a mount's opening and tree work, made once by the wiring (sizes from
`MountSettings`) and shut down at unmount (doc/ARCHITECTURE.md, "Threads and pools").
Each kind of work has a pool of its own, so none queues behind another; work in a pool must
not wait for other work of the same pool.
"""

from __future__ import annotations

import concurrent.futures


class Pools:
    """`warm`: values and files warmed ahead; `ask`: API questions of one opening side by
    side; `prepare`: resources opened ahead of readers (a listed dataset's); `build`:
    synthesized files' structure (CPU work, apart from network work); `ahead`: the same,
    for resources opened ahead of readers (a reader's build never queues behind them);
    `listing`: resource directory listings, and openings of resources, a reader waits for
    (not behind `prepare`)."""

    def __init__(
        self,
        *,
        warm: int = 4,
        ask: int = 8,
        prepare: int = 8,
        build: int = 2,
        ahead: int = 2,
        listing: int = 4,
    ) -> None:
        def pool(size: int, name: str) -> concurrent.futures.ThreadPoolExecutor:
            return concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix=name)

        self.warm = pool(warm, "warm")
        self.ask = pool(ask, "ask")
        self.prepare = pool(prepare, "prepare")
        self.build = pool(build, "build")
        self.ahead = pool(ahead, "build-ahead")
        self.listing = pool(listing, "listing")

    def close(self) -> None:
        for made in (self.warm, self.ask, self.prepare, self.build, self.ahead, self.listing):
            made.shutdown(wait=False, cancel_futures=True)
