"""libhdf5 called directly (ctypes) for the calls listing a resource makes by the hundred.

Listing a resource reads the structure of its small files (`hdf5.structure`: a few dozen
datasets, a few hundred attributes) and writes the structure of its synthesized `.rtdc`
(`hdf5.skeleton`). Through h5py each of those calls makes Python objects for every
identifier (types, dataspaces, attributes, property lists), registers them and checks errors
on its own; measured here, that was 70% of the build and libhdf5 itself 25%
(doc/ARCHITECTURE.md, "Speed"); scanning the two small files of a listed resource (37
features each) took 4.1 ms through h5py, 1.9 ms here. These functions make the same
libhdf5 calls h5py makes, with plain integer identifiers, on the very library h5py has
loaded (so one HDF5 library state, one set of identifiers: h5py's objects and these mix
freely). Reads give up (None) where h5py's own calls are left to tell what is wrong.

Callers hold h5py's lock (`h5py._objects.phil`) around every call: h5py serialises all its
calls to libhdf5 under that lock (whether or not the library was built thread-safe), and so
must these. The library is reached through h5py's own extension module (`ctypes.PyDLL` on
`h5py.h5`'s file: its symbols resolve to exactly the libhdf5 h5py uses, whatever its name or
place), and `PyDLL` keeps the GIL through each call: they are short, and a thread giving the
GIL up and taking it back around each of hundreds of calls would queue behind every other
thread of the daemon each time. `released` gives the few long ones that touch no library
state (a checksum of a chunk) through `ctypes.CDLL` instead, without h5py's lock.
Identifiers made here are closed here, but for a created dataset's, which its caller owns.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import h5py

from ..errors import ProtocolError

HADDR_UNDEF = (1 << 64) - 1  # haddr_t's "no address" (H5public.h)
_SCALAR = 0  # H5S_SCALAR (H5Spublic.h, H5S_class_t)
_SIMPLE = 1  # H5S_SIMPLE
_DATASET = 5  # H5I_DATASET (H5Ipublic.h, H5I_type_t)
_CHUNKED = 2  # H5D_CHUNKED (H5Dpublic.h, H5D_layout_t)
_GROUP = 2  # H5I_GROUP
_INDEX_NAME, _INDEX_CRT_ORDER = 0, 1  # H5_INDEX_NAME, H5_INDEX_CRT_ORDER (H5public.h)
_ITER_INC = 0  # H5_ITER_INC
_CRT_ORDER_TRACKED = 1  # H5P_CRT_ORDER_TRACKED (H5Ppublic.h)
_SELECT_SET = 0  # H5S_SELECT_SET (H5Spublic.h, H5S_seloper_t)
_DEFAULT = 0  # H5P_DEFAULT, and H5S_ALL

_hid = ctypes.c_int64  # hid_t (64 bits since HDF5 1.10)
_herr = ctypes.c_int  # herr_t
_haddr = ctypes.c_uint64  # haddr_t, hsize_t
_ptr = ctypes.c_void_p
# herr_t (*H5A_operator2_t)(hid_t, const char *name, const H5A_info_t *, void *data)
_ATTR_OPERATOR = ctypes.CFUNCTYPE(_herr, _hid, ctypes.c_char_p, _ptr, _ptr)


def _library() -> ctypes.PyDLL:
    """libhdf5 as h5py uses it, checked to be the version h5py was built for."""
    lib = ctypes.PyDLL(h5py.h5.__file__)
    found = [ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()]
    lib.H5get_libversion(*(ctypes.byref(part) for part in found))
    version = tuple(part.value for part in found)
    if version != tuple(h5py.version.hdf5_version_tuple):
        raise ImportError(f"libhdf5 {version} is not the {h5py.version.hdf5_version} h5py uses")
    return lib


_lib = _library()


def released(name: str, restype: Any, argtypes: Sequence[Any]) -> Any:
    """A function of that same libhdf5 through `ctypes.CDLL`, which gives the GIL up during
    each call: for the few that only read their arguments (no library state, no error stack),
    which are called outside h5py's lock too (`chunks.fletcher32`); None where the library
    does not export it."""
    function = getattr(ctypes.CDLL(h5py.h5.__file__), name, None)
    if function is not None:
        function.restype = restype
        function.argtypes = list(argtypes)
    return function


_SIGNATURES: dict[str, tuple[list[type], type]] = {
    "H5Screate": ([ctypes.c_int], _hid),
    "H5Screate_simple": ([ctypes.c_int, _ptr, _ptr], _hid),
    "H5Sselect_hyperslab": ([_hid, ctypes.c_int, _ptr, _ptr, _ptr, _ptr], _herr),
    "H5Sclose": ([_hid], _herr),
    "H5Acreate2": ([_hid, ctypes.c_char_p, _hid, _hid, _hid, _hid], _hid),
    "H5Awrite": ([_hid, _hid, _ptr], _herr),
    "H5Aclose": ([_hid], _herr),
    "H5Adelete": ([_hid, ctypes.c_char_p], _herr),
    "H5Dcreate2": ([_hid, ctypes.c_char_p, _hid, _hid, _hid, _hid, _hid], _hid),
    "H5Dget_space": ([_hid], _hid),
    "H5Dwrite": ([_hid, _hid, _hid, _hid, _hid, _ptr], _herr),
    "H5Dget_offset": ([_hid], _haddr),
    "H5Dget_storage_size": ([_hid], _haddr),
    "H5Dclose": ([_hid], _herr),
    "H5Dread": ([_hid, _hid, _hid, _hid, _hid, _ptr], _herr),
    "H5Aopen": ([_hid, ctypes.c_char_p, _hid], _hid),
    "H5Aget_type": ([_hid], _hid),
    "H5Aget_space": ([_hid], _hid),
    "H5Aread": ([_hid, _hid, _ptr], _herr),
    "H5Tencode": ([_hid, _ptr, ctypes.POINTER(ctypes.c_size_t)], _herr),
    "H5Tclose": ([_hid], _herr),
    "H5Sget_simple_extent_type": ([_hid], ctypes.c_int),
    "H5Sget_simple_extent_ndims": ([_hid], ctypes.c_int),
    "H5Sget_simple_extent_dims": ([_hid, _ptr, _ptr], ctypes.c_int),
    "H5Treclaim": ([_hid, _hid, _hid, _ptr], _herr),
    "H5Oopen": ([_hid, ctypes.c_char_p, _hid], _hid),
    "H5Oclose": ([_hid], _herr),
    "H5Iget_type": ([_hid], ctypes.c_int),
    "H5Dget_type": ([_hid], _hid),
    "H5Dget_create_plist": ([_hid], _hid),
    "H5Pget_layout": ([_hid], ctypes.c_int),
    "H5Pget_chunk": ([_hid, ctypes.c_int, _ptr], ctypes.c_int),
    "H5Pclose": ([_hid], _herr),
    "H5Pset_small_data_block_size": ([_hid, _haddr], _herr),
    "H5Gget_create_plist": ([_hid], _hid),
    "H5Pget_attr_creation_order": ([_hid, ctypes.POINTER(ctypes.c_uint)], _herr),
    "H5Aiterate2": ([_hid, ctypes.c_int, ctypes.c_int, _ptr, _ptr, _ptr], _herr),
}
for _name, (_args, _result) in _SIGNATURES.items():
    _function = getattr(_lib, _name)
    _function.argtypes, _function.restype = _args, _result


class HDF5CallError(ProtocolError):
    """A libhdf5 call returned its failure value (the file cannot be made from these
    inputs: a listing leaves it out, a read of it fails)."""


def _checked(name: str, result: int, what: bytes = b"") -> int:
    if result < 0:
        about = f" ({what.decode('utf-8', 'replace')})" if what else ""
        raise HDF5CallError(f"libhdf5's {name} failed{about}")
    return result


def _dims(shape: Sequence[int]) -> ctypes.Array[ctypes.c_uint64]:
    if any(n < 0 for n in shape):
        raise ValueError(f"a dataspace of negative size: {tuple(shape)}")
    return (ctypes.c_uint64 * len(shape))(*shape)


@contextmanager
def _dataspace(shape: Sequence[int]) -> Iterator[int]:
    """A dataspace of this shape (scalar for (), as h5py makes it), closed on leaving."""
    if shape:
        space = _checked("H5Screate_simple", _lib.H5Screate_simple(len(shape), _dims(shape), None))
    else:
        space = _checked("H5Screate", _lib.H5Screate(_SCALAR))
    try:
        yield space
    finally:
        _lib.H5Sclose(space)


_SCALAR_SPACE: list[int] = []  # a scalar dataspace, made once (never closed)


def _scalar_space() -> int:
    """The scalar dataspace that most attributes are written with (libhdf5 copies it into
    each attribute; made once instead of for each)."""
    if not _SCALAR_SPACE:
        _SCALAR_SPACE.append(_checked("H5Screate", _lib.H5Screate(_SCALAR)))
    return _SCALAR_SPACE[0]


def write_attribute(
    holder: int, name: bytes, file_type: int, *, memory_type: int, shape: Sequence[int], buffer: Any
) -> None:
    """Create attribute `name` of object `holder`, of type `file_type`, and write it from
    memory at `buffer`, whose values are of `memory_type` (text: pointers to its strings).
    A failed write leaves no attribute behind."""
    space = _scalar_space() if not shape else None
    if space is not None:
        attr = _checked("H5Acreate2", _lib.H5Acreate2(holder, name, file_type, space, 0, 0), name)
    else:
        with _dataspace(shape) as space:
            made = _lib.H5Acreate2(holder, name, file_type, space, 0, 0)
            attr = _checked("H5Acreate2", made, name)
    written = -1
    try:  # (an exception a callback left pending is raised by the call itself)
        written = _lib.H5Awrite(attr, memory_type, buffer)
    finally:
        _lib.H5Aclose(attr)
        if written < 0:
            _lib.H5Adelete(holder, name)
    _checked("H5Awrite", written, name)


def create_dataset(
    parent: int, name: bytes, file_type: int, shape: Sequence[int], dcpl: int
) -> int:
    """A new dataset's identifier (the caller's to close), created as h5py's `h5d.create`
    creates it, with default link and access properties."""
    with _dataspace(shape) as space:
        made = _lib.H5Dcreate2(parent, name, file_type, space, 0, dcpl, 0)
        return _checked("H5Dcreate2", made, name)


def close_dataset(dataset: int) -> None:
    """Close a dataset's identifier (made by `create_dataset`)."""
    _lib.H5Dclose(dataset)


