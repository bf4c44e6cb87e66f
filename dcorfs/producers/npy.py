"""`<feature>.npy`: NumPy format 1.0 header + the feature's events in C order, read lazily.

The header depends only on dtype and shape, so the file's size is known before any event is
fetched; a read of bytes [a, b) decodes only the events those bytes cover.
"""

from __future__ import annotations

import io

import numpy as np
from numpy.lib import format as npformat

from ..rtdc import Feature, RtdcResource


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The exact header `numpy.save` writes (format 1.0, padded to 64 bytes)."""
    header = {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    npformat.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


class NpyContent:
    def __init__(self, resource: RtdcResource, feature: Feature) -> None:
        self._resource = resource
        self._feature = feature
        self._header = npy_header(feature.dtype, feature.shape)
        self._row = feature.row_bytes
        self.size = len(self._header) + self._row * feature.shape[0]

    def read(self, offset: int, length: int, *, deadline: float) -> bytes:
        stop = min(offset + length, self.size)
        if offset >= stop:
            return b""
        head = len(self._header)
        out = self._header[offset:stop] if offset < head else b""
        begin, end = max(offset, head) - head, stop - head
        if end > begin:
            first, last = begin // self._row, -(-end // self._row)
            values = self._resource.read(self._feature.name, first, last, deadline=deadline)
            data = values.tobytes()
            out += data[begin - first * self._row : end - first * self._row]
        return out

    def peek(self, offset: int, length: int) -> bytes | None:
        if offset + length <= len(self._header):
            return self._header[offset : offset + length]
        return None
