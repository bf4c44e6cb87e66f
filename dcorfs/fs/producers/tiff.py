"""`image.tif`, `mask.tif`, `image_bg.tif`: an image feature as a TIFF stack for Fiji/ImageJ.

One page per event, 8-bit grayscale (BlackIsZero), uncompressed, one strip per page. Every
IFD comes before the pixel data, and the pixel data are the feature's values in event order,
contiguous (`mask` as 0/255, like the synthesized `.rtdc`): the pixel part of the file is the
very content of the feature's `.npy` file after its header (same derived object, so no second
decode and no second cached copy), and a reader seeking page k touches only the IFD region
and page k's bytes. The layout depends only on the event count, the image shape and the pixel
size, so the size is known at listing without decoding anything.

The first IFD carries what ImageJ reads: an ImageDescription `ImageJ=…`, `images=N`,
`slices=N` (so ImageJ 1.x reads the stack from the first IFD's strip offset on, contiguously,
without walking the other IFDs), and the pixel size from the metadata (`imaging:pixel size`,
µm) as ImageJ writes it: XResolution = YResolution = 1/pixel size, ResolutionUnit none and
`unit=micron` in the description. A file past 4 GiB is a BigTIFF (64-bit offsets; ImageJ 1.x
reads no BigTIFF, Fiji opens it with Bio-Formats).

Only the first IFD is made at listing; the IFDs of the other pages are rows made on demand
(`RowContent`), each from one template with its own strip offset and next-IFD offset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ...hdf5.rtdc import RtdcResource
from ...hdf5.structure import Feature
from ..content import FileContent, PartsContent, RowContent
from .rtdc_file import stored_values

IMAGE_FEATURES = ("image", "mask", "image_bg")  # those served as `<name>.tif`
BIGTIFF_FROM = 2**32  # a file of this size or more is a BigTIFF

# tags and field types (TIFF 6.0, BigTIFF)
_SHORT, _ASCII, _LONG, _RATIONAL, _LONG8 = 3, 2, 4, 5, 16
_STRIP_OFFSETS = 273


@dataclass(frozen=True)
class _Format:
    """Classic TIFF or BigTIFF: sizes and packing of the header and IFDs."""

    magic: int
    header_bytes: int
    count_fmt: str  # the number of entries of an IFD
    entry_bytes: int
    entry_count_fmt: str  # the number of values of an entry
    offset_fmt: str  # offsets and inline values
    offset_type: int

    def header(self, first_ifd: int) -> bytes:
        if self.magic == 42:
            return struct.pack("<2sHI", b"II", 42, first_ifd)
        return struct.pack("<2sHHHQ", b"II", 43, 8, 0, first_ifd)

    def ifd_bytes(self, entries: int) -> int:
        return struct.calcsize(self.count_fmt) + entries * self.entry_bytes + self.value_bytes

    @property
    def value_bytes(self) -> int:
        return struct.calcsize(self.offset_fmt)

    def entry(self, tag: int, kind: int, count: int, value: int | bytes) -> bytes:
        """One IFD entry: its value inline (a number, or bytes that fit) or the offset of its
        values (ASCII; RATIONAL in a classic TIFF)."""
        if isinstance(value, bytes):
            value_bytes = value.ljust(self.value_bytes, b"\0")
        else:
            inline = {_SHORT: "<H", _LONG: "<I", _LONG8: "<Q"}.get(kind, self.offset_fmt)
            value_bytes = struct.pack(inline, value).ljust(self.value_bytes, b"\0")
        return (
            struct.pack("<HH", tag, kind) + struct.pack(self.entry_count_fmt, count) + value_bytes
        )


CLASSIC = _Format(42, 8, "<H", 12, "<I", "<I", _LONG)
BIG = _Format(43, 16, "<Q", 20, "<Q", "<Q", _LONG8)


def _even(n: int) -> int:
    return n + (n & 1)


def description(pages: int, pixel_size: float | None) -> bytes:
    """ImageJ's ImageDescription of a stack of `pages` slices (NUL-terminated)."""
    lines = ["ImageJ=1.11a", f"images={pages}", f"slices={pages}"]
    if pixel_size is not None:
        lines.append("unit=micron")
    lines.append("loop=false")
    return ("\n".join(lines) + "\n").encode("ascii") + b"\0"


