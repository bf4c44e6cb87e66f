"""The layouts of the TIFF stacks and of features.fcs (`dcorfs.fs.producers.tiff`, `.fcs`) where a
mount's resources do not reach them: BigTIFF, offsets past FCS's HEADER limit; and dclab's
feature labels kept in `labels`, held equal to the installed dclab's."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import dclab.definitions as dfn
import numpy as np
import pytest
import tifffile
from dclab.definitions import feat_const

from dcorfs.fs.content import StaticContent
from dcorfs.fs.producers.fcs import HEADER_LIMIT, RANGE_DIGITS, FcsLayout, data_range
from dcorfs.fs.producers.labels import LABELS, label
from dcorfs.fs.producers.tiff import BIG, CLASSIC, Layout, resolution, tiff_of


def test_labels_are_dclabs() -> None:
    assert set(LABELS) == set(feat_const.scalar_feature_names)
    for name in feat_const.scalar_feature_names:
        assert label(name) == dfn.get_feature_label(name), name
    assert label("ml_score_r1a") == dfn.get_feature_label("ml_score_r1a")
    assert label("a_plugin_feature") == "a_plugin_feature"


def stack(layout: Layout, images: np.ndarray) -> bytes:
    content = tiff_of(layout, StaticContent(images.tobytes()))
    data = content.read(0, content.size, deadline=0)
    assert len(data) == content.size == layout.size
    return data


@pytest.mark.parametrize("pixel_size", [0.34, 0.68, None])
@pytest.mark.parametrize("big_from", [2**32, 0])
def test_stacks_classic_and_big_read_by_tifffile_and_tiffinfo(
    pixel_size: float | None, big_from: int, tmp_path: Path
) -> None:
    images = np.random.default_rng(5).integers(0, 256, (9, 7, 11), dtype=np.uint8)
    layout = Layout.of(9, 7, 11, pixel_size, big_from=big_from)
    assert layout.fmt is (BIG if big_from == 0 else CLASSIC)
    data = stack(layout, images)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert tif.is_bigtiff == (big_from == 0) and tif.is_imagej
        assert np.array_equal(tif.series[0].asarray(), images)
        assert [p.dataoffsets[0] for p in tif.pages] == [layout.pixels + k * 77 for k in range(9)]
        assert all(np.array_equal(p.asarray(), images[k]) for k, p in enumerate(tif.pages))
        if pixel_size is not None:
            num, den = tif.pages[0].tags["XResolution"].value
            assert den / num == pytest.approx(pixel_size, rel=1e-9)
            assert tif.pages[0].tags["YResolution"].value == (num, den)
            assert tif.imagej_metadata["unit"] == "micron"
        else:  # baseline TIFF's resolution all the same: 1/1, no unit
            assert tif.pages[0].tags["XResolution"].value == (1, 1)
            assert "unit" not in tif.imagej_metadata
    if shutil.which("tiffinfo"):
        path = tmp_path / "stack.tif"
        path.write_bytes(data)
        run = subprocess.run(["tiffinfo", str(path)], check=False, capture_output=True, text=True)
        assert run.returncode == 0 and not run.stderr.strip(), run.stderr
        assert run.stdout.count("TIFF Directory at offset") == 9


def test_a_stack_past_4_gib_is_a_bigtiff_whose_last_ifds_point_right() -> None:
    pages, h, w = 60_000, 250, 300  # 4.5 GB of pixels
    classic = Layout.of(pages, h, w, 0.34, big_from=2**64)
    assert classic.size > 2**32  # what would not fit 32-bit offsets
    layout = Layout.of(pages, h, w, 0.34, big_from=2**32)
    assert layout.fmt is BIG and layout.size == layout.pixels + pages * h * w
    rows = layout.ifd_rows(pages - 3, pages - 1)  # the IFDs of the last two pages
    for k, page in enumerate((pages - 2, pages - 1)):
        ifd = rows[k * layout.row : (k + 1) * layout.row]
        (count,) = struct.unpack_from("<Q", ifd)
        entries = {
            tag: struct.unpack_from("<Q", ifd, 8 + i * 20 + 12)[0]
            for i in range(count)
            for tag in struct.unpack_from("<H", ifd, 8 + i * 20)
        }
        assert entries[273] == layout.pixels + page * h * w  # StripOffsets
        assert entries[279] == h * w
        (next_ifd,) = struct.unpack_from("<Q", ifd, 8 + count * 20)
        assert next_ifd == (0 if page == pages - 1 else layout.other_ifds + page * layout.row)


def test_resolution_is_pixels_per_micron() -> None:
    assert resolution(0.34) == (50, 17)
    assert resolution(5e6) == (1, 1_000_000)  # more than a metre: still a valid rational
    num, den = resolution(0.3400000035762787)  # a float32 stored as float64
    assert den / num == pytest.approx(0.34, rel=1e-7)


def test_fcs_offsets_past_the_header_limit_are_in_text_only() -> None:
    names = [f"f{i}" for i in range(30)]
    layout = FcsLayout(names, names, 1_000_000)  # 120 MB of data
    head = layout.head([7] * 30)
    assert len(head) == layout.begin
    fields = [int(head[10 + 8 * i : 18 + 8 * i]) for i in range(6)]
    assert fields[0] == 58 and fields[1] == layout.begin - 1
    assert layout.last > HEADER_LIMIT and fields[2:4] == [0, 0]
    text = head[58:].decode()
    assert layout.first == layout.begin
    assert f"/$BEGINDATA/{layout.begin}/$ENDDATA/{layout.last}/" in text
    assert layout.last - layout.begin + 1 == 4 * 30 * 1_000_000
    assert f"/$P30R/{7:0{RANGE_DIGITS}d}/" in text
    # the size does not depend on the ranges
    assert len(layout.head([10**RANGE_DIGITS - 1] * 30)) == layout.begin


def test_an_fcs_file_without_events_has_no_data_segment() -> None:
    layout = FcsLayout(["deform"], ["Deformation"], 0)
    head = layout.head([1])
    assert [int(head[10 + 8 * i : 18 + 8 * i]) for i in range(2, 4)] == [0, 0]
    assert b"/$BEGINDATA/0/$ENDDATA/0/" in head and b"/$TOT/0/" in head
    assert layout.size == len(head) + 8


def test_a_small_fcs_file_read_by_flowio(tmp_path: Path) -> None:
    import flowio

    table = np.array([[1.5, -2, np.nan], [3, 4e6, 0.25]], dtype="<f4")
    names, labels = ["deform", "area_um", "x/y"], ["Deformation", "Area [µm²]", "a/b"]
    layout = FcsLayout(names, labels, 2)
    ranges = [data_range(column) for column in table.T]
    assert ranges == [3, 4_000_000, 1]
    path = tmp_path / "small.fcs"
    path.write_bytes(layout.head(ranges) + table.tobytes() + b"00000000")
    fcs = flowio.FlowData(str(path))
    assert [fcs.channels[i + 1]["pnn"] for i in range(3)] == names
    assert [fcs.channels[i + 1]["pns"] for i in range(3)] == labels
    assert np.array_equal(np.asarray(fcs.events, "<f4").reshape(2, 3), table, equal_nan=True)


def test_the_switch_to_bigtiff_is_at_the_limit() -> None:
    """A classic TIFF can address bytes up to 2^32 - 1: a stack of exactly `big_from`
    bytes is a BigTIFF, one byte smaller is not."""
    size = Layout.of(1000, 80, 250, 0.34, big_from=2**62).size
    assert Layout.of(1000, 80, 250, 0.34, big_from=size).fmt is BIG
    assert Layout.of(1000, 80, 250, 0.34, big_from=size + 1).fmt is CLASSIC
