"""Reading an .rtdc file's structure and attributes with h5py's low-level API: the same values
as h5py's high-level API, the same bytes written, from a file object or an in-memory image."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from h5py._objects import phil
from hypothesis import given, settings
from hypothesis import strategies as st

from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.errors import ProtocolError
from dcorfs.hdf5 import capi, h5attrs, structure
from dcorfs.hdf5.rtdc import describe, described
from dcorfs.hdf5.structure import (
    file_image,
    read_arrays,
    read_attributes,
    read_features,
)

VALUES: dict[str, Any] = {
    "text": "CellCarrier",
    "unicode": "µm² — ok",
    "empty text": "",
    "bytes": b"raw bytes",
    "numpy bytes": np.bytes_(b"IMAGE"),
    "int": 42,
    "negative": -7,
    "float": 0.25,
    "float32": np.float32(1.5),
    "uint16": np.uint16(65535),
    "bool": True,
    "numpy bool": np.bool_(False),
    "list of text": ["a", "bc", ""],
    "int array": np.arange(6, dtype="<i4"),
    "2d float": np.linspace(0, 1, 6).reshape(2, 3),
    "big endian": np.array([1.0, 2.0], dtype=">f8"),
    "fixed strings": np.array([b"ab", b"c"], dtype="S4"),
    "nothing": h5py.Empty("f8"),
    "zero length": np.zeros(0, dtype="<f4"),
    "compound": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
    # a type whose encoding is larger than the buffer `capi` keeps for encoding types
    "wide compound": np.zeros(1, dtype=[(f"member number {i}", "<f8") for i in range(40)]),
    # an enum (h5py keeps it in the dtype's metadata), then a plain value of its base type
    "enum": np.array(1, dtype=h5py.enum_dtype({"off": 0, "on": 1}, basetype="i1")),
    "int8": np.int8(1),
    # read by h5py through conversions of its own (to Python objects)
    "vlen ints": np.array(
        [np.arange(3, dtype="i4"), np.arange(1, dtype="i4")], dtype=h5py.vlen_dtype("i4")
    ),
    "text in a compound": np.array([(1, "ab")], dtype=[("a", "<i4"), ("b", h5py.string_dtype())]),
}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, h5py.Empty) or isinstance(b, h5py.Empty):
        return isinstance(a, h5py.Empty) and isinstance(b, h5py.Empty) and a.dtype == b.dtype
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        if a.dtype.kind == "O":  # text, or arrays (variable-length sequences)
            contents = a.size == b.size and all(map(same, a.flat, b.flat))
        elif a.dtype.hasobject:  # a compound holding text
            contents = a.tolist() == b.tolist()
        else:
            contents = a.tobytes() == b.tobytes()
        return a.dtype == b.dtype and a.shape == b.shape and contents
    return bool(a == b) and getattr(a, "dtype", None) == getattr(b, "dtype", None)


def written(values: dict[str, Any], fast: bool, *, track_order: bool = False) -> bytes:
    """The bytes of a file with these root and dataset attributes, set by h5py or by us."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver=("earliest", "v110"), track_order=track_order) as h5:
        data = h5.create_dataset("events/deform", data=np.arange(3.0))
        for obj in (h5, data):
            for name, value in values.items():
                if fast:
                    h5attrs.write(obj, {name: value})
                else:
                    obj.attrs[name] = value
    return buffer.getvalue()


@pytest.mark.parametrize("track_order", [False, True])
def test_attributes_are_written_byte_for_byte_as_h5py_writes_them(track_order: bool) -> None:
    assert written(VALUES, True, track_order=track_order) == written(
        VALUES, False, track_order=track_order
    )


texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
values = st.one_of(
    texts,
    st.binary(max_size=20),
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(texts, min_size=1, max_size=4),
    st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=4).map(
        lambda v: np.array(v, dtype="<f4")
    ),
)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text("abcxyz:", min_size=1, max_size=8), values, max_size=6))
def test_any_attributes_are_written_as_h5py_writes_them(given: dict[str, Any]) -> None:
    """The same bytes, or the same error (h5py writes no text with NUL in it)."""
    made = []
    for fast in (True, False):
        try:
            made.append(written(given, fast))
        except ValueError as exc:
            made.append(str(exc))
    assert made[0] == made[1]