def no_small_data_blocks(fapl: int) -> None:
    """Turn off libhdf5's aggregation of small raw data allocations in a file access
    property list (h5py has no call for it)."""
    _checked("H5Pset_small_data_block_size", _lib.H5Pset_small_data_block_size(fapl, 0))


def write_first(dataset: int, rank: int, memory_type: int, buffer: int, *, name: bytes) -> None:
    """Write the dataset's first element (all indices 0; the one element of a scalar one)
    from memory at `buffer`."""
    if rank == 0:
        written = _lib.H5Dwrite(dataset, memory_type, _DEFAULT, _DEFAULT, _DEFAULT, buffer)
        _checked("H5Dwrite", written, name)
        return
    one = _dims((1,) * rank)
    file_space = _checked("H5Dget_space", _lib.H5Dget_space(dataset), name)
    try:
        selected = _lib.H5Sselect_hyperslab(
            file_space, _SELECT_SET, _dims((0,) * rank), None, one, None
        )
        _checked("H5Sselect_hyperslab", selected, name)
        with _dataspace((1,) * rank) as memory_space:
            written = _lib.H5Dwrite(
                dataset, memory_type, memory_space, file_space, _DEFAULT, buffer
            )
            _checked("H5Dwrite", written, name)
    finally:
        _lib.H5Sclose(file_space)


