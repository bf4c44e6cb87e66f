"""Ready-made data directories for the devserver: the demo instance and test layouts."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .sample import SampleSpec, write_processed, write_rtdc

DEMO_USER = "alice"


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_demo_data(
    root: Path,
    events: int = 5000,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Populate `root` with a small DCOR: two circles, public and private datasets, a
    collection, RT-DC and other resources. Returns the API token of the demo user, who is a
    member of the private circle."""
    token = secrets.token_hex(24)
    write_json(
        root / "dcor.json",
        {
            "site_title": "dcorfs demo DCOR",
            "users": {DEMO_USER: {"token": token, "circles": ["private-lab"]}},
            "collections": {
                "showcase": {
                    "title": "Showcase",
                    "description": "Measurements to try dcorfs with",
                }
            },
        },
    )
    lab = root / "demo-lab"
    write_json(lab / "circle.json", {"title": "Demo Lab", "description": "Public demo data"})
    hl60 = lab / "hl60-deformability"
    write_json(
        hl60 / "dataset.json",
        {
            "title": "HL60 deformability (synthetic)",
            "notes": "Synthetic RT-FDC measurements of HL60 cells made by dcorfs.",
            "authors": "dcorfs sample generator",
            "collections": ["showcase"],
            "tags": ["HL60", "deformability"],
        },
    )
    beads = lab / "calibration-beads"
    write_json(
        beads / "dataset.json",
        {"title": "Calibration beads (synthetic)", "collections": ["showcase"]},
    )
    private = root / "private-lab"
    write_json(private / "circle.json", {"title": "Private Lab"})
    study = private / "unpublished-study"
    write_json(
        study / "dataset.json",
        {"title": "Unpublished blood study (synthetic)", "private": True},
    )
    specs = [
        (hl60 / "M001_data.rtdc", SampleSpec(events=events, seed=1, sample="HL60 control")),
        (
            hl60 / "M002_data.rtdc",
            SampleSpec(
                events=max(10, events // 2),
                seed=2,
                run_index=2,
                sample="HL60 treated",
                traces=False,
                image_bg=True,
            ),
        ),
        (
            beads / "beads_M001.rtdc",
            SampleSpec(events=max(10, events // 5), seed=3, sample="beads", images=False),
        ),
        (study / "M001_data.rtdc", SampleSpec(events=max(10, events // 3), seed=4, sample="blood")),
    ]
    for number, (path, spec) in enumerate(specs, start=1):
        if progress is not None:
            progress(f"generating sample measurement {number}/{len(specs)}: {path.name}")
        write_rtdc(path, spec)
    pairs = lab / "hl60-dcnum"
    write_json(
        pairs / "dataset.json",
        {
            "title": "HL60 raw and dcnum-processed (synthetic)",
            "notes": "Raw uploads and the _dcn.rtdc files dcnum made of them: the processed "
            "files hold scalar features and read images from the raw ones (basins).",
        },
    )
    if progress is not None:
        progress("generating raw and dcnum-processed sample measurements")
    write_dcnum_pairs(pairs, events=max(10, events // 5), seed=5)
    (hl60 / "protocol.txt").write_text(
        "Measurement protocol\n1. Suspend cells in CellCarrierB.\n2. Measure at 0.06 µl/s.\n"
    )
    (hl60 / "analysis.csv").write_text("run,median_deform\n1,0.021\n2,0.034\n")
    return token


def flat_data(root: Path, count: int, spec: SampleSpec) -> list[Path]:
    """`count` small measurements directly in `root` (the devserver's flat mode)."""
    return [
        write_rtdc(
            root / f"M{i + 1:03d}_data.rtdc", replace(spec, seed=spec.seed + i, run_index=i + 1)
        )
        for i in range(count)
    ]


def write_dcnum_pairs(
    folder: Path, *, events: int, seed: int, mapped: bool = True, mapped_traces: bool = False
) -> list[Path]:
    """Raw measurements and their dcnum-processed `_dcn.rtdc` files in one dataset folder:
    `R001_data.rtdc` processed with identical segmentation (mapping `same`) and, if `mapped`,
    `R002_data.rtdc` re-segmented (a subset of its events, reordered and one repeated:
    mapped through `basinmap0`; with traces only if `mapped_traces`: dclab 0.73 cannot index
    them through a mapped basin). See `sample.write_processed` and doc/DCOR.md §3."""
    raw1 = write_rtdc(folder / "R001_data.rtdc", SampleSpec(events=events, seed=seed))
    written = [raw1, write_processed(raw1, folder / "R001_data_dcn.rtdc", seed=seed)]
    if mapped:
        raw2 = write_rtdc(
            folder / "R002_data.rtdc",
            SampleSpec(events=events, seed=seed + 1, run_index=2, traces=mapped_traces),
        )
        rng = np.random.default_rng(seed)
        keep = rng.permutation(events)[: max(2, events * 2 // 3)]
        keep = np.concatenate([keep[:1], keep])  # re-segmentation may find an event twice
        processed = write_processed(raw2, folder / "R002_data_dcn.rtdc", keep=keep, seed=seed)
        written += [raw2, processed]
    return written
