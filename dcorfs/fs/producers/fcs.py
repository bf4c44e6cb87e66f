"""`features.fcs`: the table of events (`features.tsv`'s columns) as an FCS 3.1 list-mode file
for flow-cytometry software (FlowJo, FCS Express, R flowCore, FlowKit).

HEADER (58 bytes), TEXT, DATA, then `00000000` (no CRC). One parameter per column, float32
(`$DATATYPE/F`, `$PnB/32`, `$PnE/0,0`), little-endian (`$BYTEORD/1,2,3,4`); `$PnN` is the
dclab feature name, `$PnS` dclab's label (`labels.label`). DATA is event-major: each event a
row of float32 values, made from the same decoded values as `features.tsv` (a read decodes
only the rows it covers). Every event is kept, NaN values included (dclab's export drops
events with a NaN, and scales or flips some columns for old tools: here a value is the
feature's value, an event's row is its index).

`$PnR` is the data range: the largest absolute finite value of the column, rounded up (at
least 1), as dclab's writer (`fcswrite`) does it from the data. That needs every value of the
column, which the listing has not decoded; so each `$PnR` value is written with a fixed width
(`RANGE_DIGITS` digits, zero-padded, a larger range clamped), and the TEXT segment, hence the
file, has the same size whatever the data: the size is known at listing, and the ranges are
computed when the HEADER/TEXT part is first read (all scalar columns, the values a reader of
the DATA needs anyway). `$BEGINDATA`/`$ENDDATA` are in TEXT; in the HEADER they are zeros
when the data end past byte 99,999,999, as FCS 3.1 wants.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from ...hdf5.rtdc import RtdcResource
from ...hdf5.structure import Feature
from ..content import PartsContent, RowContent, StaticContent
from .labels import label
from .tsv import table_columns

HEADER_BYTES = 58  # "FCS3.1", four spaces, six offsets of 8 characters
RANGE_DIGITS = 12  # the width of each $PnR value
HEADER_LIMIT = 99_999_999  # the largest offset a HEADER field holds
CRC = b"00000000"  # no CRC computed
RANGE_ROWS = 1 << 20  # events of a column read at once to find its range


def _escaped(value: str) -> str:
    """A keyword or value in a TEXT segment delimited by `/` (a `/` doubled)."""
    return value.replace("/", "//")


def data_range(values: np.ndarray) -> int:
    """The `$PnR` of a column: its largest absolute finite value, rounded up, at least 1,
    clamped to what `RANGE_DIGITS` digits hold."""
    if values.dtype.kind == "f":
        finite = np.abs(values[np.isfinite(values)])
    else:  # integers (and booleans): their magnitude, as floats (no overflow of abs(min))
        finite = np.abs(values.astype(np.float64))
    top = float(np.max(finite)) if finite.size else 0.0
    return int(min(max(1, math.ceil(abs(top))), 10**RANGE_DIGITS - 1))


class FcsLayout:
    """The segments of a features.fcs of `events` rows of the parameters `names`/`labels`:
    TEXT from byte 58 to `begin` - 1, DATA from `begin` (`$BEGINDATA` `first`, `$ENDDATA`
    `last`)."""

    def __init__(self, names: list[str], labels: list[str], events: int) -> None:
        self.names, self.labels, self.events = names, labels, events
        self.row_bytes = 4 * len(names)
        data_bytes = self.row_bytes * events
        # $BEGINDATA/$ENDDATA are part of the TEXT whose length sets them: to a fixed point
        # (both 0 without events: no DATA segment)
        begin = HEADER_BYTES
        while True:
            first, last = (begin, begin + data_bytes - 1) if data_bytes else (0, 0)
            text = self.text([0] * len(names), first, last)
            if HEADER_BYTES + len(text) == begin:
                break
            begin = HEADER_BYTES + len(text)
        self.begin, self.first, self.last, self.data_bytes = begin, first, last, data_bytes
        self.size = begin + data_bytes + len(CRC)

    def text(self, ranges: list[int], begin: int, end: int) -> bytes:
        """The TEXT segment (UTF-8) with these `$PnR` values and data offsets."""
        pairs = [
            ("$BEGINANALYSIS", "0"),
            ("$ENDANALYSIS", "0"),
            ("$BEGINSTEXT", "0"),
            ("$ENDSTEXT", "0"),
            ("$BEGINDATA", str(begin)),
            ("$ENDDATA", str(end)),
            ("$BYTEORD", "1,2,3,4"),
            ("$DATATYPE", "F"),
            ("$MODE", "L"),
            ("$NEXTDATA", "0"),
            ("$PAR", str(len(self.names))),
            ("$TOT", str(self.events)),
            ("$CYT", "RT-DC"),
        ]
        for n, (name, text, top) in enumerate(zip(self.names, self.labels, ranges, strict=True)):
            pairs += [
                (f"$P{n + 1}B", "32"),
                (f"$P{n + 1}E", "0,0"),
                (f"$P{n + 1}N", name),
                (f"$P{n + 1}S", text),
                (f"$P{n + 1}R", f"{top:0{RANGE_DIGITS}d}"),
            ]
        return ("/" + "".join(f"{_escaped(k)}/{_escaped(v)}/" for k, v in pairs)).encode(
            "utf-8", "replace"
        )

    def header(self) -> bytes:
        text_end = self.begin - 1
        first, last = (self.first, self.last) if self.last <= HEADER_LIMIT else (0, 0)
        fields = (HEADER_BYTES, text_end, first, last, 0, 0)
        return b"FCS3.1    " + b"".join(f"{f:>8}".encode() for f in fields)

    def head(self, ranges: list[int]) -> bytes:
        """HEADER and TEXT: the bytes before DATA."""
        out = self.header() + self.text(ranges, self.first, self.last)
        assert len(out) == self.begin
        return out


class _Head:
    """HEADER and TEXT, whose `$PnR` values are computed (from every value of every column)
    the first time they are read."""

    def __init__(self, layout: FcsLayout, resource: RtdcResource, columns: list[Feature]) -> None:
        self._layout, self._resource, self._columns = layout, resource, columns
        self.size = layout.begin
        self._made: bytes | None = None
        self._lock = threading.Lock()

    def _make(self, deadline: float) -> bytes:
        with self._lock:
            if self._made is None:
                ranges = [self._range(f, deadline) for f in self._columns]
                self._made = self._layout.head(ranges)
            return self._made

    def _range(self, feature: Feature, deadline: float) -> int:
        """`data_range` of a column, read in runs of `RANGE_ROWS` events (memory bounded)."""
        events, top = self._resource.events, 1
        for first in range(0, events, RANGE_ROWS):
            last = min(events, first + RANGE_ROWS)
            top = max(
                top, data_range(self._resource.read(feature.name, first, last, deadline=deadline))
            )
        return top

    def read(self, offset: int, length: int, *, deadline: float) -> bytes:
        return self._make(deadline)[offset : offset + length]

    def peek(self, offset: int, length: int, *, disk: bool = False) -> bytes | None:
        made = self._made
        return None if made is None else made[offset : offset + length]


def fcs_content(resource: RtdcResource) -> PartsContent:
    """features.fcs of a resource (see the module note)."""
    columns = table_columns(resource)
    layout = FcsLayout([f.name for f in columns], [label(f.name) for f in columns], resource.events)

    def rows(first: int, last: int, deadline: float) -> bytes:
        table = np.empty((last - first, len(columns)), dtype="<f4")
        for i, feature in enumerate(columns):
            table[:, i] = resource.read(feature.name, first, last, deadline=deadline)
        return table.tobytes()

    data = RowContent(b"", row_bytes=layout.row_bytes, count=resource.events, rows=rows)
    return PartsContent(
        layout.size,
        [
            (0, _Head(layout, resource, columns)),
            (layout.begin, data),
            (layout.begin + layout.data_bytes, StaticContent(CRC)),
        ],
    )