def extent(dataset: int, *, name: bytes) -> tuple[int, int] | None:
    """(offset, bytes) of a contiguous dataset's storage in the file, None if unallocated
    (HDF5 then has no address for it, and no storage)."""
    offset = _lib.H5Dget_offset(dataset)
    size = _lib.H5Dget_storage_size(dataset)
    if offset == HADDR_UNDEF:
        if size:  # storage without an address: a failed call, not an empty dataset
            raise HDF5CallError(
                f"libhdf5's H5Dget_offset failed ({name.decode('utf-8', 'replace')})"
            )
        return None
    return int(offset), int(size)


@contextmanager
def attribute(holder: int, name: bytes) -> Iterator[int | None]:
    """Attribute `name` of object `holder` opened (closed on leaving), or None where libhdf5
    cannot open it (h5py's own call then tells why)."""
    attr = _lib.H5Aopen(holder, name, _DEFAULT)
    if attr < 0:
        yield None
        return
    try:
        yield attr
    finally:
        _lib.H5Aclose(attr)


def _encoded(tid: int) -> bytes:
    """A type serialized (`H5Tencode`, as h5py's `TypeID.encode`); `tid` closed."""
    try:
        size = ctypes.c_size_t(0)
        _checked("H5Tencode", _lib.H5Tencode(tid, None, ctypes.byref(size)))
        encoded = ctypes.create_string_buffer(size.value)
        _checked("H5Tencode", _lib.H5Tencode(tid, encoded, ctypes.byref(size)))
        return encoded.raw[: size.value]
    finally:
        _lib.H5Tclose(tid)


def attribute_type(attr: int) -> bytes:
    """The attribute's file type, serialized."""
    return _encoded(_checked("H5Aget_type", _lib.H5Aget_type(attr)))


def _shape(space: int) -> tuple[int, ...] | None:
    """A dataspace's shape (() for a scalar one), or None for a null one or another kind;
    `space` closed."""
    try:
        kind = _lib.H5Sget_simple_extent_type(space)
        if kind == _SCALAR:
            return ()
        if kind != _SIMPLE:
            return None
        rank = _checked("H5Sget_simple_extent_ndims", _lib.H5Sget_simple_extent_ndims(space))
        dims = (ctypes.c_uint64 * rank)()
        _checked("H5Sget_simple_extent_dims", _lib.H5Sget_simple_extent_dims(space, dims, None))
        return tuple(dims)
    finally:
        _lib.H5Sclose(space)


