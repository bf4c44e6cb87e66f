"""The daemon's memory outside its own buffers: glibc's malloc arenas.

glibc gives a thread that finds the heap locked an arena of its own, up to eight per core; a
freed buffer stays in the arena of the thread that freed it and is reused only there. A mount's
many worker threads (doc/ARCHITECTURE.md, "Threads and pools") pass megabyte buffers between
one another (fetched in one, decoded in another, served by a third), so with the default the
daemon's RSS grows far past what its buffers hold: with 16 concurrent readers, 362–384 MB clean
and 495 MB under faults at 20,000 events; with two arenas 272–286 MB and 367 MB (benchmarks/run.py
row (g), A/B on this machine). Set before the daemon starts its threads.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)
M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)


def limit_arenas(arenas: int) -> bool:
    """At most `arenas` malloc arenas in this process (glibc); False where that cannot be set
    (another C library)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt here: malloc arenas left as they are")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, arenas))
