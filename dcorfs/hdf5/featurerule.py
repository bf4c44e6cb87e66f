"""Which features a resource shows, and with how many events: dclab's rule, written once.

dclab (the field's reference library) shows a file's features as `features_innate`: every
dataset under `/events` (traces under `/events/trace`, `contour` as its group) except those
it takes for *defective*, whose stored values it does not trust and hides (computing the
feature anew where it can, e.g. `time` from `frame`). The checks are dclab's own
(`dclab/rtdc_dataset/fmt_hdf5/feat_defect.py`, `DEFECTIVE_FEATURES`), made here from the
same attributes; `tests/unit/test_featurerule.py` holds them equal to dclab's on files made to
trip each one. A dataset whose name dclab does not know (a plugin's feature) is shown all
the same: nothing stored is dropped.

A resource's event count is dclab's `len(ds)`: `experiment:event count`, else the length of
the first feature (by name) that has events. Each feature is shown with that many events:
one stored longer (e.g. `mask` with 20 frames in a file of 10 events, from an early dclab
writer) is cut to it, as dclab's exports cut it; one stored shorter keeps its own length
(nothing is made up). `features.tsv`, a table of events, holds the scalar features of
exactly that length.

The tree, the `.npy` files, `features.tsv` and the synthesized `.rtdc` all take a resource's
features from `RtdcResource.features`, made with `shown` below; `contour` (points of different
numbers per event) from `hdf5.contour.contour_of`, which applies the same rule of lengths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from .structure import CONTOUR, Feature

# what dclab's checks read besides the features: root attributes and the names of the logs
SOFTWARE = "setup:software version"
FRAME_RATE = "imaging:frame rate"
ROI_WIDTH = "imaging:roi size x"
FACT_ATTRS = (SOFTWARE, FRAME_RATE, ROI_WIDTH)  # the root attributes `file_facts` reads


@dataclass(frozen=True)
class FileFacts:
    """What dclab's defect checks look at in a file besides its features."""

    software: str = ""
    frame_rate: float = 0.0
    roi_width: float = 0.0
    logs: frozenset[str] = frozenset()


def file_facts(attrs: dict[str, object], logs: list[str]) -> FileFacts:
    """The facts of a file from its root attributes and the names of its logs."""

    def number(name: str) -> float:
        try:
            return float(attrs.get(name, 0) or 0)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return 0.0

    software = attrs.get(SOFTWARE, "")
    if isinstance(software, bytes):
        software = software.decode("utf-8", "replace")
    return FileFacts(
        software=software if isinstance(software, str) else "",
        frame_rate=number(FRAME_RATE),
        roi_width=number(ROI_WIDTH),
        logs=frozenset(logs),
    )


def checked(features: dict[str, Feature]) -> bool:
    """Whether any of these features is one dclab may take for defective (only then are
    the file's facts needed)."""
    return any(name in _CHECKS for name in features)


def innate(features: dict[str, Feature], facts: FileFacts) -> dict[str, Feature]:
    """The features of one file that dclab shows (its `features_innate`)."""
    return {name: f for name, f in features.items() if not _defective(name, features, facts)}


def shown(
    original: dict[str, Feature], condensed: dict[str, Feature], events: int
) -> dict[str, Feature]:
    """A resource's features: the original file's, then the condensed file's scalar features
    (what DCOR's condensing computed, e.g. a float64 `time` where the original's is
    defective) in place of the original's; each with `events` events (see the module note).
    Not `contour`, whose events have different lengths: it is shown as its points and
    offsets (`hdf5.contour.contour_of`), by the same rule of lengths."""
    merged = {name: at_most(f, events) for name, f in original.items() if name != CONTOUR}
    merged.update((f.name, at_most(f, events)) for f in condensed_scalars(condensed, events))
    return dict(sorted(merged.items()))


def condensed_scalars(condensed: dict[str, Feature], events: int) -> list[Feature]:
    """The condensed file's features a resource of `events` events takes from it: its scalar
    features with a value for every event (the condensed file is made from all of them)."""
    return [f for f in condensed.values() if f.scalar and f.shape[0] >= events]


def at_most(feature: Feature, events: int) -> Feature:
    """`feature` with at most `events` events (dclab's length: longer ones are cut)."""
    if feature.shape[0] <= events:
        return feature
    return replace(feature, shape=(events, *feature.shape[1:]))


