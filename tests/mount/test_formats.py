"""The files for programs beyond Python, read by those programs through a real mount (README
"From Fiji, R, MATLAB, FlowJo"): `image.tif`, `mask.tif`, `image_bg.tif` by tifffile, libtiff's
`tiffinfo` and ImageJ 1.x (headless, under `xvfb-run`), `features.fcs` by flowio and against
dclab's own FCS export. Resources: the generated variants of `test_features` and every field
file with images (when present); a 100,000-event resource for ImageJ's virtual stack.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dclab.definitions as dfn
import numpy as np
import pytest

from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.devserver.server import DevServer
from dcorfs.devserver.site import SiteOptions

from ..conftest import info, resource_dir, write_json
from ..mounts import mounted, needs_fuse
from .test_features import equal, source, values, variants_dir, with_condensed

pytestmark = [
    needs_fuse,
    pytest.mark.fuse,
    pytest.mark.filterwarnings("ignore::dclab.rtdc_dataset.config.WrongConfigurationTypeWarning"),
]

__all__ = ["variants_dir", "with_condensed"]  # module fixtures of test_features, reused

STACKS = ("image", "mask", "image_bg")
needs_imagej = pytest.mark.skipif(
    shutil.which("imagej") is None or shutil.which("xvfb-run") is None,
    reason="ImageJ is not installed (Debian imagej, xvfb)",
)


def stack_values(ds: Any, name: str) -> np.ndarray:
    """dclab's values of an image feature as the stack holds them (mask as 0/255)."""
    data = values(ds, name)
    return data.astype(np.uint8) * np.uint8(255) if name == "mask" else data


def pixel_size(ds: Any) -> float:
    return float(ds.config["imaging"]["pixel size"])


def stacks(mnt: Path, entries: list[Any]) -> Iterator[tuple[dict[str, Any], str, Path]]:
    """(entry, feature, path) of every stack the mount should show: one per image feature."""
    for entry in entries:
        directory = resource_dir(mnt, entry)
        with source(entry["path"]) as ds:
            shown = {n for n in STACKS if n in ds.features_innate}
        assert {p.stem for p in directory.glob("*.tif")} == shown, entry["name"]
        for name in sorted(shown):
            yield entry, name, directory / f"{name}.tif"