def resolution(pixel_size: float) -> tuple[int, int]:
    """Pixels per micron (1/pixel size) as a TIFF rational."""
    per_um = (1 / Fraction(repr(pixel_size))).limit_denominator(1_000_000)
    while per_um.numerator >= 2**32:  # a pixel far below a picometre: keep it representable
        per_um = per_um.limit_denominator(per_um.denominator // 2 or 1)
    if per_um.numerator == 0:  # a pixel of more than a metre: the smallest rational
        return 1, 1_000_000
    return per_um.numerator, per_um.denominator


@dataclass(frozen=True)
class Layout:
    """Where everything of a stack of `pages` images of `height` × `width` bytes lies."""

    pages: int
    height: int
    width: int
    pixel_size: float | None
    fmt: _Format

    @classmethod
    def of(
        cls, pages: int, height: int, width: int, pixel_size: float | None, *, big_from: int
    ) -> Layout:
        classic = cls(pages, height, width, pixel_size, CLASSIC)
        if classic.size < big_from:
            return classic
        return cls(pages, height, width, pixel_size, BIG)

    @property
    def page_bytes(self) -> int:
        return self.height * self.width

    @property
    def description(self) -> bytes:
        return description(self.pages, self.pixel_size)

    @property
    def first_entries(self) -> int:
        return len(self._entries(0, first=True))

    @property
    def first_ifd(self) -> int:
        """The first IFD's offset: after the header, the description and the rational."""
        rational = 0 if self.fmt is BIG else 8  # BIG: inline
        return self.fmt.header_bytes + _even(len(self.description)) + rational

    @property
    def other_ifds(self) -> int:
        """The offset of the second page's IFD; the others follow, `row` bytes each."""
        return self.first_ifd + _even(self.fmt.ifd_bytes(self.first_entries))

    @property
    def row(self) -> int:
        return _even(self.fmt.ifd_bytes(len(self._entries(0, first=False))))

    @property
    def pixels(self) -> int:
        """The offset of the first page's pixels."""
        return self.other_ifds + (self.pages - 1) * self.row

    @property
    def size(self) -> int:
        return self.pixels + self.pages * self.page_bytes

    def _entries(self, strip: int, *, first: bool) -> list[tuple[int, int, int, int | bytes]]:
        """(tag, type, count, value) of the entries of a page's IFD, sorted by tag."""
        f, h, w = self.fmt, self.height, self.width
        entries: list[tuple[int, int, int, int | bytes]] = [
            (254, _LONG, 1, 0),  # NewSubfileType
            (256, _LONG, 1, w),  # ImageWidth
            (257, _LONG, 1, h),  # ImageLength
            (258, _SHORT, 1, 8),  # BitsPerSample
            (259, _SHORT, 1, 1),  # Compression: none
            (262, _SHORT, 1, 1),  # PhotometricInterpretation: BlackIsZero
            (_STRIP_OFFSETS, f.offset_type, 1, strip),
            (277, _SHORT, 1, 1),  # SamplesPerPixel
            (278, _LONG, 1, h),  # RowsPerStrip
            (279, f.offset_type, 1, self.page_bytes),  # StripByteCounts
        ]
        if first:
            text = self.fmt.header_bytes
            entries.append((270, _ASCII, len(self.description), text))  # ImageDescription
            # baseline TIFF: a resolution always (1/1 without a pixel size)
            rational: int | bytes = text + _even(len(self.description))
            if self.fmt is BIG:  # 8 bytes: inline
                rational = struct.pack("<II", *self._resolution())
            entries += [
                (282, _RATIONAL, 1, rational),  # XResolution
                (283, _RATIONAL, 1, rational),  # YResolution
                (296, _SHORT, 1, 1),  # ResolutionUnit: none (ImageJ: unit= says µm)
            ]
        return sorted(entries, key=lambda entry: entry[0])

    def _resolution(self) -> tuple[int, int]:
        return (1, 1) if self.pixel_size is None else resolution(self.pixel_size)

    def _ifd(self, strip: int, next_ifd: int, *, first: bool) -> bytes:
        entries = [self.fmt.entry(*e) for e in self._entries(strip, first=first)]
        count = struct.pack(self.fmt.count_fmt, len(entries))
        ifd = count + b"".join(entries) + struct.pack(self.fmt.offset_fmt, next_ifd)
        return ifd + b"\0" * (len(ifd) & 1)

    def prelude(self) -> bytes:
        """Header, description, rational and the first IFD: everything before the rows."""
        out = self.fmt.header(self.first_ifd) + self.description
        out += b"\0" * (len(out) & 1)
        if self.fmt is not BIG:
            out += struct.pack("<II", *self._resolution())
        assert len(out) == self.first_ifd
        next_ifd = self.other_ifds if self.pages > 1 else 0
        out += self._ifd(self.pixels, next_ifd, first=True)
        return out.ljust(self.other_ifds, b"\0")

    def ifd_rows(self, first: int, last: int) -> bytes:
        """The IFDs of pages 1 + [first, last): one template, each with its own offsets."""
        count = last - first
        if count <= 0:
            return b""
        template = np.frombuffer(self._ifd(0, 0, first=False), np.uint8)
        rows = np.tile(template, (count, 1))
        pages = np.arange(first + 1, last + 1, dtype=np.uint64)
        value = self.fmt.value_bytes
        vtype = np.dtype(self.fmt.offset_fmt)
        strips = self.pixels + pages * np.uint64(self.page_bytes)
        next_ifds = np.where(
            pages < self.pages - 1, self.other_ifds + pages * np.uint64(self.row), 0
        )
        at = self._strip_value_at()
        rows[:, at : at + value] = strips.astype(vtype).view(np.uint8).reshape(count, value)
        end = self.fmt.ifd_bytes(len(self._entries(0, first=False)))
        tail = next_ifds.astype(vtype).view(np.uint8).reshape(count, value)
        rows[:, end - value : end] = tail
        return rows.tobytes()

    def _strip_value_at(self) -> int:
        """Where the StripOffsets value lies within an IFD of a page after the first."""
        tags = [tag for tag, *_ in self._entries(0, first=False)]
        entry_head = 4 + struct.calcsize(self.fmt.entry_count_fmt)  # tag, type, count
        at = tags.index(_STRIP_OFFSETS) * self.fmt.entry_bytes + entry_head
        return struct.calcsize(self.fmt.count_fmt) + at


def pixel_size_of(metadata: object) -> float | None:
    """`imaging:pixel size` (µm) from metadata `{section: {key: value}}`, if usable."""
    try:
        value = float(metadata["imaging"]["pixel size"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def tiff_features(resource: RtdcResource) -> list[Feature]:
    """The image features of a resource a stack is made of: 8-bit (or bool `mask`) images."""
    return [
        f
        for name in IMAGE_FEATURES
        if (f := resource.features.get(name)) is not None
        and len(f.shape) == 3
        and f.shape[0] > 0
        and f.dtype.itemsize == 1
        and f.dtype.kind in ("b" if name == "mask" else "u")
    ]


def tiff_content(
    resource: RtdcResource,
    feature: Feature,
    pixel_size: float | None,
    *,
    big_from: int = BIGTIFF_FROM,
) -> PartsContent:
    """The TIFF stack of an image feature (see the module note)."""
    pages, height, width = feature.shape
    layout = Layout.of(pages, height, width, pixel_size, big_from=big_from)
    return tiff_of(layout, stored_values(resource, feature))


def tiff_of(layout: Layout, pixels: FileContent) -> PartsContent:
    """The stack of `layout` whose pixel data are `pixels` (pages × height × width bytes)."""
    assert pixels.size == layout.pages * layout.page_bytes
    ifds = RowContent(
        layout.prelude(),
        row_bytes=layout.row,
        count=layout.pages - 1,
        rows=lambda first, last, deadline: layout.ifd_rows(first, last),
    )
    assert ifds.size == layout.pixels
    return PartsContent(layout.size, [(0, ifds), (layout.pixels, pixels)])
