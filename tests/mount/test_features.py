"""Every feature dclab shows, through a real mount, for every generated variant and every field
file: the `.npy` files, the synthesized `.rtdc` and `features.tsv` equal dclab's values of the
source file (README "Formats", `dcorfs.hdf5.featurerule`).

Variants: Zstd (dclab's default), gzip and uncompressed files, image/mask stored longer than the
event count (an early dclab writer), a Shape-In 2.0.6 file whose `aspect` and float32 `time`
dclab takes for defective, contour-only and contour+mask files; the field fixtures when present.
Contours are checked as `contour/points.npy` + `offsets.npy` and in the synthesized file. Served
with DCOR's condensed files and without them (`--no-condensed`: then a resource shows exactly
dclab's `features_innate`, as these files hold no dataset dclab does not know).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dclab
import dclab.definitions as dfn
import numpy as np
import pandas as pd
import polars as pl
import pytest

from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.devserver.server import DevServer
from dcorfs.devserver.site import SiteOptions

from ..conftest import FIXTURE_FILES, info, innate_features, resource_dir, write_json
from ..mounts import mounted, needs_fuse

pytestmark = [
    needs_fuse,
    pytest.mark.fuse,
    pytest.mark.filterwarnings("ignore::dclab.rtdc_dataset.config.WrongConfigurationTypeWarning"),
]

VARIANTS = {
    "zstd": SampleSpec(events=60, seed=51, image_bg=True),
    "gzip": SampleSpec(events=50, seed=52, compression="gzip"),
    "plain": SampleSpec(events=40, seed=53, compression="none", traces=False),
    "overlong": SampleSpec(events=30, seed=54, overlong=7, image_bg=True, traces=False),
    "shapein": SampleSpec(events=30, seed=55, shapein_legacy=True, images=False),
    "contour-only": SampleSpec(events=30, seed=56, images=False, contour=True, traces=False),
    "contour-mask": SampleSpec(events=20, seed=57, contour=True, compression="gzip"),
}


@pytest.fixture(scope="module")
def variants_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("variants-data")
    dataset = root / "public-lab" / "variants"
    write_json(dataset / "dataset.json", {"title": "Every kind of file"})
    for name, spec in VARIANTS.items():
        write_rtdc(dataset / f"{name}.rtdc", spec)
    for path in FIXTURE_FILES:
        (dataset / path.name).symlink_to(path)
    return root


@contextmanager
def serving(data: Path, tmp: Path, options: SiteOptions) -> Iterator[tuple[Path, list[Any]]]:
    with (
        DevServer(data, options=options) as server,
        mounted(tmp / "mnt", server.url, tmp / "cache") as mnt,
    ):
        entries = [e for e in info(server) if e["rtdc"]]
        assert len(entries) == len(VARIANTS) + len(FIXTURE_FILES)
        yield mnt, entries


@pytest.fixture(scope="module")
def with_condensed(
    variants_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, list[Any]]]:
    with serving(variants_dir, tmp_path_factory.mktemp("condensed"), SiteOptions()) as found:
        yield found


@pytest.fixture(scope="module")
def without_condensed(
    variants_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, list[Any]]]:
    options = SiteOptions(condensed=False)
    with serving(variants_dir, tmp_path_factory.mktemp("original"), options) as found:
        yield found


@contextmanager
def source(path: str | Path) -> Iterator[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with dclab.new_dataset(path) as ds:
            yield ds


def values(ds: Any, name: str) -> np.ndarray:
    """dclab's values of a feature (`trace/<name>` for a trace), cut to its event count."""
    data = ds["trace"][name.split("/", 1)[1]] if name.startswith("trace/") else ds[name]
    return np.asarray(data[: len(ds)])


def feature_files(directory: Path) -> dict[str, Path]:
    files = {p.stem: p for p in directory.glob("*.npy")}
    files.update({f"trace/{p.stem}": p for p in (directory / "trace").glob("*.npy")})
    return files


def equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def check_contour(directory: Path, ds: Any) -> int:
    """`contour/points.npy` and `offsets.npy` hold every event's contour as dclab reads it."""
    if "contour" not in ds.features_innate:
        assert not (directory / "contour").exists()
        return 0
    points = np.load(directory / "contour" / "points.npy")
    offsets = np.load(directory / "contour" / "offsets.npy")
    assert offsets.dtype == np.int64 and len(offsets) == len(ds) + 1 and offsets[0] == 0
    for i in range(len(ds)):
        same = equal(points[offsets[i] : offsets[i + 1]], np.asarray(ds["contour"][i]))
        assert same, f"contour of event {i}"
    return 1


def check_npy_files(mnt: Path, entries: list[Any], *, exactly_innate: bool) -> int:
    checked = 0
    for entry in entries:
        directory = resource_dir(mnt, entry)
        files = feature_files(directory)
        with source(entry["path"]) as ds:
            innate = innate_features(ds)
            checked += check_contour(directory, ds)
            if exactly_innate:
                assert set(files) == innate, entry["name"]
            else:
                assert innate <= set(files), f"{entry['name']}: missing {innate - set(files)}"
            for name, path in files.items():
                expected = values(ds, name)
                for loaded in (np.load(path), np.load(path, mmap_mode="r")):
                    same = equal(np.asarray(loaded), expected)
                    assert same, f"{entry['name']}: {name} differs from dclab's"
                    if name in innate:
                        assert loaded.dtype == expected.dtype, (entry["name"], name)
                checked += 1
    return checked


def test_every_feature_file_equals_dclabs_values(with_condensed: tuple[Path, list[Any]]) -> None:
    assert check_npy_files(*with_condensed, exactly_innate=False) > 200


def test_without_condensed_files_a_resource_shows_exactly_dclabs_innate_features(
    without_condensed: tuple[Path, list[Any]],
) -> None:
    assert check_npy_files(*without_condensed, exactly_innate=True) > 150


def test_defective_and_overlong_features_as_dclab_shows_them(
    with_condensed: tuple[Path, list[Any]], without_condensed: tuple[Path, list[Any]]
) -> None:
    for mnt, entries in (with_condensed, without_condensed):
        by_name = {e["name"]: e for e in entries}
        shapein = resource_dir(mnt, by_name["shapein.rtdc"])
        overlong = resource_dir(mnt, by_name["overlong.rtdc"])
        with source(by_name["shapein.rtdc"]["path"]) as ds:
            assert "time" not in ds.features_innate  # dclab computes it anew
            if mnt == with_condensed[0]:  # DCOR's condensed file holds dclab's time
                assert np.load(shapein / "time.npy").dtype == np.float64
            else:
                assert not (shapein / "time.npy").exists()
        for name in ("image", "mask", "image_bg"):
            assert np.load(overlong / f"{name}.npy", mmap_mode="r").shape[0] == 30


def test_the_synthesized_file_read_by_dclab_equals_the_source(
    with_condensed: tuple[Path, list[Any]],
) -> None:
    mnt, entries = with_condensed
    checked = 0
    for entry in entries:
        directory = resource_dir(mnt, entry)
        with source(entry["path"]) as ds, source(directory / f"{directory.name}.rtdc") as ours:
            assert len(ours) == len(ds)
            innate = innate_features(ds)
            assert innate <= innate_features(ours), entry["name"]
            for name in sorted(innate_features(ours)):
                same = equal(values(ours, name), values(ds, name))
                assert same, f"{entry['name']}: {name} of the synthesized file differs"
                checked += 1
            if "contour" in ds.features_innate:
                assert "contour" in ours.features_innate, entry["name"]
                for i in range(len(ds)):
                    same = equal(np.asarray(ours["contour"][i]), np.asarray(ds["contour"][i]))
                    assert same, f"{entry['name']}: contour {i} of the synthesized file"
                checked += 1
    assert checked > 200