def test_types_are_encoded_as_h5py_encodes_them() -> None:
    """The encoding of each attribute's and dataset's type (the key its reading types are
    kept by) is h5py's, also for a small type after a larger one (one buffer is kept for
    encoding: a shorter encoding must not come with the rest of a longer one)."""
    with h5py.File(io.BytesIO(written(VALUES, False)), "r") as h5:
        names = list(h5.attrs) * 2
        with phil:
            for name in names:
                attr = h5py.h5a.open(h5.id, name.encode())
                assert capi.attribute_type(attr.id) == attr.get_type().encode(), name
            data = h5["events/deform"].id
            assert capi.dataset_type(data.id)[0] == data.get_type().encode()


def test_attributes_read_as_h5py_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    image = written(VALUES, False, track_order=True)
    with h5py.File(io.BytesIO(image), "r") as h5:
        for obj in (h5, h5["events/deform"]):
            names = h5attrs.names(obj.id)
            assert [n.decode() for n in names] == list(obj.attrs)  # creation order
            for name in names:
                ours, theirs = h5attrs.read(obj.id, name), obj.attrs[name]
                assert same(ours, theirs), (name, ours, theirs)
    fid = file_image(image)
    reads = []
    read = h5attrs.read_by_id
    monkeypatch.setattr(h5attrs, "read_by_id", lambda *a, **k: reads.append(1) or read(*a, **k))
    try:
        with h5py.File(io.BytesIO(image), "r") as h5:
            for path in ("/", "events/deform"):
                found, theirs = read_attributes(fid, path, where="image"), h5[path].attrs
                assert list(found) == list(theirs)  # h5py's order (the root's: creation)
                assert found.keys() == VALUES.keys()
                assert all(same(found[k], theirs[k]) for k in VALUES), path
        assert len(reads) == 2 * len(VALUES)  # each through the object opened by `capi`
        with pytest.raises(ProtocolError, match="cannot read attributes of no/such"):
            read_attributes(fid, "no/such", where="image")
    finally:
        fid.close()


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text("abcxyz:", min_size=1, max_size=8), values, max_size=6))
def test_any_attributes_are_read_as_h5py_reads_them(given: dict[str, Any]) -> None:
    """Read through `capi` (numbers, text) or h5py's objects (the rest): h5py's values, in
    h5py's order (by name: the file does not track creation order)."""
    try:
        image = written(given, False)
    except ValueError:  # text h5py does not write
        return
    with h5py.File(io.BytesIO(image), "r") as h5:
        for obj in (h5, h5["events/deform"]):
            names = h5attrs.names(obj.id)
            assert [n.decode() for n in names] == list(obj.attrs)
            for name in names:
                ours, theirs = h5attrs.read(obj.id, name), obj.attrs[name]
                assert same(ours, theirs), (name, ours, theirs)


def test_features_read_through_capi_equal_those_read_through_h5py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Datasets of every kind under /events (byte orders, ranks, chunked or not, scalar,
    empty, compound, text, a broken link): the features found are h5py's."""
    path = write_rtdc(tmp_path / "m.rtdc", SampleSpec(events=20, seed=9, contour=True))
    with h5py.File(path, "a") as h5:
        events = h5["events"]
        events["big"] = np.arange(20, dtype=">f8")
        events["ints"] = np.arange(20, dtype="<i2")
        events.create_dataset("chunked", data=np.zeros((20, 3, 4), "u2"), chunks=(7, 3, 4))
        events["plain2d"] = np.zeros((20, 5), ">i4")
        events["one"] = 3.0
        events["none"] = h5py.Empty("f4")
        events["pairs"] = np.zeros(20, dtype=[("a", "<i4"), ("b", "<f8")])
        events["texts"] = np.array([b"ab"] * 20)
        if "mask" not in events:
            events["mask"] = np.zeros((20, 4, 4), bool)
        events["nowhere"] = h5py.SoftLink("/no/such/thing")
        events["trace/odd"] = np.zeros((20, 10), ">u2")
    image = path.read_bytes()
    found, plain = [], []
    read = structure._plain_feature

    def counted(group: Any, name: bytes) -> Any:
        made = read(group, name)
        plain.append(made is not None)
        return made

    for fast in (True, False):
        monkeypatch.setattr(structure, "_plain_feature", counted if fast else lambda *_: None)
        fid = file_image(image)
        try:
            found.append(read_features(fid, kind="resource", where="m"))
        finally:
            fid.close()
    assert {"big", "chunked", "pairs", "texts", "mask", "trace/odd", "contour"} <= found[0].keys()
    assert found[0] == found[1]
    assert sum(plain) >= len(found[0]) - 1  # every feature through `capi` but the contour
    assert [f.dtype.str for f in found[0].values()] == [f.dtype.str for f in found[1].values()]