def event_count(stated: int, features: dict[str, Feature]) -> int | None:
    """dclab's `len(ds)`: the stated count, else the length of the first feature by name
    that has events; None when none has. (Without a stated count dclab takes a trace's
    length as its number of traces, and skips names it does not know: here a trace counts
    with its events, and every feature counts.)"""
    if stated > 0:
        return stated
    for _, feature in sorted(features.items(), key=lambda item: _dclab_key(item[0])):
        if feature.shape[0]:
            return int(feature.shape[0])
    return None


def _dclab_key(name: str) -> str:
    return "trace" if name.startswith("trace/") else name


def _defective(name: str, features: dict[str, Feature], facts: FileFacts) -> bool:
    check = _CHECKS.get(name)
    return check is not None and check(features, facts)


def _aspect(features: dict[str, Feature], facts: FileFacts) -> bool:
    """Shape-In 2.0.6 and 2.0.7 cast `aspect` wrongly."""
    return facts.software in ("ShapeIn 2.0.6", "ShapeIn 2.0.7")


def _time(features: dict[str, Feature], facts: FileFacts) -> bool:
    """Shape-In stored `time` as float32 (or wrong); trusted only when it cannot be computed
    from `frame` and the frame rate, or when a dclab of 0.47.6 or later wrote it."""
    if "frame" not in features or not facts.frame_rate or "time" not in features:
        return False
    if features["time"].dtype == np.dtype("<f4"):
        return True
    if "ShapeIn" not in facts.software:
        return False
    return _last_dclab_older_than(facts.software, (0, 47, 6))


def _volume(features: dict[str, Feature], facts: FileFacts) -> bool:
    """dclab computed `volume` wrongly before 0.37.0 (unless fixed by a script, logged)."""
    if "dclab_issue_141" in facts.logs:
        return False
    return _last_dclab_older_than(facts.software, (0, 37, 0))


def _inert_ratio(features: dict[str, Feature], facts: FileFacts) -> bool:
    """An integer overflow for images wider than 500 pixels before dclab 0.48.3."""
    return facts.roi_width > 500 and _last_dclab_older_than(facts.software, (0, 48, 3))


def _inert_ratio_raw_cvx(features: dict[str, Feature], facts: FileFacts) -> bool:
    """As `_inert_ratio`, except where Shape-In 2.0.5 or later computed them."""
    if not _inert_ratio(features, facts):
        return False
    first = facts.software.split("|")[0].strip()
    if first.startswith("ShapeIn"):
        shapein = first.split()[1] if len(first.split()) > 1 else ""
    elif "shapein-acquisition" in facts.logs:
        shapein = first
    else:
        return True
    return _version(shapein) < _version("2.0.5")


_CHECKS = {
    "aspect": _aspect,
    "inert_ratio_cvx": _inert_ratio_raw_cvx,
    "inert_ratio_prnc": _inert_ratio,
    "inert_ratio_raw": _inert_ratio_raw_cvx,
    "tilt": _inert_ratio,
    "time": _time,
    "volume": _volume,
}


def _last_dclab_older_than(software: str, version: tuple[int, ...]) -> bool:
    """Whether the last program of the software pipeline ("ShapeIn 2.0.6 | dclab 0.46.0")
    is a dclab older than `version`."""
    last = software.rsplit("|", maxsplit=1)[-1].strip()
    if not last.startswith("dclab"):
        return False
    words = last.split()
    return len(words) > 1 and _version(words[1]) < _version(".".join(map(str, version)))


_PARTS = 6  # release numbers compared (dclab's and Shape-In's have three)
_RELEASE = re.compile(r"v?(\d+(?:\.\d+)*)(.*)")


def _version(text: str) -> tuple[int, ...]:
    """A version as comparable numbers: the release (padded with zeros), then 1 for a final
    or post release, 0 before it (a, b, rc, dev): as `packaging` orders versions that differ
    in these parts. Text that is no version sorts first."""
    found = _RELEASE.match(text.strip())
    if found is None:
        return ()
    release = [int(part) for part in found.group(1).split(".")][:_PARTS]
    release += [0] * (_PARTS - len(release))
    rest = found.group(2).lstrip(".-_").lower()
    final = not rest or rest.startswith(("post", "+"))
    return (*release, 1 if final else 0)
