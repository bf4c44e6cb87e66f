"""dclab's rule for the features a file shows (`dcorfs.hdf5.featurerule`), held equal to dclab's own
on files made to trip each of its defect checks, and its event count."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace
from pathlib import Path

import dclab
import h5py
import numpy as np
import pytest
from dclab.external.packaging import parse as dclab_version

from dcorfs.hdf5.featurerule import _version, at_most, event_count, file_facts, innate, shown
from dcorfs.hdf5.structure import Feature, member_names, read_attributes, read_features

SOFTWARE = [
    "",
    "ShapeIn 2.0.6",
    "ShapeIn 2.0.7",
    "ShapeIn 2.0.4",
    "ShapeIn 2.2.1 | dclab 0.46.0",
    "ShapeIn 2.2.1 | dclab 0.47.6",
    "ShapeIn 2.0.1 | dclab 0.36.1",
    "dclab 0.48.2",
    "dclab 0.48.3",
    "dclab 0.48.3.dev2",
    "2.4.2 | dclab 0.48.0",
    "CytoShot 1.0 | dclab 0.37.0rc1",
    "dclab 0.62.0",
]
SCALARS = ("aspect", "frame", "inert_ratio_cvx", "inert_ratio_prnc", "inert_ratio_raw", "tilt")


def write(path: Path, software: str, *, time: str, roi: int, rate: float, logs: list[str]) -> None:
    with h5py.File(path, "w") as h5:
        h5.attrs["experiment:event count"] = 4
        h5.attrs["imaging:roi size x"] = roi
        h5.attrs["imaging:frame rate"] = rate
        h5.attrs["setup:software version"] = software
        for name in (*SCALARS, "volume", "deform"):
            h5[f"events/{name}"] = np.arange(4, dtype=np.float64)
        if time:
            h5["events/time"] = np.arange(4, dtype=time)
        for name in logs:
            h5[f"logs/{name}"] = np.array([b"line"])


def ours(path: Path) -> set[str]:
    with h5py.File(path, "r") as h5:
        found = read_features(h5.id, kind="resource", where=path.name)
        facts = file_facts(
            read_attributes(h5.id, "/", where=path.name), member_names(h5.id, "logs")
        )
    return set(innate(found, facts))


def dclabs(path: Path) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with dclab.new_dataset(path) as ds:
            return set(ds.features_innate)


def test_the_defect_checks_agree_with_dclab(tmp_path: Path) -> None:
    hidden = 0
    cases = itertools.product(
        SOFTWARE, ("f4", "f8", ""), (250, 600), (0.0, 3000.0), ([], ["dclab_issue_141"])
    )
    for i, (software, time, roi, rate, logs) in enumerate(cases):
        path = tmp_path / f"case-{i}.rtdc"
        write(path, software, time=time, roi=roi, rate=rate, logs=logs)
        expected = dclabs(path)
        assert ours(path) == expected, (software, time, roi, rate, logs)
        hidden += len(
            {"time", "volume", *SCALARS, "deform"} - expected - (set() if time else {"time"})
        )
        path.unlink()
    assert hidden > 100  # the cases do trip the checks


def test_shapein_acquisition_log_marks_shapein_without_its_name(tmp_path: Path) -> None:
    path = tmp_path / "m.rtdc"
    for software in ("2.0.4 | dclab 0.48.0", "2.0.6 | dclab 0.48.0"):
        write(path, software, time="f8", roi=600, rate=0.0, logs=["shapein-acquisition"])
        assert ours(path) == dclabs(path), software


@pytest.mark.parametrize(
    "text",
    [
        "0.47.6",
        "0.47.5",
        "0.47.10",
        "0.47",
        "0.47.0",
        "0.47.6.dev3",
        "0.47.6rc1",
        "0.47.6.post1",
        "0.48.3+g12ab",
        "1.0",
        "0.9.99",
        "2.0.5",
        "2.0.4.1",
        "0.47.0.5",
    ],
)
def test_versions_order_as_dclab_orders_them(text: str) -> None:
    for other in ("0.47.6", "0.37.0", "0.48.3", "2.0.5", "0.47"):
        assert (_version(text) < _version(other)) == (dclab_version(text) < dclab_version(other))


def feature(name: str, length: int, *rest: int) -> Feature:
    return Feature(name=name, dtype=np.dtype("<f4"), shape=(length, *rest), source="resource")


def test_features_are_cut_to_the_event_count_and_shorter_ones_kept() -> None:
    original = {"mask": feature("mask", 20, 8, 8), "deform": feature("deform", 10)}
    original["area_um"] = feature("area_um", 7)
    condensed = {
        name: replace(feature(name, n, *rest), source="condensed")
        for name, n, rest in (("deform", 12, ()), ("volume", 10, ()), ("image", 10, (8, 8)))
    }
    made = shown(original, condensed, 10)
    assert {n: f.shape[0] for n, f in made.items()} == {
        "area_um": 7,
        "deform": 10,
        "mask": 10,
        "volume": 10,
    }
    assert made["mask"].shape == (10, 8, 8)
    assert made["deform"].source == made["volume"].source == "condensed"  # the condensed's
    assert made["mask"].source == "resource"  # not a scalar: the original's
    assert at_most(original["area_um"], 10) is original["area_um"]


def test_event_count_is_dclabs_length(tmp_path: Path) -> None:
    path = tmp_path / "m.rtdc"
    with h5py.File(path, "w") as h5:
        h5["events/area_um"] = np.zeros(0)
        h5["events/deform"] = np.zeros(6)
        h5["events/mask"] = np.zeros((9, 2, 2), bool)
        h5["events/trace/fl1_raw"] = np.zeros((6, 3))
    with h5py.File(path, "r") as h5:
        found = read_features(h5.id, kind="resource", where="m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with dclab.new_dataset(path) as ds:
            assert event_count(0, found) == len(ds) == 6
    assert event_count(5, found) == 5
    assert event_count(0, {}) is None
