"""HDF5 work in worker processes (`hdf5.workers`): what a call returns, raises and logs, a
worker that dies or is idle, and the structure of small files and skeletons made there equal
to the same read in the daemon through a file object."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import pytest

from dcorfs.cache.blockcache import BlockCache
from dcorfs.cache.derived import DerivedCache
from dcorfs.cache.identity import ObjectId
from dcorfs.devserver.condense import condensed_path
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.errors import DeadlineExceeded, ProtocolError, TransientError
from dcorfs.fs.producers.rtdc_file import _build_skeleton
from dcorfs.hdf5 import rtdc
from dcorfs.hdf5.rtdc import GROUPS, RemoteFile, RtdcResource, RtdcSource
from dcorfs.hdf5.structure import BASINS
from dcorfs.hdf5.workers import INLINE, HDF5Workers

from ..conftest import FIXTURE_FILES

log = logging.getLogger("dcorfs.tests.workers")


@pytest.fixture(scope="module")
def workers() -> Iterator[HDF5Workers]:
    made = HDF5Workers(1)
    made.start()
    assert made.ready(60)
    yield made
    made.close()


def soon() -> float:
    return time.monotonic() + 60


def warn_and_return(value: int) -> int:
    log.warning("made %d in process %d", value, os.getpid())
    return value * 2


def fail(message: str) -> None:
    raise ProtocolError(message)


def test_a_call_runs_in_another_process_and_its_warnings_reach_the_daemon(
    workers: HDF5Workers, caplog: pytest.LogCaptureFixture
) -> None:
    assert workers.run(os.getpid, deadline=soon()) != os.getpid()
    assert workers.pids() and os.getpid() not in workers.pids()
    stats = workers.stats()
    assert stats["running"] == 1 and stats["rss_bytes"] > 10 << 20 and stats["crashes"] == 0
    with caplog.at_level(logging.WARNING, logger="dcorfs"):
        assert workers.run(warn_and_return, 21, deadline=soon()) == 42
    said = [r for r in caplog.records if r.name == "dcorfs.tests.workers"]
    assert len(said) == 1 and said[0].getMessage().startswith("made 21 in process ")
    assert str(os.getpid()) not in said[0].getMessage().split()[-1:]
    with pytest.raises(ProtocolError, match="^a bad file$"):
        workers.run(fail, "a bad file", deadline=soon())
    assert INLINE.run(os.getpid, deadline=soon()) == os.getpid()  # no processes: here


def test_workers_are_forked_from_a_server_that_the_mount_starts_first() -> None:
    made = HDF5Workers(1)
    try:
        made.serve()
        assert made.served(60)  # its imports done: it forked a process that did nothing
        server = made.stats()["server_rss_bytes"]
        assert server > 10 << 20 and made.stats()["running"] == 0  # no worker yet
        assert made.run(os.getpid, deadline=soon()) == os.getpid()  # alone: here
        made.start()
        assert made.ready(60)
        worker = made.run(os.getpid, deadline=soon())
        assert worker != os.getpid() and _parent(worker) == _parent(made.pids()[0]) != os.getpid()
    finally:
        made.close()
    assert not HDF5Workers(0).served(1)


def _in_a_process(tmp_path: Path, code: str) -> list[str]:
    """Run `code` in a Python of its own (its own forkserver: the one of this process may run
    already), with `tmp_path` importable; its output's words."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, str(tmp_path)])}
    script = tmp_path / "main.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_workers_and_their_server_end_when_the_daemon_ends_abruptly(tmp_path: Path) -> None:
    # the daemon ends with os._exit (its pools not shut down), or is killed
    pids = _in_a_process(
        tmp_path,
        "import os\n"
        "from dcorfs.hdf5 import workers\n"
        "if __name__ == '__main__':\n"
        "    made = workers.HDF5Workers(1)\n"
        "    made.serve()\n"
        "    made.start()\n"
        "    assert made.ready(60)\n"
        "    print(*made.pids(), workers._server_pid(), flush=True)\n"
        "    os._exit(0)\n",
    )
    assert len(pids) == 2
    until = time.monotonic() + 60
    while any(_state(int(pid)) not in ("gone", "Z") for pid in pids):
        assert time.monotonic() < until, f"still running: {pids}"
        time.sleep(0.1)