def test_groups_of_small_datasets_read_as_h5py_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Logs, tables and basins of every kind of dataset: h5py's values (`Dataset[()]`), read
    through `capi` where they are plain values (numbers, byte strings, compounds of them)."""
    import hdf5plugin

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        logs = h5.create_group("logs")
        logs["fixed"] = np.array([b"line one", b"two"], dtype="S100")
        logs["texts"] = np.array(["a", "bc"], dtype=h5py.string_dtype())
        logs["table"] = np.zeros(3, dtype=[("time", "<f8"), ("n", ">i2")])
        logs["one"] = 2.5
        logs["big"] = np.arange(6, dtype=">i4").reshape(2, 3)
        logs["flags"] = np.array([True, False])
        logs["none"] = h5py.Empty("f4")
        logs["nothing"] = np.zeros(0, "<f8")
        logs.create_dataset("packed", data=np.arange(1000.0), **hdf5plugin.Zstd())
        logs["packed"].attrs["unit"] = "s"
    image = buffer.getvalue()
    reads = []
    read = capi.read_dataset
    monkeypatch.setattr(capi, "read_dataset", lambda *a: reads.append(1) or read(*a))
    fid = file_image(image)
    try:
        found = read_arrays(fid, "logs", where="image")
    finally:
        fid.close()
    with h5py.File(io.BytesIO(image), "r") as h5:
        assert found is not None and list(found) == list(h5["logs"])
        for name, item in h5["logs"].items():
            assert same(found[name].data, np.asarray(item[()])), name  # (as read_arrays keeps it)
    assert found["packed"].attrs == {"unit": "s"}
    assert len(reads) == 6  # all but text, null and zero-sized
    # where libhdf5's read through `capi` fails, h5py's tells why (its error not chained)

    def refused(*_: Any) -> None:
        raise capi.HDF5CallError("libhdf5's H5Dread failed")

    def broken(*_: Any) -> None:
        raise OSError("h5py's reason")

    monkeypatch.setattr(capi, "read_dataset", refused)
    fid = file_image(image)
    try:
        logs = h5py.h5o.open(fid, b"logs")
        assert same(
            h5attrs.dataset_value(h5py.h5o.open(logs, b"big")),
            np.arange(6).reshape(2, 3).astype(">i4"),
        )
        monkeypatch.setattr(h5py.Dataset, "__getitem__", broken)
        with pytest.raises(OSError, match="h5py's reason") as failed:
            h5attrs.dataset_value(h5py.h5o.open(logs, b"big"))
        assert failed.value.__context__ is None
    finally:
        fid.close()


def test_uncommon_names_and_array_types_as_h5py_has_them() -> None:
    """An attribute name that is not UTF-8 (kept as its bytes) and an array type of text."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        kind = np.dtype((h5py.string_dtype(), (2,)))
        h5.attrs.create("pairs", data=np.array([["a", "b"]], dtype=object), dtype=kind)
        h5.attrs[b"\xffname"] = 3
    with h5py.File(io.BytesIO(buffer.getvalue()), "r") as h5:
        for name in h5attrs.names(h5.id):
            ours, theirs = h5attrs.read(h5.id, name), h5.attrs[name]
            assert same(ours, theirs), (name, ours, theirs)
    made = []
    for fast in (True, False):
        out = io.BytesIO()
        with h5py.File(out, "w") as h5:
            if fast:
                h5attrs.write(h5, {b"\xffname".decode("utf-8", "surrogateescape"): 3})
            else:
                h5.attrs[b"\xffname"] = 3
        made.append(out.getvalue())
    assert made[0] == made[1]