def test_features_tsv_columns_by_name_equal_dclabs_values(
    with_condensed: tuple[Path, list[Any]], without_condensed: tuple[Path, list[Any]]
) -> None:
    for mnt, entries in (with_condensed, without_condensed):
        for entry in entries:
            directory = resource_dir(mnt, entry)
            table = pd.read_csv(directory / "features.tsv", sep="\t")
            text = (directory / "features.tsv").read_bytes()
            named = np.genfromtxt(io.BytesIO(text), delimiter="\t", names=True, ndmin=1)
            with source(entry["path"]) as ds:
                scalars = {n for n in innate_features(ds) if dfn.scalar_feature_exists(n)}
                assert scalars <= set(table.columns), entry["name"]
                for name in table.columns:
                    expected = values(ds, name)
                    # printed to round-trip exactly: parsed back, the stored values
                    parsed = table[name].to_numpy().astype(expected.dtype)
                    assert equal(parsed, expected), f"{entry['name']}: column {name}"
                    assert equal(named[name].astype(expected.dtype), expected), name


R_SCRIPT = """
args <- commandArgs(trailingOnly = TRUE)
table <- read.delim(args[1])
out <- file(args[2], "wb")
for (name in strsplit(args[3], ",")[[1]]) writeBin(as.numeric(table[[name]]), out, size = 8)
close(out)
"""


def assert_r_reads(script: str, path: Path, ds: Any, names: list[str], out: Path) -> None:
    """R `script` (args: the file, an output file, the names) writes each named column as
    float64; each equals dclab's values in the stored dtype."""
    subprocess.run(
        ["Rscript", "-e", script, str(path), str(out), ",".join(names)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    read = np.fromfile(out, dtype="<f8").reshape(len(names), -1)
    for name, column in zip(names, read, strict=True):
        expected = values(ds, name)
        assert equal(column.astype(expected.dtype), expected), f"R read {name} of {path.name}"


@pytest.mark.skipif(shutil.which("Rscript") is None, reason="R is not installed (r-base-core)")
def test_features_tsv_is_read_by_column_name_in_r_and_polars(
    with_condensed: tuple[Path, list[Any]], tmp_path: Path
) -> None:
    mnt, entries = with_condensed
    for entry in entries:
        directory = resource_dir(mnt, entry)
        tsv = directory / "features.tsv"
        with source(entry["path"]) as ds:
            names = sorted(n for n in innate_features(ds) if dfn.scalar_feature_exists(n))
            frame = pl.read_csv(tsv, separator="\t")
            for name in names:
                expected = values(ds, name)
                assert equal(frame[name].to_numpy().astype(expected.dtype), expected), name
            assert_r_reads(R_SCRIPT, tsv, ds, names, tmp_path / f"{entry['id']}.f64")


HDF5R_SCRIPT = """
library(hdf5r)
args <- commandArgs(trailingOnly = TRUE)
file <- H5File$new(args[1], mode = "r")
out <- file(args[2], "wb")
for (name in strsplit(args[3], ",")[[1]]) {
  writeBin(as.numeric(file[[paste0("events/", name)]]$read()), out, size = 8)
}
close(out)
file$close_all()
"""


def hdf5r_missing() -> str:
    if shutil.which("Rscript") is None:
        return "R is not installed (r-base-core)"
    probe = subprocess.run(
        ["Rscript", "-e", "library(hdf5r)"], capture_output=True, timeout=120, check=False
    )
    return "" if probe.returncode == 0 else "R's hdf5r is not installed (r-cran-hdf5r)"


def test_the_synthesized_file_is_read_by_r_hdf5r(
    with_condensed: tuple[Path, list[Any]], tmp_path: Path
) -> None:
    """R's hdf5r reads scalar features of the synthesized .rtdc equal to dclab's values."""
    missing = hdf5r_missing()
    if missing:
        pytest.skip(missing)
    mnt, entries = with_condensed
    for entry in entries:
        directory = resource_dir(mnt, entry)
        with source(entry["path"]) as ds:
            names = sorted(
                n
                for n in innate_features(ds)
                if dfn.scalar_feature_exists(n) and ds[n].dtype.kind in "fiu"
            )
            synthesized = directory / f"{directory.name}.rtdc"
            assert_r_reads(HDF5R_SCRIPT, synthesized, ds, names, tmp_path / f"{entry['id']}.f64")