def test_tiff_stacks_read_by_tifffile_equal_dclabs_images(
    with_condensed: tuple[Path, list[Any]],
) -> None:
    import tifffile

    mnt, entries = with_condensed
    checked = 0
    for entry, name, path in stacks(mnt, entries):
        npy = np.load(path.with_suffix(".npy"))
        with source(entry["path"]) as ds, tifffile.TiffFile(path) as tif:
            expected = stack_values(ds, name)
            assert tif.is_imagej and not tif.is_bigtiff
            series = tif.series[0].asarray()
            assert series.shape == expected.shape and series.dtype == np.uint8
            assert equal(series, expected), f"{entry['name']}: {name}.tif"
            assert equal(series, npy * np.uint8(255) if name == "mask" else npy)
            assert len(tif.pages) == len(expected)
            for k in (0, len(expected) // 2, len(expected) - 1):  # pages on their own
                assert equal(tif.pages[k].asarray(), expected[k])
            assert tif.imagej_metadata["images"] == len(expected)
            assert tif.imagej_metadata["unit"] == "micron"
            first = tif.pages[0]
            num, den = first.tags["XResolution"].value
            assert first.tags["ResolutionUnit"].value == 1
            assert den / num == pytest.approx(pixel_size(ds), rel=1e-6)
            # all IFDs come before the pixels, which are contiguous in event order
            offsets = [p.dataoffsets[0] for p in tif.pages]
            assert max(p.offset for p in tif.pages) < offsets[0]
            assert offsets == [offsets[0] + k * expected[0].size for k in range(len(expected))]
            assert path.stat().st_size == offsets[-1] + expected[0].size
        checked += 1
    assert checked >= 6


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


def test_a_stack_is_served_from_the_decoded_values_of_the_npy_file(
    variants_dir: Path, tmp_path: Path
) -> None:
    """No second fetch, no second decode, no second copy in the cache: once image.npy is read,
    image.tif fetches nothing and the cache does not grow by its pixels."""
    cache = tmp_path / "cache"
    with (
        DevServer(variants_dir) as server,
        mounted(tmp_path / "mnt", server.url, cache) as mnt,
    ):
        (entry,) = [e for e in info(server) if e["name"] == "zstd.rtdc"]
        directory = resource_dir(mnt, entry)
        npy = (directory / "image.npy").read_bytes()
        pixels = np.load(directory / "image.npy", mmap_mode="r").nbytes
        before = cache_bytes(cache)
        server.stats.reset()
        tif = (directory / "image.tif").read_bytes()
        assert server.stats.snapshot()["object_bytes"] == 0
        assert tif.endswith(npy[-pixels:]) and len(tif) == (directory / "image.tif").stat().st_size
        assert cache_bytes(cache) - before < pixels / 4, (before, cache_bytes(cache), pixels)


@pytest.mark.skipif(shutil.which("tiffinfo") is None, reason="libtiff-tools is not installed")
def test_tiffinfo_lists_every_page(with_condensed: tuple[Path, list[Any]]) -> None:
    mnt, entries = with_condensed
    for entry, name, path in stacks(mnt, entries):
        pages = np.load(path.with_suffix(".npy"), mmap_mode="r").shape[0]
        run = subprocess.run(
            ["tiffinfo", str(path)], check=False, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0 and not run.stderr.strip(), (entry["name"], run.stderr)
        assert run.stdout.count("TIFF Directory at offset") == pages, (entry["name"], name)


# Opens the stack (plain, or as a virtual stack), prints its slice count, its scale and, for
# the first, middle and last slice, the sum of its pixels and three of them. The loop step is
# a variable: an expression as a `for` increment silently stops a macro in ImageJ 1.x.
MACRO = """
args = split(getArgument(), "|");
if (args[1] == "virtual") run("TIFF Virtual Stack...", "open=[" + args[0] + "]");
else open(args[0]);
print("nSlices=" + nSlices + " virtual=" + is("Virtual Stack"));
getPixelSize(unit, pw, ph);
print("pixel=" + d2s(pw, 9) + " " + d2s(ph, 9) + " unit=" + unit);
step = maxOf(1, floor((nSlices - 1) / 2));
for (i = 1; i <= nSlices; i += step) {
    setSlice(i);
    getRawStatistics(n, mean);
    w = getWidth() - 1; h = getHeight() - 1;
    print("slice=" + i + " sum=" + d2s(n * mean, 0) + " px=" + getPixel(0, 0) + ","
        + getPixel(w, h) + "," + getPixel(floor(w / 2), floor(h / 2)));
}
"""


def imagej(macro: str, argument: str, tmp: Path) -> str:
    """The log of ImageJ 1.x running `macro` headless with `argument`. (Debian's `imagej`
    wrapper exits with 1 whatever happened: the log tells.)"""
    path = tmp / "macro.ijm"
    path.write_text(macro)
    run = subprocess.run(
        ["xvfb-run", "-a", "imagej", "-b", str(path), argument],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "nSlices=" in run.stdout, run.stdout + run.stderr
    assert "Exception" not in run.stdout + run.stderr, run.stdout + run.stderr
    return run.stdout


def expected_slices(stack: np.ndarray) -> list[str]:
    """What MACRO prints of the slices of a stack of these images."""
    n, h, w = stack.shape
    step = max(1, (n - 1) // 2)
    lines = []
    for i in range(1, n + 1, step):
        image = stack[i - 1].astype(np.int64)
        px = f"{image[0, 0]},{image[h - 1, w - 1]},{image[(h - 1) // 2, (w - 1) // 2]}"
        lines.append(f"slice={i} sum={image.sum()} px={px}")
    return lines


@needs_imagej
def test_imagej_opens_the_stacks_plain_and_as_virtual_stacks(
    with_condensed: tuple[Path, list[Any]], tmp_path: Path
) -> None:
    mnt, entries = with_condensed
    shown = 0
    for entry, name, path in stacks(mnt, entries):
        modes = ("plain", "virtual") if name == "image" else ("virtual",)
        with source(entry["path"]) as ds:
            stack, size = stack_values(ds, name), pixel_size(ds)
        for mode in modes:
            log = imagej(MACRO, f"{path}|{mode}", tmp_path).strip().splitlines()
            log = [line for line in log if re.match(r"(nSlices|pixel|slice)=", line)]
            if shown == 0:
                print(f"ImageJ, {entry['name']} {name}.tif ({mode}):\n" + "\n".join(log))
                shown += 1
            virtual = int(mode == "virtual")
            assert log[0] == f"nSlices={len(stack)} virtual={virtual}", (entry["name"], name)
            assert log[2:] == expected_slices(stack), (entry["name"], name, mode)
            # the scale: µm per pixel (ImageJ reads the rational as float32), "micron"
            pw, ph, unit = re.fullmatch(r"pixel=(\S+) (\S+) unit=(.*)", log[1]).groups()
            assert float(pw) == float(ph) == pytest.approx(size, rel=1e-7), log[1]
            assert unit == "microns", log[1]  # ImageJ's plural of "micron"


def fcs_clean(label: str) -> str:
    """A channel name as fcswrite (dclab's FCS export) cleans it."""
    for a, b in (("µ", "u"), ("²", "2"), (" ", ""), ("?", ""), ("_", "")):
        label = label.replace(a, b)
    return label.encode("ascii", "replace").decode()  # fcswrite writes ASCII


def test_features_fcs_read_by_flowio_equals_dclab_and_its_export(
    with_condensed: tuple[Path, list[Any]], tmp_path: Path
) -> None:
    import flowio

    mnt, entries = with_condensed
    for entry in entries:
        directory = resource_dir(mnt, entry)
        header = (directory / "features.tsv").read_text().split("\n", 1)[0].split("\t")
        path = directory / "features.fcs"
        fcs = flowio.FlowData(str(path))
        assert path.stat().st_size == len(path.read_bytes())  # the size stated at listing
        names = [fcs.channels[i + 1]["pnn"] for i in range(fcs.channel_count)]
        assert names == header, entry["name"]
        assert fcs.text["datatype"] == "F" and fcs.text["mode"] == "L"
        assert fcs.version == "3.1"
        table = np.asarray(fcs.events, dtype=np.float32).reshape(-1, len(names))
        with source(entry["path"]) as ds:
            assert fcs.event_count == len(ds)
            for i, name in enumerate(names):
                expected = values(ds, name).astype(np.float32)
                assert equal(table[:, i], expected), f"{entry['name']}: {name}"
                label = fcs.channels[i + 1]["pns"]
                if dfn.feature_exists(name):
                    assert label == dfn.get_feature_label(name), name
                finite = np.abs(expected[np.isfinite(expected)])
                top = float(finite.max()) if finite.size else 0.0
                assert float(fcs.text[f"p{i + 1}r"]) >= top
            exported = [n for n in names if n in ds.features_scalar]
            out = tmp_path / f"{entry['id']}.fcs"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # fcswrite: NaN events dropped
                ds.export.fcs(out, features=exported, filtered=False)
        theirs = flowio.FlowData(str(out))
        their_names = [theirs.channels[i + 1]["pnn"] for i in range(theirs.channel_count)]
        order = sorted(exported)  # dclab exports its features sorted by name
        labels = {n: fcs.channels[names.index(n) + 1]["pns"] for n in order}
        assert their_names == [fcs_clean(labels[n]) for n in order], entry["name"]
        their_table = np.asarray(theirs.events, dtype=np.float64).reshape(-1, len(order))
        ours = table[:, [names.index(n) for n in order]].astype(np.float64)
        ours = ours[~np.isnan(ours).any(axis=1)]  # dclab drops events with a NaN
        assert their_table.shape == ours.shape
        for j, name in enumerate(order):
            column = ours[:, j]
            if column.size and column.min() >= 0 and column.max() <= 1:
                column = column * 100  # fcswrite's compat_percent
            if column.size and column.mean() < 0:
                column = -column  # fcswrite's compat_negative
            assert np.allclose(their_table[:, j], column, rtol=1e-6, atol=0), name


LARGE_MACRO = """
run("TIFF Virtual Stack...", "open=[" + getArgument() + "]");
print("nSlices=" + nSlices + " virtual=" + is("Virtual Stack"));
setSlice(50000);
getRawStatistics(n, mean);
print("slice=50000 sum=" + d2s(n * mean, 0) + " px=" + getPixel(0, 0) + ",");
"""
LARGE = SampleSpec(events=100_000, seed=71, image_shape=(24, 40), traces=False)


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("large-data")
    dataset = root / "public-lab" / "large"
    write_json(dataset / "dataset.json", {"title": "100,000 events"})
    started = time.monotonic()
    write_rtdc(dataset / "large.rtdc", LARGE)
    took = time.monotonic() - started
    if took > 60:
        pytest.skip(f"making a 100,000-event file took {took:.0f} s here (limit 60 s)")
    return root


@needs_imagej
def test_imagej_reads_one_slice_of_a_large_stack_moving_a_small_fraction(
    large_dir: Path, tmp_path: Path
) -> None:
    options = SiteOptions(condensed=False)  # nothing to condense: the original alone
    with (
        DevServer(large_dir, options=options) as server,
        mounted(tmp_path / "mnt", server.url, tmp_path / "cache") as mnt,
    ):
        (entry,) = [e for e in info(server) if e["rtdc"]]
        path = resource_dir(mnt, entry) / "image.tif"
        assert path.stat().st_size > LARGE.events * 24 * 40
        server.stats.reset()
        log = imagej(LARGE_MACRO, str(path), tmp_path)
        fetched = server.stats.snapshot()["object_bytes"]
        total = Path(entry["path"]).stat().st_size
        with source(entry["path"]) as ds:
            image = np.asarray(ds["image"][49_999]).astype(np.int64)
        print(f"large case: slice 50,000 fetched {fetched} of {total} bytes")
        assert f"nSlices={LARGE.events} virtual=1" in log
        assert f"slice=50000 sum={image.sum()} px={image[0, 0]}," in log
        assert fetched < total / 20, (fetched, total)