def test_the_wait_for_the_server_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(4)\n")
    said = _in_a_process(
        tmp_path,
        "import time\n"
        "from dcorfs.hdf5 import workers\n"
        "if __name__ == '__main__':\n"
        "    made = workers.HDF5Workers(1, preload=['slow_to_import'])\n"
        "    made.serve()\n"
        "    started = time.monotonic()\n"
        "    ready = made.served(0.5)\n"
        "    print(ready, time.monotonic() - started < 3, made.served(30), flush=True)\n",
    )
    assert said == ["False", "True", "True"]  # not ready within 0.5 s, told so in time


def _parent(pid: int) -> int:
    return int(_stat(pid)[1])


def test_a_worker_that_dies_fails_its_call_and_the_next_call_is_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    made = HDF5Workers(1)
    made.start()
    try:
        assert made.ready(60)
        with pytest.raises(ProtocolError, match="died"), caplog.at_level(logging.WARNING):
            made.run(os._exit, 3, deadline=soon())
        assert made.crashes == 1
        assert "died" in caplog.text
        assert made.run(os.getpid, deadline=soon()) == os.getpid()  # here, none started
        made.start()
        assert made.ready(60)
        assert made.run(os.getpid, deadline=soon()) != os.getpid()
        assert made.started == 2
    finally:
        made.close()


def test_a_call_past_its_deadline_fails_and_idle_workers_stop(workers: HDF5Workers) -> None:
    made = HDF5Workers(1, idle=0.4)
    made.start()
    try:
        assert made.ready(60)
        with pytest.raises(DeadlineExceeded):
            made.run(time.sleep, 3, deadline=time.monotonic() + 0.5)
        first = made.pids()
        assert first
        until = time.monotonic() + 30
        while made.pids() and time.monotonic() < until:  # (the sleep ends, then idle)
            time.sleep(0.1)
        assert not made.pids(), "still running while idle"
        while any(_state(pid) not in ("gone", "Z") for pid in first) and time.monotonic() < until:
            time.sleep(0.1)  # (stopped once the sleep it still runs has ended)
        assert all(_state(pid) in ("gone", "Z") for pid in first)
        # one call at a time runs here and starts none; calls side by side start them again
        assert made.run(os.getpid, deadline=soon()) == os.getpid()
        assert made.started == 1
        with concurrent.futures.ThreadPoolExecutor(2) as two:
            both = [two.submit(made.run, time.sleep, 0.5, deadline=soon()) for _ in range(2)]
            concurrent.futures.wait(both)
        assert made.started == 2 and made.ready(60)
        assert made.run(os.getpid, deadline=soon()) not in (*first, os.getpid())
    finally:
        made.close()
    with pytest.raises(TransientError):
        made.run(os.getpid, deadline=soon())


def _state(pid: int) -> str:
    try:
        return _stat(pid)[0]
    except OSError:
        return "gone"


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command (state, parent, …)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _sources(path: Path, kind: str, workers: HDF5Workers) -> tuple[RtdcSource, RtdcSource]:
    """The file as a small source read from memory in `workers`, and opened through a file
    object in this process."""
    data = path.read_bytes()
    obj = ObjectId(key=f"local/{path.name}", etag="e", size=len(data))

    def fetch(_: ObjectId, start: int, stop: int, deadline: float) -> bytes:
        return data[start:stop]

    made = []
    for whole, where in ((True, workers), (False, INLINE)):
        cache = BlockCache(fetch=fetch, store=None, block_size=1 << 16, parallel=1)
        remote = RemoteFile(cache, obj, timeout=60)
        made.append(RtdcSource(remote, kind=kind, whole=whole, workers=where))
    return made[0], made[1]


def _equal(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b)) and np.asarray(a).dtype == np.asarray(b).dtype  # type: ignore[arg-type]
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and _equal(vars(a), vars(b))
    return type(a) is type(b) and bool(a == b)


FILES = [
    ("images and traces", SampleSpec(events=40, seed=3)),
    ("contour", SampleSpec(events=25, seed=4, contour=True, image_shape=(30, 40))),
    ("scalars only", SampleSpec(events=60, seed=5, images=False, traces=False)),
]


