"""HDF5 attributes read and written through libhdf5 itself (`capi`), as h5py's high-level
API would.

h5py's `obj.attrs[name]` and `obj.attrs[name] = value` make the HDF5 datatypes of every value
anew (a numpy dtype from the file's type, a memory type from that dtype: ~30 µs), and more
besides; an .rtdc file has a few hundred attributes (metadata, each feature's min/max/mean),
and listing a resource reads them all and writes them again into the synthesized file. Here
the types are made once per kind of value and kept (by the type's encoding for reads, by
dtype for writes); everything else is what h5py does
(`h5py._hl.attrs.AttributeManager.__getitem__` and `.create`), step by step, so values read
are equal and files written byte for byte the same (tests compare both with h5py's own).
Numbers, byte strings, text and compounds of them are read, and numbers and text written,
with h5py's libhdf5 calls without h5py's objects (`capi`); values h5py converts to Python
objects on its own (references, variable-length sequences, compounds holding text) and
empty, zero-sized and array-typed ones are read through h5py's low-level API, and values
of uncommon kinds (empty, array-typed, compound, text arrays holding other objects) written
through its high-level API. The same kept types serve small datasets read whole
(`dataset_value`, as `Dataset[()]`) and the dtypes of datasets `capi` describes (`dtype_of`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import h5py
import numpy as np
from h5py import h5a, h5p, h5t
from h5py._hl.base import array_for_new_object
from h5py._objects import phil

from . import capi

KEPT_TYPES = 256  # kinds of values whose types are kept (cleared when more appear)


class _Types:
    """Made types by key, bounded (a hostile file may have a type per attribute)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: dict[Any, Any] = {}

    def get(self, key: Any) -> Any:
        return self._made.get(key)

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            if len(self._made) >= KEPT_TYPES:
                self._made.clear()
            self._made[key] = value


_READ = _Types()  # encoded file type -> _ReadTypes
_WRITE = _Types()  # numpy dtype key -> (file type, memory type)


@dataclass(frozen=True)
class _ReadTypes:
    """How values of one file type are read: their dtype, the memory type h5py reads them
    as, and for variable-length text the C string type `capi` reads them as (else None)."""

    dtype: np.dtype
    memory: h5t.TypeID
    text: h5t.TypeID | None

    @property
    def vlen_text(self) -> bool:
        return self.text is not None

    @property
    def plain(self) -> bool:
        """Whether values are read into memory as they are (`capi`): no objects h5py makes
        (text, references, sequences), no array type."""
        return not self.dtype.hasobject and self.dtype.subdtype is None


def _read_types(attr: h5a.AttrID) -> _ReadTypes:
    tid = attr.get_type()
    return _types_of(tid.encode(), tid)


def _types_of(key: bytes, tid: h5t.TypeID | None = None) -> _ReadTypes:
    """How values of the type encoded as `key` are read (`tid`: that type, if at hand)."""
    made = _READ.get(key)
    if made is None:
        tid = tid if tid is not None else h5t.decode(key)
        dtype = tid.dtype
        text = h5t.check_string_dtype(dtype)
        c_text = None
        if text and text.length is None and dtype.subdtype is None:
            c_text = h5t.C_S1.copy()
            c_text.set_size(h5t.VARIABLE)
            c_text.set_cset(tid.get_cset())
        made = _ReadTypes(dtype, h5t.py_create(dtype), c_text)
        _READ.put(key, made)
    return cast(_ReadTypes, made)


def dtype_of(key: bytes) -> np.dtype:
    """The dtype h5py gives values of the type encoded as `key` (`capi`'s encoding); made
    once per kind of type."""
    with phil:
        return _types_of(key).dtype


def value(attr: h5a.AttrID) -> Any:
    """The value of an opened attribute, as `obj.attrs[name]` gives it."""
    with phil:
        types = _read_types(attr)
        dtype, vlen_text = types.dtype, types.vlen_text
        shape = attr.shape
        if shape is None:
            return h5py.Empty(dtype)
        if 0 in shape:
            return np.zeros(shape, dtype=dtype)
        if dtype.subdtype is not None:  # an array type: its elements decide (as in h5py)
            subdtype, subshape = dtype.subdtype
            shape, dtype = shape + subshape, subdtype
            text = h5t.check_string_dtype(dtype)
            vlen_text = bool(text and text.length is None)
        arr = np.zeros(shape, dtype=dtype, order="C")
        attr.read(arr, mtype=types.memory)
    if vlen_text:
        return _texts(list(arr.flat), dtype, arr.shape)
    return _unwrapped(arr)


