"""The HDF5 work of listing many small resources, alone: a floor for row (f).

Per resource, what the mount does with h5py to list it: the structure of its original and of
its condensed file read from their bytes in memory with dcorfs' own readers (every feature's
dtype and shape, the attributes of each feature from the file its values come from, the
root's attributes, logs and tables), then the structure of its synthesized `.rtdc` written with
dcorfs' own builder (`hdf5.skeleton.build`), whose size the listing shows. No FUSE, HTTP,
caches, threads or remembering: the CPU work that remains when all of that is free. Timed one
resource after another in one process, and spread over processes on all cores. Made for the
benchmark's small resources (scalar features only): it does not pick features as dclab shows
them (`featurerule`), nor lay out a contour's per-event datasets, as the mount does. The
datasets it writes are those the mount writes (`rtdc_file.specs`).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time
from collections.abc import Sequence

import hdf5plugin  # noqa: F401  (logs and tables may be Zstd-compressed)
from h5py._objects import phil

from dcorfs.fs.producers.rtdc_file import specs
from dcorfs.hdf5.rtdc import Outline
from dcorfs.hdf5.skeleton import build
from dcorfs.hdf5.structure import (
    CONTOUR,
    GROUPS,
    file_image,
    read_arrays,
    read_attributes,
    read_features,
)


def restructure(pair: tuple[bytes, bytes]) -> int:
    """The size of the synthesized file of a resource with these (original, condensed)
    bytes, learned as the mount learns it."""
    original = file_image(pair[0])
    try:
        condensed = file_image(pair[1])
    except BaseException:
        original.close()
        raise
    try:
        with phil:
            own = read_features(original, kind="resource", where="original")
            made = read_features(condensed, kind="condensed", where="condensed")
            features = own | made  # the condensed file's values (and attributes) win
            attrs = {
                name: read_attributes(
                    condensed if name in made else original, "events/" + name, where=""
                )
                for name in features
                if name != CONTOUR
            }
            root = read_attributes(original, "/", where="original")
            arrays = {group: read_arrays(original, group, where="original") for group in GROUPS}
    finally:
        original.close()
        condensed.close()
    outline = Outline(attrs=root, feature_attrs=attrs, logs=arrays["logs"], tables=arrays["tables"])
    groups = ["events", *(group for group, found in arrays.items() if found is not None)]
    return build(root, specs(features, outline), groups).size


def _ready(_: int) -> int:
    return os.getpid()


def structure_floor(pairs: Sequence[tuple[bytes, bytes]], processes: int) -> float:
    """Seconds to `restructure` every pair: in this process (1), or in that many processes
    (started, and their imports done, before the clock starts)."""
    if processes <= 1:
        started = time.perf_counter()
        for pair in pairs:
            restructure(pair)
        return time.perf_counter() - started
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        list(pool.map(_ready, range(processes * 4)))
        started = time.perf_counter()
        list(pool.map(restructure, pairs, chunksize=max(1, len(pairs) // (processes * 8))))
        return time.perf_counter() - started