@pytest.mark.parametrize("name", [n for n, _ in FILES] + [p.name for p in FIXTURE_FILES])
def test_small_files_read_in_a_worker_equal_them_read_through_a_file_object(
    name: str, workers: HDF5Workers, tmp_path: Path
) -> None:
    spec = dict(FILES).get(name)
    path = (
        write_rtdc(tmp_path / "m.rtdc", spec)
        if spec
        else next(p for p in FIXTURE_FILES if p.name == name)
    )
    in_worker, opened = _sources(path, "resource", workers)
    calls = workers.calls
    try:
        features = in_worker.scan(soon())
        assert features and _equal(features, opened.scan(soon()))
        paths = ["/", *(f"events/{n}" for n in features if n != "contour")]
        assert _equal(in_worker.attrs(paths, deadline=soon()), opened.attrs(paths, deadline=soon()))
        groups = [*GROUPS, "basins", "no-such-group"]
        assert _equal(
            in_worker.arrays(groups, deadline=soon()), opened.arrays(groups, deadline=soon())
        )
        layouts = in_worker._all_layouts(soon())
        assert layouts and _equal(layouts, opened._all_layouts(soon()))
        assert not in_worker.is_open  # read from memory, never opened here
        assert workers.calls == calls + 4
        # the synthesized file's skeleton: outline and build in one call, from memory
        in_worker.features, opened.features = features, opened.features or features
        derived = DerivedCache(store=None, block_size=1 << 20)
        events = next(iter(features.values())).shape[0]
        made = RtdcResource(in_worker, None, events, derived, workers=workers)
        here = RtdcResource(opened, None, events, derived)
        skeleton = _build_skeleton(made, None, deadline=soon())
        assert workers.calls == calls + 5  # the outline from memory, in the same call
        assert not in_worker.is_open
        assert skeleton == _build_skeleton(here, None, deadline=soon())
        assert opened.is_open  # opened: its outline read here, through the file object
    finally:
        in_worker.close()
        opened.close()


def _layouts_by_h5py(path: Path) -> dict[str, Any]:
    """The layouts of a file's event data as h5py's high-level objects find them (the walk
    that `rtdc.layouts_of` makes through low-level ones)."""
    found: dict[str, Any] = {}

    def visit(name: str, item: object) -> None:
        if isinstance(item, h5py.Dataset):
            found[name] = rtdc._layout_of(item, name, "here")

    with h5py.File(path, "r") as h5:
        events = h5.get("events")
        if isinstance(events, h5py.Group):
            events.visititems(visit)
    return found


def _odd_file(path: Path, how: str) -> Path:
    """Files whose event data are laid out unusually, by `how`."""
    with h5py.File(path, "w") as h5:
        if how == "events is a dataset":
            h5["events"] = np.arange(5.0)
            return path
        if how == "no events":
            h5["other/deform"] = np.arange(5.0)
            return path
        events = h5.create_group("events")
        events["contiguous"] = np.arange(10, dtype=np.uint16)
        events.create_dataset("chunked", data=np.arange(30.0).reshape(10, 3), chunks=(4, 3))
        events.create_dataset("zstd", data=np.arange(40.0), chunks=(8,), **hdf5plugin.Zstd())
        events.create_dataset("never written", shape=(10,), dtype="f4", chunks=(5,))
        events.create_dataset("empty", shape=(0,), dtype="f8")
        events["trace/fl1_raw"] = np.zeros((10, 7), dtype=np.int16)
        events["trace/deeper/x"] = np.ones(3)
        events["hard link"] = events["contiguous"]  # one object, visited once
        events["soft link"] = h5py.SoftLink("/events/chunked")
        events["broken"] = h5py.SoftLink("/nowhere")
        events.attrs["note"] = "attributes are no datasets"
    return path


ODD = ["nested, linked, unwritten", "events is a dataset", "no events"]


@pytest.mark.parametrize("name", [n for n, _ in FILES] + [p.name for p in FIXTURE_FILES] + ODD)
def test_layouts_read_through_low_level_objects_equal_h5pys_own_walk(
    name: str, tmp_path: Path
) -> None:
    spec = dict(FILES).get(name)
    if spec:
        path = write_rtdc(tmp_path / "m.rtdc", spec)
    elif name in ODD:
        path = _odd_file(tmp_path / "odd.h5", name)
    else:
        path = next(p for p in FIXTURE_FILES if p.name == name)
    expected = _layouts_by_h5py(path)
    with h5py.File(path, "r") as h5:
        found = rtdc.layouts_of(h5.id, "here")
    assert _equal(found, expected)
    if name == ODD[0]:
        assert set(found) == {
            "contiguous",
            "chunked",
            "zstd",
            "never written",
            "empty",
            "trace/fl1_raw",
            "trace/deeper/x",
        }
        assert found["never written"] is None and found["empty"] is None
        assert found["zstd"] is not None and found["zstd"].codec is not None
    elif name in ODD:
        assert found == {}


