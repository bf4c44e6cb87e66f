"""`features.tsv`: every scalar feature of a resource as a fixed-width, tab-separated table.

The header is the bare feature names, tab-separated, so pandas, polars, R's `read.delim` and
`numpy.genfromtxt(names=True)` find each column by its name. In the data rows each column has
the width of the longest value its dtype can produce (float32 as `%.9g`, float64 as `%.17g`,
integers in full), right-aligned, so every row has the same length: the file's size is known
before any event is fetched and a read of bytes [a, b) decodes only the rows it covers.
Values round-trip exactly to the stored dtype (`float32(parse(text)) == x`).
"""

from __future__ import annotations

import numpy as np

from ...hdf5.rtdc import RtdcResource
from ...hdf5.structure import Feature
from ..content import RowContent


def _format(dtype: np.dtype) -> tuple[str, int]:
    """printf format and column width for a scalar dtype."""
    if dtype.kind == "f":
        if dtype.itemsize <= 4:
            return "%.9g", 15  # -1.17549435e-38
        return "%.17g", 24  # -2.2250738585072014e-308
    if dtype.kind == "b":
        return "%d", 1
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return "%d", max(len(str(info.min)), len(str(info.max)))
    raise TypeError(f"no text form for dtype {dtype}")


def table_columns(resource: RtdcResource) -> list[Feature]:
    """The columns of a resource's table of events (`features.tsv`, `features.fcs`): the
    numeric scalar features with a value for every event."""
    return [f for f in resource.event_table() if f.dtype.kind in "fbiu"]


def tsv_content(resource: RtdcResource) -> RowContent:
    """features.tsv of a resource: a header line, then one fixed-width line per event."""
    columns = table_columns(resource)
    if not columns:
        return RowContent(b"", row_bytes=0, count=0, rows=lambda first, last, deadline: b"")
    formats = [_format(f.dtype) for f in columns]
    widths = [max(width, len(f.name)) for f, (_, width) in zip(columns, formats, strict=True)]
    header = "\t".join(f.name for f in columns) + "\n"  # bare: readers find columns by name

    def rows(first: int, last: int, deadline: float) -> bytes:
        table = None
        for feature, (fmt, _), width in zip(columns, formats, widths, strict=True):
            values = resource.read(feature.name, first, last, deadline=deadline)
            if values.dtype.kind == "b":
                values = values.astype(np.uint8)
            text = np.char.rjust(np.char.mod(fmt, values), width)
            table = text if table is None else np.char.add(np.char.add(table, "\t"), text)
        assert table is not None
        return ("\n".join(table.tolist()) + "\n").encode()

    # tabs between the columns plus the newline
    return RowContent(
        header.encode("utf-8", "surrogateescape"),
        row_bytes=sum(widths) + len(widths),
        count=resource.events,
        rows=rows,
    )