def _texts(items: list[bytes], dtype: np.dtype, shape: tuple[int, ...]) -> Any:
    """Variable-length text read as bytes, as h5py gives it (decoded, in an array of its
    object dtype; a scalar one as its string)."""
    decoded = [item.decode("utf-8", "surrogateescape") for item in items]
    return _unwrapped(np.array(decoded, dtype=dtype).reshape(shape))


def _unwrapped(arr: np.ndarray) -> Any:
    return arr[()] if arr.ndim == 0 else arr


def _value_by_id(holder: int, name: bytes) -> Any:
    """The value of attribute `name` of an object (an object identifier, not a file's)
    through `capi`, for numbers and text: h5py's calls without its objects (the types of
    each kind of value made once, `_types_of`); `_UNREAD` where that does not apply (empty,
    array-typed: `value` then reads it as h5py does). Called with h5py's lock held."""
    with capi.attribute(holder, name) as attr:
        if attr is None:
            return _UNREAD
        try:
            types = _types_of(capi.attribute_type(attr))
            if not (types.plain or types.vlen_text):
                return _UNREAD  # (objects other than text: h5py converts them on its own)
            shape = capi.attribute_shape(attr)
            if shape is None or 0 in shape:
                return _UNREAD
            if types.text is not None:
                items = capi.read_texts(attr, types.text.id, math.prod(shape))
                return _texts(items, types.dtype, shape)
            arr = np.zeros(shape, dtype=types.dtype)  # (as h5py: a compound's gaps zeros)
            capi.read_attribute(attr, types.memory.id, arr.ctypes.data)
        except capi.HDF5CallError:
            return _UNREAD
        return _unwrapped(arr)


_UNREAD = object()


def dataset_value(dataset: h5py.h5d.DatasetID) -> Any:
    """A whole dataset's values as h5py's `Dataset[()]` gives them, read through `capi` for
    values of plain types (numbers, byte strings, compounds of them); through h5py for the
    rest (objects, null or zero-sized dataspaces, array types)."""
    with phil:
        try:
            key, shape = capi.dataset_type(dataset.id)
            types = _types_of(key)
            if shape is not None and 0 not in shape and types.plain:
                arr = np.zeros(shape, dtype=types.dtype)
                capi.read_dataset(dataset.id, types.memory.id, arr.ctypes.data)
                return _unwrapped(arr)
        except capi.HDF5CallError:
            pass  # (h5py's own read below tells why, its error not chained to this one)
        return h5py.Dataset(dataset)[()]


def _holder(oid: Any) -> Any:
    """The object whose attributes these are: a file's are its root group's (whose creation
    properties, not the file's, say whether their order is tracked)."""
    return h5py.h5o.open(oid, b"/") if isinstance(oid, h5py.h5f.FileID) else oid


def names(oid: Any) -> list[bytes]:
    """The attribute names of an object, in h5py's order (creation order where the object
    tracks it, else by name)."""
    with phil:
        oid = _holder(oid)
        listed = capi.attribute_names(oid.id)
        if listed is not None:
            return listed
        plist = oid.get_create_plist()
        try:
            tracked = plist.get_attr_creation_order() & h5p.CRT_ORDER_TRACKED
        finally:
            plist.close()
        found: list[bytes] = []

        def note(name: bytes, *_: Any) -> None:
            found.append(name)

        index = h5py.h5.INDEX_CRT_ORDER if tracked else h5py.h5.INDEX_NAME
        h5a.iterate(oid, note, index_type=index)
        return found


def read(oid: Any, name: bytes) -> Any:
    """The value of attribute `name` of an object (h5py's errors for a bad one)."""
    with phil:
        holder = _holder(oid)
        found = _value_by_id(holder.id, name)
        if found is not _UNREAD:
            return found
        attr = h5a.open(holder, name)
        try:
            return value(attr)
        finally:
            attr.close()


def read_by_id(holder: int, name: bytes, obj: Callable[[], Any]) -> Any:
    """`read` of the object (not a file) whose identifier is `holder`; `obj()` gives it as
    h5py's object, for values read through h5py."""
    with phil:
        found = _value_by_id(holder, name)
        return read(obj(), name) if found is _UNREAD else found


