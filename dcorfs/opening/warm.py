"""Warming: values and files brought into the cache before a reader asks for them, in the
background (the policy, what and how much: `cache.prefetch`).

A resource's scalar features: their values made (decoded, or read from the disk cache) side by
side, once, when all of them are small enough; as soon as the condensed file is described
(what it serves is then published to waiting readers, `served_early`) or on the first open of
a scalar feature's file. A small condensed file: fetched whole on the first read of one of its
features.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time

from ..cache import prefetch
from ..cache.blockcache import BlockCache
from ..cache.derived import DerivedCache
from ..cache.identity import ObjectId
from ..errors import DcorfsError
from ..hdf5.rtdc import RtdcResource, RtdcSource, condensed_features, register_rows
from ..hdf5.structure import Feature

log = logging.getLogger(__name__)
Served = dict[str, tuple[Feature, ObjectId]]  # feature name -> (feature, its values)


class Warmer:
    """Warms values and files of one mount in its `warm` pool."""

    def __init__(
        self,
        *,
        cache: BlockCache,
        derived: DerivedCache,
        pool: concurrent.futures.Executor,
        timeout: float,
    ) -> None:
        self._cache = cache
        self._derived = derived
        self._warm = pool
        self._timeout = timeout
        self._lock = threading.Lock()
        self._warming: set[ObjectId] = set()  # values warmed (or being warmed)

    def _deadline(self) -> float:
        return time.monotonic() + self._timeout

    def fetch_whole_later(self, obj: ObjectId) -> None:
        """Fetch the whole object into the cache, in the background."""
        with contextlib.suppress(RuntimeError):  # shut down: the mount is closing
            self._warm.submit(self._fetch_whole, obj)

    def warm_scalars(self, resource: RtdcResource) -> None:
        """Bring the values of every scalar feature of `resource` into memory in the
        background, once, when they are small enough: what the disk cache holds read in
        parallel, in one task, the others decoded side by side."""
        self.warm_objects([resource.rows_object(f.name) for f in resource.scalar_features()])

    def warm_condensed(
        self,
        early: concurrent.futures.Future[Served | None],
        made: concurrent.futures.Future[RtdcSource],
        *,
        events: int,
    ) -> None:
        """As soon as the condensed file is described (called when that is done, in any
        thread), the features it serves are known (`served_early`): side by side with
        describing the original, which the listing of a resource directory waits for (it
        names the original's features too). Their values are warmed (`warm_objects`) once a
        reader looks for one of them (`Resources.served_early`), not here: a resource opened
        ahead of readers (a listed dataset's, for `ls -lR`) may never be read."""
        if made.cancelled() or made.exception() is not None:
            publish(early, None)
            return  # reported by whoever waits for it
        source = made.result()
        served = {
            f.name: (f, register_rows(self._derived, source, f))
            for f in condensed_features(source, events)
        }
        publish(early, served)

    def warm_objects(self, objects: list[ObjectId]) -> None:
        if not prefetch.warm_together(sum(obj.size for obj in objects)):
            return
        with self._lock:  # each once (a resource's scalars are warmed from two places)
            objects = [obj for obj in objects if obj not in self._warming]
            self._warming.update(objects)
        if not objects:
            return
        try:
            self._warm.submit(self._warm_values, objects)
        except RuntimeError:  # shut down: the mount is closing
            log.debug("not warming %d objects: closing", len(objects))

    def _warm_values(self, objects: list[ObjectId]) -> None:
        for obj in self._derived.recall_stored(objects):
            self._warm.submit(self._ensure_values, obj)

    def _ensure_values(self, obj: ObjectId) -> None:
        try:
            self._derived.ensure(obj, [(0, obj.size)], deadline=self._deadline())
        except DcorfsError as exc:
            log.debug("warming %s: %s", obj.key, exc)

    def _fetch_whole(self, obj: ObjectId) -> None:
        try:
            self._cache.ensure(obj, [(0, obj.size)], deadline=self._deadline())
        except DcorfsError as exc:
            log.debug("prefetch of %s: %s", obj.key, exc)


def publish(early: concurrent.futures.Future[Served | None], served: Served | None) -> None:
    """Give an opening attempt's `early` future its answer (once; a later attempt has its own)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        early.set_result(served)