def dataset(parent: int, name: bytes) -> tuple[bytes, tuple[int, ...], int] | None:
    """Of member `name` of group `parent`, when it is a dataset of a simple or scalar
    dataspace: its type serialized, its shape and, for a rank above 1, its events per chunk
    (0: not chunked); else None (a group, a broken link, an error: h5py's own calls on it
    then tell what it is)."""
    oid = open_object(parent, name)
    if oid is None:
        return None
    try:
        if _lib.H5Iget_type(oid) != _DATASET:
            return None
        encoded, shape = dataset_type(oid)
        if shape is None:
            return None
        return encoded, shape, _chunk_rows(oid, len(shape), name) if len(shape) > 1 else 0
    except HDF5CallError:
        return None
    finally:
        close_object(oid)


def dataset_type(dataset: int) -> tuple[bytes, tuple[int, ...] | None]:
    """An opened dataset's type serialized and its shape (None: a null dataspace)."""
    encoded = _encoded(_checked("H5Dget_type", _lib.H5Dget_type(dataset)))
    return encoded, _shape(_checked("H5Dget_space", _lib.H5Dget_space(dataset)))


def read_dataset(dataset: int, memory_type: int, buffer: int) -> None:
    """Read a whole dataset into memory at `buffer`, as values of `memory_type`."""
    _checked("H5Dread", _lib.H5Dread(dataset, memory_type, _DEFAULT, _DEFAULT, _DEFAULT, buffer))


def _chunk_rows(dataset: int, rank: int, name: bytes) -> int:
    plist = _checked("H5Dget_create_plist", _lib.H5Dget_create_plist(dataset), name)
    try:
        if _lib.H5Pget_layout(plist) != _CHUNKED:
            return 0
        dims = (ctypes.c_uint64 * rank)()
        _checked("H5Pget_chunk", _lib.H5Pget_chunk(plist, rank, dims), name)
        return int(dims[0])
    finally:
        _lib.H5Pclose(plist)


def attribute_shape(attr: int) -> tuple[int, ...] | None:
    """The attribute's shape (() for a scalar one), or None for a null dataspace (h5py's
    `Empty`) or another kind."""
    return _shape(_checked("H5Aget_space", _lib.H5Aget_space(attr)))


def read_attribute(attr: int, memory_type: int, buffer: int) -> None:
    """Read the attribute's values into memory at `buffer`, as values of `memory_type`."""
    _checked("H5Aread", _lib.H5Aread(attr, memory_type, buffer))


def read_texts(attr: int, memory_type: int, count: int) -> list[bytes]:
    """The strings of a variable-length text attribute of `count` elements, read as C
    strings of `memory_type` (a variable-length C string type); libhdf5's copies freed."""
    pointers = (ctypes.c_char_p * count)()
    read_attribute(attr, memory_type, ctypes.addressof(pointers))
    try:
        return [value or b"" for value in pointers]
    finally:
        space = _checked("H5Aget_space", _lib.H5Aget_space(attr))
        try:
            _lib.H5Treclaim(memory_type, space, _DEFAULT, ctypes.addressof(pointers))
        finally:
            _lib.H5Sclose(space)


def open_object(parent: int, path: bytes) -> int | None:
    """The object at `path` from `parent` opened (the caller closes it: `close_object`), or
    None where libhdf5 cannot open it (h5py's own call then tells why)."""
    oid = _lib.H5Oopen(parent, path, _DEFAULT)
    return None if oid < 0 else int(oid)


def close_object(oid: int) -> None:
    _lib.H5Oclose(oid)


def attribute_names(holder: int) -> list[bytes] | None:
    """The attribute names of a group or dataset, in h5py's order (creation order where the
    object tracks it, else by name); None for another kind of object, or where libhdf5
    cannot list them (h5py's own calls then tell why)."""
    kind = _lib.H5Iget_type(holder)
    if kind == _GROUP:
        plist = _lib.H5Gget_create_plist(holder)
    elif kind == _DATASET:
        plist = _lib.H5Dget_create_plist(holder)
    else:
        return None
    if plist < 0:
        return None
    flags = ctypes.c_uint(0)
    try:
        if _lib.H5Pget_attr_creation_order(plist, ctypes.byref(flags)) < 0:
            return None
    finally:
        _lib.H5Pclose(plist)
    index = _INDEX_CRT_ORDER if flags.value & _CRT_ORDER_TRACKED else _INDEX_NAME
    found: list[bytes] = []

    def note(_: int, name: bytes, *__: Any) -> int:
        found.append(name)
        return 0

    if _lib.H5Aiterate2(holder, index, _ITER_INC, None, _ATTR_OPERATOR(note), None) < 0:
        return None
    return found
