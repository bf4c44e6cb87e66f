"""`<feature>.npy`: NumPy format 1.0 header + the feature's events in C order, read lazily.

The header depends only on dtype and shape, so the file's size is known before any event is
fetched. The events are the feature's derived object (`RtdcResource.rows_object`): a read of
bytes [a, b) makes only the blocks of decoded values those bytes cover, and serves blocks
made before (by any file of the feature, in this mount or an earlier one) from the cache.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from numpy.lib import format as npformat

from ...cache.derived import DerivedCache
from ...hdf5.contour import Contour, Remember, points_feature, register_points
from ...hdf5.rtdc import RtdcResource
from ...hdf5.structure import Feature
from ..content import FileContent, PartsContent, StaticContent
from .passthrough import ObjectContent


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The exact header `numpy.save` writes (format 1.0, padded to 64 bytes)."""
    return _header(dtype, tuple(int(n) for n in shape))


@functools.lru_cache(maxsize=1024)
def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """Made once per dtype and shape (a resource's features share a few; ~3.5 µs each made,
    0.2 cached), the shape's numbers Python's (NumPy's would be written as `np.int64(3)`)."""
    header = {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    npformat.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def feature_values(resource: RtdcResource, feature: Feature) -> ObjectContent:
    """The values of a feature (C order, little-endian) as lazy content."""
    return ObjectContent(resource.derived, resource.rows_object(feature.name))


def npy_content(resource: RtdcResource, feature: Feature) -> PartsContent:
    """The .npy file of one feature: its header, then its values."""
    return npy_of(feature, feature_values(resource, feature))


def npy_of(feature: Feature, values: ObjectContent) -> PartsContent:
    """The .npy file of `feature` whose values are `values`."""
    header = npy_header(feature.dtype, feature.shape)
    return PartsContent(
        len(header) + values.size, [(0, StaticContent(header)), (len(header), values)]
    )


def contour_npys(
    contour: Contour, derived: DerivedCache, remember: Remember
) -> dict[str, FileContent]:
    """`points.npy` and `offsets.npy` of a contour (blocking the first time: its offsets are
    read, see `hdf5.contour`)."""
    offsets = contour.offsets(remember)
    feature = points_feature(contour, offsets)
    points = ObjectContent(derived, register_points(derived, contour, offsets))
    header = npy_header(offsets.dtype, offsets.shape)
    return {
        "points.npy": npy_of(feature, points),
        "offsets.npy": StaticContent(header + offsets.tobytes()),
    }