def test_a_scan_with_layouts_reads_them_in_the_same_call(
    workers: HDF5Workers, tmp_path: Path
) -> None:
    path = write_rtdc(tmp_path / "m.rtdc", dict(FILES)["scalars only"])
    in_worker, opened = _sources(path, "condensed", workers)
    try:
        calls = workers.calls
        features = in_worker.scan(soon(), outline=True, layouts=True)
        assert features and workers.calls == calls + 1
        in_worker.layouts_ahead(soon())  # read already: nothing more
        expected = opened._all_layouts(soon())
        assert expected.keys() >= features.keys()
        for name, layout in expected.items():
            assert _equal(in_worker._layout(name, soon()), layout)
        assert workers.calls == calls + 1 and not in_worker.is_open
        # a file not read from memory: its layouts are read by `layouts_ahead`, opened
        unused, other = _sources(path, "condensed", workers)
        unused.close()
        assert _equal(other.scan(soon(), layouts=True), features)
        assert not other._all_layouts_read
        other.layouts_ahead(soon())
        assert other._all_layouts_read and other.is_open
        assert _equal(other._layout("deform", soon()), expected["deform"])
        other.close()
    finally:
        in_worker.close()
        opened.close()


def test_layouts_that_fail_with_the_features_are_left_to_layouts_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_rtdc(tmp_path / "m.rtdc", dict(FILES)["scalars only"])
    source, opened = _sources(path, "condensed", INLINE)  # (in this process: patched)
    real = rtdc.layouts_of

    def failing(fid: Any, where: str) -> Any:
        raise KeyError("Unable to synchronously open object (component not found)")

    try:
        monkeypatch.setattr(rtdc, "layouts_of", failing)
        features = source.scan(soon(), outline=True, layouts=True)
        assert features and not source._all_layouts_read
        monkeypatch.setattr(rtdc, "layouts_of", real)
        source.layouts_ahead(soon())
        assert source._all_layouts_read
        assert _equal(source._layout("deform", soon()), opened._all_layouts(soon())["deform"])
    finally:
        source.close()
        opened.close()


def _condensed(original: Path, tmp_path: Path) -> Path:
    """The condensed file of `original` as the devserver makes it."""
    return condensed_path(
        original,
        "0" * 64,
        tmp_path / "state",
        site=tmp_path,
        resource_id="r1",
        site_url="http://127.0.0.1:9",
        object_url="http://127.0.0.1:9/o",
    )


def test_a_small_condensed_file_has_its_basins_read_with_its_features(
    workers: HDF5Workers, tmp_path: Path
) -> None:
    original = write_rtdc(tmp_path / "m.rtdc", SampleSpec(events=30, seed=6, images=False))
    path = _condensed(original, tmp_path)
    in_worker, opened = _sources(path, "condensed", workers)
    calls = workers.calls
    try:
        assert _equal(in_worker.scan(soon(), basins=True), opened.scan(soon(), basins=True))
        basins = in_worker.arrays([BASINS], deadline=soon())  # read with the features
        assert workers.calls == calls + 1
        assert len(basins[BASINS] or {}) == 3
        assert _equal(basins, opened.arrays([BASINS], deadline=soon()))
        # kept for that one call: asked again, read again
        assert _equal(in_worker.arrays([BASINS], deadline=soon()), basins)
        assert workers.calls == calls + 2
        # a scan not told that basins come next reads nothing more
        in_original, _ = _sources(original, "resource", workers)
        in_original.scan(soon())
        in_original.arrays([BASINS], deadline=soon())
        in_original.close()
        assert workers.calls == calls + 4
    finally:
        in_worker.close()
        opened.close()