@contextmanager
def listed(
    fid: h5py.h5f.FileID, path: bytes
) -> Iterator[tuple[list[bytes], Callable[[bytes], Any]] | None]:
    """The attribute names of the object at `path` (`names`' order) and what reads one by
    name (`read`), the object opened through `capi` meanwhile (h5py's object for it made
    only for a value read through h5py); None where `capi` cannot open or list it."""
    with phil:
        held = capi.open_object(fid.id, path)
    if held is None:
        yield None
        return
    try:
        with phil:  # (our file object's error may come out of it: closed below)
            found = capi.attribute_names(held)
        opened = functools.cache(lambda: h5py.h5o.open(fid, path))
        yield None if found is None else (found, functools.partial(read_by_id, held, obj=opened))
    finally:
        with phil:
            capi.close_object(held)


def _write_key(dtype: np.dtype) -> Any:
    """What identifies the types of a value of `dtype`, or None (not kept): plain numbers
    and byte strings by their dtype, text (h5py's vlen str) as such. A dtype with fields,
    a subarray or metadata (h5py's enums and strings keep theirs there) is not kept: its
    `str` does not tell it apart."""
    if dtype.fields is not None or dtype.subdtype is not None:
        return None
    if dtype.kind != "O":
        return None if dtype.metadata else dtype.str
    text = h5t.check_string_dtype(dtype)
    if text is not None and text.length is None:
        return ("vlen", text.encoding)
    return None


def types(dtype: np.dtype) -> tuple[h5t.TypeID, h5t.TypeID]:
    """The file and memory types h5py makes for values of `dtype` (for an attribute or a
    dataset), kept for the kinds `_write_key` tells apart. Called with h5py's lock held."""
    return _types_of_key(_write_key(dtype), dtype)


def _types_of_key(key: Any, dtype: np.dtype) -> tuple[h5t.TypeID, h5t.TypeID]:
    """`types` of a dtype whose `_write_key` is `key`."""
    made = _WRITE.get(key) if key is not None else None
    if made is None:
        made = (h5t.py_create(dtype, logical=True), h5t.py_create(dtype))
        if key is not None:
            _WRITE.put(key, made)
    return made


def _text_pointers(data: np.ndarray, encoding: str) -> ctypes.Array[ctypes.c_char_p] | None:
    """The strings of a text array as C pointers for a vlen write, encoded as h5py encodes
    them (its errors included); None if an element is neither text nor bytes."""
    encoded = []
    for item in data.flat:
        if isinstance(item, str):
            value = item.encode("ascii" if encoding == "ascii" else "utf-8")
        elif isinstance(item, bytes):
            value = item
        else:
            return None
        if b"\0" in value:
            raise ValueError("VLEN strings do not support embedded NULLs")
        encoded.append(value)
    return (ctypes.c_char_p * len(encoded))(*encoded)


def _plain(given: Any) -> bool:
    """Whether `given` is a value h5py makes a 0-d array of its own dtype of, whatever its
    value: a NumPy number or bool, a Python float (not a Python int, whose dtype depends on
    its size)."""
    return isinstance(given, (np.number, np.bool_, float))


def write(obj: h5py.HLObject, attrs: dict[str, Any]) -> None:
    """`obj.attrs[name] = given` for each of `attrs`, attributes `obj` does not have yet
    (a file's root group opened once for all: 27 µs an attribute opened for each, 15 once)."""
    with phil:
        holder = _holder(obj.id)  # (kept: its identifier is closed when it is collected)
        for name, given in attrs.items():
            write_to(holder.id, name, given, lambda: obj)


def write_to(holder: int, name: str, given: Any, obj: Callable[[], h5py.HLObject]) -> None:
    """`write` to the object whose identifier is `holder` (not a file's); `obj()` gives it as
    h5py's object, for values of the kinds written through h5py."""
    # (what h5py's `array_for_new_object` makes of them, without its steps)
    data = np.asarray(given) if _plain(given) else array_for_new_object(given)
    key = _write_key(data.dtype)
    pointers = None
    if key is not None and data.dtype.kind == "O" and data.size:
        pointers = _text_pointers(data, key[1])
    if (
        key is None
        or isinstance(given, h5py.Empty)
        or (data.dtype.kind == "O" and pointers is None)
    ):
        obj().attrs[name] = given
        return
    with phil:
        htype, mtype = _types_of_key(key, data.dtype)
        encoded = name.encode("utf-8", "surrogateescape")
        buffer: Any
        if pointers is not None:  # text: pointers to its strings, of the file's vlen type
            memory_type, buffer = htype, pointers
        else:
            if not data.flags.c_contiguous:  # (ascontiguousarray makes 0-d 1-d)
                data = np.require(data, requirements="C")
            memory_type, buffer = mtype, data.ctypes.data
        capi.write_attribute(
            holder,
            encoded,
            htype.id,
            memory_type=memory_type.id,
            shape=data.shape,
            buffer=buffer,
        )