def test_an_rtdc_file_reads_the_same_from_memory_and_through_a_file_object(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sample.rtdc"
    write_rtdc(path, SampleSpec(events=30, seed=5))
    with h5py.File(path, "r") as h5:
        features = {
            name: (item.dtype, item.shape)
            for name, item in h5["events"].items()
            if isinstance(item, h5py.Dataset)
        }
        features.update({f"trace/{n}": (d.dtype, d.shape) for n, d in h5["events/trace"].items()})
        chunks = {  # events per chunk, looked at for features of more than one dimension
            name: h5["events"][name].chunks[0] if len(shape) > 1 else 0
            for name, (_, shape) in features.items()
        }
        root = dict(h5.attrs)
        deform = dict(h5["events/deform"].attrs)
        logs = {name: data[()] for name, data in h5["logs"].items()}
    fid = file_image(path.read_bytes())
    with path.open("rb") as handle, h5py.File(handle, "r") as through:
        for opened in (fid, through.id):
            found = read_features(opened, kind="resource", where="sample")
            assert {n: (f.dtype, f.shape) for n, f in found.items()} == {
                n: (np.dtype(bool) if n == "mask" else d.newbyteorder("<"), s)
                for n, (d, s) in features.items()
            }
            assert all(f.source == "resource" for f in found.values())
            assert {n: f.chunk_rows for n, f in found.items()} == chunks
            assert described(describe(found), "resource") == found  # remembered as they are
            attrs = read_attributes(opened, "/", where="sample")
            assert attrs.keys() == root.keys()
            assert all(same(attrs[k], root[k]) for k in root)
            assert read_attributes(opened, "events/deform", where="sample").keys() == deform.keys()
            arrays = read_arrays(opened, "logs", where="sample")
            assert arrays is not None and arrays.keys() == logs.keys()
            assert all(np.array_equal(arrays[n].data, logs[n]) for n in logs)
            assert read_arrays(opened, "no-such-group", where="sample") is None
    fid.close()
    # remembered by an earlier version, without events per chunk: blocks of the usual size
    old = described({"image": ["|u1", [30, 80, 250]]}, "resource")["image"]
    assert old.chunk_rows == 0 and old.shape == (30, 80, 250)


def test_opening_a_file_with_contours_reads_no_more_of_it_than_without(tmp_path: Path) -> None:
    """A contour group's members are not counted when a file is scanned (its index lies
    scattered through the file, between the events' images: counting read it all, node by
    node, under h5py's lock): the file's blocks read by a scan stay few."""
    import time

    from dcorfs.cache.blockcache import BlockCache
    from dcorfs.cache.identity import ObjectId
    from dcorfs.hdf5.rtdc import RemoteFile, RtdcSource

    path = write_rtdc(
        tmp_path / "m.rtdc",
        SampleSpec(events=3000, seed=81, contour=True, image_shape=(40, 60), batch=100),
    )
    data = path.read_bytes()
    fetched: list[tuple[int, int]] = []

    def fetch(obj: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        fetched.append((start, stop))
        return data[start:stop]

    obj = ObjectId(key="local/m", etag="e", size=len(data))
    cache = BlockCache(fetch=fetch, store=None, block_size=4096, parallel=1)
    source = RtdcSource(RemoteFile(cache, obj, timeout=60), kind="resource")
    features = source.scan(time.monotonic() + 60)
    source.close()
    assert features["contour"].shape == (3000, 2)
    with h5py.File(path, "r") as h5:
        group_nodes = h5["events/contour"].id.get_num_objs()  # what counting would cost
    assert group_nodes == 3000
    assert len(fetched) < 60, f"{len(fetched)} reads of {len(data)} bytes to scan"
