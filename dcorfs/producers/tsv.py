"""`features.tsv`: every scalar feature of a resource as a fixed-width, tab-separated table.

Each column has the width of the longest value its dtype can produce (float32 as `%.9g`,
float64 as `%.17g`, integers in full), right-aligned, so every row has the same length: the
file's size is known before any event is fetched and a read of bytes [a, b) decodes only the
rows it covers. Values round-trip exactly to the stored dtype (`float32(parse(text)) == x`).
"""

from __future__ import annotations

import numpy as np

from ..rtdc import Feature, RtdcResource


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


def tsv_columns(resource: RtdcResource) -> list[Feature]:
    return [f for f in resource.scalar_features() if f.dtype.kind in "fbiu"]


class TsvContent:
    def __init__(self, resource: RtdcResource) -> None:
        self._resource = resource
        self._columns = tsv_columns(resource)
        self._formats = [_format(f.dtype) for f in self._columns]
        widths = [
            max(width, len(f.name))
            for f, (_, width) in zip(self._columns, self._formats, strict=True)
        ]
        self._widths = widths
        self._header = (
            "\t".join(f.name.rjust(w) for f, w in zip(self._columns, widths, strict=True)) + "\n"
        ).encode()
        self._row = sum(widths) + len(widths)  # tabs between columns plus the newline
        self.size = len(self._header) + self._row * resource.events if self._columns else 0
        if not self._columns:
            self._header = b""

    def _rows(self, first: int, last: int, deadline: float) -> bytes:
        columns = []
        for feature, (fmt, _), width in zip(
            self._columns, self._formats, self._widths, strict=True
        ):
            values = self._resource.read(feature.name, first, last, deadline=deadline)
            if values.dtype.kind == "b":
                values = values.astype(np.uint8)
            text = np.char.rjust(np.char.mod(fmt, values), width)
            columns.append(text)
        table = columns[0]
        for column in columns[1:]:
            table = np.char.add(np.char.add(table, "\t"), column)
        return ("\n".join(table.tolist()) + "\n").encode()

    def read(self, offset: int, length: int, *, deadline: float) -> bytes:
        stop = min(offset + length, self.size)
        if offset >= stop:
            return b""
        head = len(self._header)
        out = self._header[offset:stop] if offset < head else b""
        begin, end = max(offset, head) - head, stop - head
        if end > begin:
            first, last = begin // self._row, -(-end // self._row)
            data = self._rows(first, last, deadline)
            out += data[begin - first * self._row : end - first * self._row]
        return out

    def peek(self, offset: int, length: int) -> bytes | None:
        if offset + length <= len(self._header):
            return self._header[offset : offset + length]
        return None
