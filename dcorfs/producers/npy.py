"""`<feature>.npy`: NumPy format 1.0 header + the feature's events in C order, read lazily.

The header depends only on dtype and shape, so the file's size is known before any event is
fetched; a read of bytes [a, b) decodes only the events those bytes cover.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from numpy.lib import format as npformat

from ..content import RowContent
from ..rtdc import Feature, RtdcResource


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The exact header `numpy.save` writes (format 1.0, padded to 64 bytes)."""
    header = {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    npformat.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def event_rows(resource: RtdcResource, feature: Feature) -> Callable[[int, int, float], bytes]:
    """Events [first, last) of a feature as bytes (C order, little-endian)."""

    def rows(first: int, last: int, deadline: float) -> bytes:
        return resource.read(feature.name, first, last, deadline=deadline).tobytes()

    return rows


def npy_content(resource: RtdcResource, feature: Feature) -> RowContent:
    """The .npy file of one feature: one row per event."""
    return RowContent(
        npy_header(feature.dtype, feature.shape),
        row_bytes=feature.row_bytes,
        count=feature.shape[0],
        rows=event_rows(resource, feature),
    )