def test_a_resource_of_small_files_has_its_outline_read_with_their_features(
    workers: HDF5Workers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scanned with `outline`, each file has what the outline takes from it read in the same
    call: building the synthesized file's skeleton is then one call (no file sent, none
    opened), and gives the skeleton read from the files through file objects."""
    original = write_rtdc(tmp_path / "m.rtdc", SampleSpec(events=30, seed=8, contour=True))
    condensed = _condensed(original, tmp_path)
    sources = [
        _sources(path, kind, workers)
        for path, kind in ((original, "resource"), (condensed, "condensed"))
    ]
    derived = DerivedCache(store=None, block_size=1 << 20)
    try:
        calls = workers.calls
        for in_worker, opened in sources:
            in_worker.features = in_worker.scan(soon(), outline=True)
            opened.features = opened.scan(soon(), outline=True)  # (opened: nothing kept)
            assert _equal(in_worker.features, opened.features)
        assert workers.calls == calls + 2
        (original_in, original_here), (condensed_in, condensed_here) = sources
        made = RtdcResource(original_in, condensed_in, 30, derived, workers=workers)
        here = RtdcResource(original_here, condensed_here, 30, derived)
        assert {f.source for f in made.features.values()} == {"resource", "condensed"}
        run, ran = workers.run, []

        def spied(fn: Any, *args: Any, deadline: float) -> Any:
            ran.append(fn.__name__)
            return run(fn, *args, deadline=deadline)

        monkeypatch.setattr(workers, "run", spied)
        skeleton = _build_skeleton(made, None, deadline=soon())
        assert workers.calls == calls + 3  # the build alone, given the outline (no file)
        assert ran == ["skeleton_of"]
        assert not original_in.is_open and not condensed_in.is_open
        assert not _keeps(original_in) and not _keeps(condensed_in)  # nothing left behind
        assert skeleton == _build_skeleton(here, None, deadline=soon())
        # what was kept is given once: built again, the outline is read from the files
        assert _build_skeleton(made, None, deadline=soon()) == skeleton
        assert workers.calls == calls + 4
        assert ran[1] == "_on_outline"  # the files' bytes sent
    finally:
        for pair in sources:
            for source in pair:
                source.close()


def _keeps(source: RtdcSource) -> bool:
    """Whether a source keeps parts of an outline read ahead."""
    return bool(source._kept_attrs) or any(group in source._kept for group in GROUPS)


@pytest.mark.parametrize("kind", ["resource", "condensed"])
def test_a_resource_of_one_small_file_keeps_nothing_after_its_skeleton(
    kind: str, workers: HDF5Workers, tmp_path: Path
) -> None:
    """The original alone (no condensed file yet) or the condensed file alone (the original
    refused): what the scan read ahead is not all the outline needs; the skeleton is that
    read through a file object, and nothing read ahead is kept after it."""
    original = write_rtdc(tmp_path / "m.rtdc", SampleSpec(events=30, seed=8, contour=True))
    path = original if kind == "resource" else _condensed(original, tmp_path)
    in_worker, opened = _sources(path, kind, workers)
    derived = DerivedCache(store=None, block_size=1 << 20)
    try:
        for source in (in_worker, opened):
            source.features = source.scan(soon(), outline=True)
        assert _keeps(in_worker)
        pair = [
            RtdcResource(*((s, None) if kind == "resource" else (None, s)), 30, derived)
            for s in (in_worker, opened)
        ]
        skeleton = _build_skeleton(pair[0], None, deadline=soon())
        assert not _keeps(in_worker)
        assert skeleton == _build_skeleton(pair[1], None, deadline=soon())
    finally:
        in_worker.close()
        opened.close()


def test_at_most_so_many_sources_keep_outlines_read_ahead(
    workers: HDF5Workers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resource opened but never listed keeps what was read ahead for its outline only
    until `KEPT_OUTLINES` later ones keep theirs."""
    monkeypatch.setattr(rtdc, "KEPT_OUTLINES", 2)
    original = write_rtdc(tmp_path / "m.rtdc", SampleSpec(events=20, seed=9, images=False))
    made = [_sources(original, "resource", workers)[0] for _ in range(3)]
    try:
        for source in made:
            source.scan(soon(), outline=True)
        assert [_keeps(source) for source in made] == [False, True, True]
        made[1].attrs(["/"], deadline=soon())  # taken: the rest is kept
        assert _keeps(made[1]) and "/" not in made[1]._kept_attrs
    finally:
        for source in made:
            source.close()


def test_a_damaged_small_file_fails_in_the_worker_with_its_name(
    workers: HDF5Workers, tmp_path: Path
) -> None:
    path = tmp_path / "bad.rtdc"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)
    in_worker, _ = _sources(path, "resource", workers)
    with pytest.raises(ProtocolError, match=r"^local/bad.rtdc is not a readable HDF5 file"):
        in_worker.scan(soon())
    assert workers.run(os.getpid, deadline=soon()) != os.getpid()  # the worker serves on
