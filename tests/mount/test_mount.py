"""Real mounts against the devserver: the tree, bytes equal to dclab's, cache and privacy."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dclab
import h5py
import numpy as np
import pandas as pd
import pytest
import requests

from dcorfs.cache import slots
from dcorfs.cache.derived import is_derived
from dcorfs.cache.diskstore import read_inventory
from dcorfs.cache.identity import ObjectId
from dcorfs.devserver.datadir import write_json
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.devserver.server import DevServer
from dcorfs.fs.fuse_ops import IO_SIZE

from ..cachefiles import StoredBlock, flip, object_files, on_disk, stored_blocks
from ..conftest import TOKENS, api, assert_tables, info, innate_features, resource_dir, rtdc_entries
from ..mounts import dcorfs, kill_and_unmount, mounted, needs_fuse, resident, steady

pytestmark = [
    needs_fuse,
    pytest.mark.fuse,
    # a field fixture stores `roi position x` as a float; dclab says so when opening it
    pytest.mark.filterwarnings("ignore::dclab.rtdc_dataset.config.WrongConfigurationTypeWarning"),
]


@pytest.fixture(scope="module")
def public_mount(devserver: DevServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("public-mount")
    with mounted(root / "mnt", devserver.url, root / "cache") as mnt:
        yield mnt


def ls(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def truth(ds: Any, name: str) -> np.ndarray:  # type: ignore[type-arg]
    if name.startswith("trace/"):
        return np.asarray(ds["trace"][name.split("/", 1)[1]][:])
    return np.asarray(ds[name][:])


def feature_files(directory: Path) -> dict[str, Path]:
    files = {p.stem: p for p in directory.glob("*.npy")}
    files.update({f"trace/{p.stem}": p for p in (directory / "trace").glob("*.npy")})
    return files


def test_every_level_lists_and_reads_with_shell_tools(public_mount: Path) -> None:
    mnt = public_mount
    assert sorted(ls(mnt)) == [
        ".dcorfs",
        "README.txt",
        "by-id",
        "circles",
        "collections",
        "datasets",
    ]
    assert "by-id" in (mnt / "README.txt").read_text()
    assert {"generated", "scalars-only"} <= set(ls(mnt / "datasets"))
    assert "secret-study" not in ls(mnt / "datasets")  # private, no token
    assert sorted(ls(mnt / "circles")) == ["private-lab", "public-lab"]
    assert ls(mnt / "circles" / "private-lab") == []  # its dataset is private
    assert ls(mnt / "collections" / "showcase") == ["generated"]
    dataset = mnt / "datasets" / "generated"
    assert sorted(ls(dataset)) == ["M001_data", "M002_data", "dataset.json", "notes.txt"]
    assert (dataset / "notes.txt").read_text() == "a plain text resource\n"
    assert json.loads((dataset / "dataset.json").read_text())["name"] == "generated"
    listing = subprocess.run(
        ["ls", "-lR", str(dataset)], capture_output=True, text=True, check=True
    ).stdout
    assert "deform.npy" in listing and "features.tsv" in listing and "fl1_raw.npy" in listing
    found = subprocess.run(
        ["find", str(mnt / "circles")], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert str(mnt / "circles/public-lab/generated/M001_data/trace/fl1_raw.npy") in found
    head = subprocess.run(
        ["head", "-n", "3", str(dataset / "M001_data" / "features.tsv")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(head) == 3 and "deform" in head[0].split()
    cat = subprocess.run(
        ["cat", str(dataset / "M001_data" / "metadata.json")], capture_output=True, check=True
    ).stdout
    assert json.loads(cat)["experiment"]["event count"] == 300


def test_by_id_resolves_any_resource_and_lists_opened_ones(
    public_mount: Path, devserver: DevServer
) -> None:
    entry = next(e for e in rtdc_entries(devserver) if e["name"] == "M002_data.rtdc")
    by_id = public_mount / "by-id" / entry["id"]
    assert (by_id / "deform.npy").stat().st_size > 128
    assert entry["id"] in ls(public_mount / "by-id")
    plain = next(e for e in info(devserver) if e["name"] == "notes.txt")
    assert (public_mount / "by-id" / plain["id"] / "notes.txt").read_bytes() == Path(
        plain["path"]
    ).read_bytes()


def test_unknown_names_are_enoent(public_mount: Path) -> None:
    for path in (
        "by-id/00000000-0000-0000-0000-000000000000",
        "by-id/not-an-id",
        "datasets/no-such-dataset",
        "datasets/generated/M009_data",
        "circles/nowhere",
    ):
        with pytest.raises(FileNotFoundError):
            (public_mount / path).stat()


def test_read_only(public_mount: Path) -> None:
    target = public_mount / "datasets" / "generated"
    for action in (
        lambda: (target / "new.txt").write_text("x"),
        lambda: (target / "notes.txt").open("r+b"),
        lambda: (target / "sub").mkdir(),  # noqa: PLW0108
        lambda: (target / "notes.txt").unlink(),  # noqa: PLW0108
        lambda: (target / "notes.txt").chmod(0o777),
    ):
        with pytest.raises(OSError) as caught:
            action()
        assert caught.value.errno == errno.EROFS


def test_no_extended_attributes(public_mount: Path) -> None:
    """The daemon says once that it has none: the kernel answers every later ask itself
    (`ls -l` asks for ACLs of every entry), and there is never one to find."""
    target = public_mount / "datasets" / "generated" / "notes.txt"
    for _ in range(2):
        with pytest.raises(OSError) as caught:
            os.getxattr(target, "user.comment")
        assert caught.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as caught:
            os.listxattr(target)
        assert caught.value.errno == errno.EOPNOTSUPP


def test_every_feature_equals_dclab_bit_for_bit(public_mount: Path, devserver: DevServer) -> None:
    checked = 0
    for entry in rtdc_entries(devserver):
        directory = resource_dir(public_mount, entry)
        files = feature_files(directory)
        with dclab.new_dataset(entry["path"]) as ds:
            innate = innate_features(ds)
            assert innate <= set(files), f"{entry['name']}: missing {innate - set(files)}"
            for name, path in files.items():
                expected = truth(ds, name)
                for loaded in (np.load(path), np.load(path, mmap_mode="r")):
                    if name in innate:  # computed by DCOR's condensing: the condensed dtype
                        assert loaded.dtype == expected.dtype, (entry["name"], name)
                    assert loaded.shape == expected.shape, (entry["name"], name)
                    assert np.array_equal(loaded, expected, equal_nan=loaded.dtype.kind == "f")
                checked += 1
    assert checked > 50


def test_condensed_only_features_are_offered(public_mount: Path, devserver: DevServer) -> None:
    entry = next(e for e in rtdc_entries(devserver) if e["name"] == "M001_data.rtdc")
    directory = resource_dir(public_mount, entry)
    with dclab.new_dataset(entry["path"]) as ds:
        assert "volume" not in ds.features_innate
        assert np.array_equal(np.load(directory / "volume.npy"), ds["volume"][:])


def test_features_tsv_equals_the_features(public_mount: Path, devserver: DevServer) -> None:
    for entry in rtdc_entries(devserver):
        directory = resource_dir(public_mount, entry)
        text = (directory / "features.tsv").read_bytes()
        # columns by their names as the readers give them, no stripping (the header is bare)
        table = pd.read_csv(io.BytesIO(text), sep="\t")
        named = np.genfromtxt(io.BytesIO(text), delimiter="\t", names=True, ndmin=1)
        assert list(named.dtype.names) == list(table.columns)
        assert all((directory / f"{column}.npy").exists() for column in table.columns)
        plain = np.loadtxt(io.BytesIO(text), skiprows=1, delimiter="\t", ndmin=2)
        assert plain.shape == (entry_events(directory), len(table.columns))
        for column in table.columns:
            assert np.allclose(named[column], table[column].to_numpy(), equal_nan=True)
        for column in table.columns:
            stored = np.load(directory / f"{column}.npy")
            assert np.array_equal(
                table[column].to_numpy().astype(stored.dtype), stored, equal_nan=True
            ), (entry["name"], column)
        assert len(text) == (directory / "features.tsv").stat().st_size


def entry_events(directory: Path) -> int:
    return int(json.loads((directory / "metadata.json").read_text())["experiment"]["event count"])


def test_text_views_equal_dcserv(public_mount: Path, devserver: DevServer) -> None:
    for entry in rtdc_entries(devserver):
        directory = resource_dir(public_mount, entry)

        def dcserv(query: str, rid: str = entry["id"]) -> Any:
            status, body = api(devserver, "dcserv", id=rid, query=query, version="2")
            assert status == 200
            return body["result"]

        assert json.loads((directory / "metadata.json").read_text()) == dcserv("metadata")
        logs = dcserv("logs")
        assert sorted(p.name for p in (directory / "logs").iterdir()) == sorted(
            f"{name}.txt" for name in logs
        )
        for name, lines in logs.items():
            assert (directory / "logs" / f"{name}.txt").read_text().splitlines() == lines
        assert_tables(directory, dcserv("tables"))


def test_one_scalar_of_an_image_resource_moves_a_small_fraction(
    fresh_devserver: DevServer, tmp_path: Path
) -> None:
    entry = next(e for e in rtdc_entries(fresh_devserver) if e["name"] == "M001_data.rtdc")
    with mounted(tmp_path / "mnt", fresh_devserver.url, tmp_path / "cache") as mnt:
        directory = resource_dir(mnt, entry)
        fresh_devserver.stats.reset()
        deform = np.load(directory / "deform.npy")
        assert deform.shape == (300,)
        moved = fresh_devserver.stats.snapshot()["object_bytes"]
        assert 0 < moved < 0.25 * entry["size"], (moved, entry["size"])
        # the original is described in the background after the first read: let that end
        assert steady(lambda: fresh_devserver.stats.snapshot()["object_requests"])
        before = fresh_devserver.stats.snapshot()["object_requests"]
        np.load(directory / "deform.npy")
        assert fresh_devserver.stats.snapshot()["object_requests"] == before


def test_a_description_under_way_is_remembered_when_the_mount_closes(
    fresh_devserver: DevServer, tmp_path: Path
) -> None:
    """A scalar is served from the condensed file before the original is described (that
    comes after it, a chain of round trips); unmounted right after that read, the mount lets
    the description end and remembers it: the next mount lists the resource without a
    request for the original."""
    entry = next(e for e in rtdc_entries(fresh_devserver) if e["name"] == "M001_data.rtdc")
    faults = f"{fresh_devserver.url}/_devserver/faults"
    requests.put(faults, json={"latency_ms": 150}, timeout=30)
    try:
        with mounted(tmp_path / "mnt", fresh_devserver.url, tmp_path / "cache") as mnt:
            fresh_devserver.stats.reset()
            assert np.load(resource_dir(mnt, entry) / "deform.npy").shape == (300,)
            asked = original_requests(fresh_devserver, entry["id"])
        assert original_requests(fresh_devserver, entry["id"]) > asked  # it went on after
        fresh_devserver.stats.reset()
        with mounted(tmp_path / "mnt", fresh_devserver.url, tmp_path / "cache") as mnt:
            assert "image.npy" in {p.name for p in resource_dir(mnt, entry).iterdir()}
        assert original_requests(fresh_devserver, entry["id"]) == 0
    finally:
        requests.put(faults, json={"latency_ms": 0}, timeout=30)


def original_requests(server: DevServer, resource_id: str) -> int:
    """Requests for the original file (not the condensed one) of a resource so far."""
    objects = server.stats.snapshot()["objects"].values()
    return sum(
        o["requests"]
        for o in objects
        if o["resource_id"] == resource_id and o["artifact"] == "resource"
    )


def test_listing_a_dataset_whole_decodes_nothing(
    fresh_devserver: DevServer, tmp_path: Path
) -> None:
    """`ls -lR` of a dataset opens its resources ahead of readers (doc/ARCHITECTURE.md, "Speed")
    but makes no feature values: those are decoded once a reader looks for one."""
    with mounted(tmp_path / "mnt", fresh_devserver.url, tmp_path / "cache") as mnt:
        listed = subprocess.run(
            ["ls", "-lR", str(mnt / "datasets" / "generated")],
            check=False,
            capture_output=True,
            text=True,
        )
        assert listed.returncode == 0 and "deform.npy" in listed.stdout, listed.stderr
        time.sleep(1)  # what the opening starts in the background has started
        status = json.loads((mnt / ".dcorfs" / "status.json").read_text())
        assert status["decoded"]["fetched_bytes"] == 0, status["decoded"]
        np.load(mnt / "datasets" / "generated" / "M001_data" / "deform.npy")
        status = json.loads((mnt / ".dcorfs" / "status.json").read_text())
        assert status["decoded"]["fetched_bytes"] > 0, status["decoded"]


def generated_images(devserver: DevServer) -> tuple[dict[str, Any], list[tuple[int, int]], int]:
    """The generated dataset's M001 (written by dclab: chunks of 52 images, 1,040,000 bytes,
    no multiple of 1 MiB): its entry, the byte spans of its image chunks, images per chunk."""
    entry = next(
        e
        for e in rtdc_entries(devserver)
        if e["name"] == "M001_data.rtdc" and e["dataset"] == "generated"
    )
    with h5py.File(entry["path"]) as h5:
        image = h5["events/image"]
        spans: list[tuple[int, int]] = []
        image.id.chunk_iter(lambda c: spans.append((c.byte_offset, c.byte_offset + c.size)))
        return entry, spans, image.chunks[0]


def fetched_of(
    devserver: DevServer, entry: dict[str, Any]
) -> tuple[Callable[[tuple[int, int]], int], list[tuple[int, int]]]:
    """How many bytes of a span of the entry's original file the devserver has sent (and the
    ranges it sent, for messages)."""
    stats = devserver.stats.snapshot(with_log=True)
    paths = {
        path
        for path, o in stats["objects"].items()
        if o["resource_id"] == entry["id"] and o["artifact"] == "resource"
    }
    ranges = [e["range"] for e in stats["log"] if e.get("object") in paths and e.get("range")]

    def fetched(span: tuple[int, int]) -> int:
        return sum(max(0, min(b, span[1]) - max(a, span[0])) for a, b in ranges)

    return fetched, ranges


def test_a_random_event_fetches_only_the_chunk_that_holds_it(
    fresh_devserver: DevServer, tmp_path: Path
) -> None:
    """Decoded values are made in blocks of whole chunks (`cache.prefetch.decoded_block`): one
    image of a file written by dclab (chunks of 52 images, 1,040,000 bytes: no multiple of
    1 MiB) fetches its own chunk, not the next one too."""
    entry, spans, rows = generated_images(fresh_devserver)
    with h5py.File(entry["path"]) as h5:
        image = h5["events/image"]
        event = 4 * rows + rows // 2  # mid-chunk: the kernel's read-ahead stays inside it
        shape, truth = image.shape, image[event]
    # with blocks of 1 MiB, the one holding this image would hold the start of chunk 5 too
    assert len(spans) == 6 and (event * truth.nbytes) >> 20 == (5 * rows * truth.nbytes) >> 20
    with mounted(tmp_path / "mnt", fresh_devserver.url, tmp_path / "cache") as mnt:
        path = resource_dir(mnt, entry) / "image.npy"
        header = io.BytesIO()  # what numpy.save writes before the values
        np.lib.format.write_array_header_1_0(
            header, {"descr": "|u1", "fortran_order": False, "shape": shape}
        )
        offset = len(header.getvalue()) + event * truth.nbytes
        # the file's first read is the image's (reading its header first, the kernel reads on
        # into the values, and a reader of that many bytes in sequence is read ahead of)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = os.pread(fd, truth.nbytes, offset)
        finally:
            os.close(fd)
        assert got == truth.tobytes()
    fetched, ranges = fetched_of(fresh_devserver, entry)
    assert fetched(spans[4]) == spans[4][1] - spans[4][0], ranges
    # of its neighbours only what the alignment of remote blocks and the file's structure
    # fetched on opening take along (64-128 KiB), not the chunk
    for n in (3, 5):
        assert fetched(spans[n]) < (spans[n][1] - spans[n][0]) / 2, (n, ranges)


def test_a_memory_mapped_npy_opens_with_its_first_chunk_alone(
    fresh_devserver: DevServer, tmp_path: Path
) -> None:
    """`numpy.load(mmap_mode="r")` reads the header through Python's buffered `open`, which
    reads `st_blksize` bytes: the kernel's default request size (128 KiB), so only the first
    chunk of a large image.npy is fetched and decoded (with 1 MiB, the second too: chunk 1 of
    a dclab-written file starts 1,040,128 bytes into the .npy)."""
    entry, spans, _ = generated_images(fresh_devserver)
    with mounted(tmp_path / "mnt", fresh_devserver.url, tmp_path / "cache") as mnt:
        path = resource_dir(mnt, entry) / "image.npy"
        assert path.stat().st_blksize == IO_SIZE
        images = np.load(path, mmap_mode="r")
        with h5py.File(entry["path"]) as h5:
            assert images.shape == h5["events/image"].shape
        del images
    fetched, ranges = fetched_of(fresh_devserver, entry)
    assert fetched(spans[0]) == spans[0][1] - spans[0][0], ranges
    assert fetched(spans[1]) < (spans[1][1] - spans[1][0]) / 2, ranges


def read_everything(mnt: Path) -> dict[str, bytes]:
    contents = {}
    for base in ("datasets/generated", "datasets/scalars-only"):
        for path in sorted((mnt / base).rglob("*")):
            if path.is_file():
                contents[str(path.relative_to(mnt))] = path.read_bytes()
    return contents


def test_remount_reads_everything_from_the_cache_even_offline(
    data_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with DevServer(data_dir) as server:
        with mounted(tmp_path / "mnt", server.url, cache) as mnt:
            first = read_everything(mnt)
        server.stats.reset()
        with mounted(tmp_path / "mnt", server.url, cache) as mnt:
            assert read_everything(mnt) == first
        assert server.stats.snapshot()["object_requests"] == 0
        url = server.url
    # the devserver is gone now: everything read before is still there
    with mounted(tmp_path / "mnt", url, cache) as mnt:
        assert read_everything(mnt) == first
    assert len(first) > 40


def decoded_blocks(cache: Path) -> list[StoredBlock]:
    """The stored blocks of decoded values (derived objects) in a cache dir."""
    identities = set()
    for stored in read_inventory(cache):
        if stored.key and is_derived(stored.key):
            assert stored.etag is not None and stored.size is not None
            identities.add(ObjectId(stored.key, stored.etag, stored.size).identity.hex())
    return stored_blocks(cache, identities)


def test_decoded_values_are_kept_checked_and_made_again(data_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def status(mnt: Path) -> Any:
        return json.loads((mnt / ".dcorfs" / "status.json").read_text())

    with DevServer(data_dir) as server:
        with mounted(tmp_path / "mnt", server.url, cache) as mnt:
            first = read_everything(mnt)
        damaged = decoded_blocks(cache)
        assert len(damaged) > 20
        server.stats.reset()
        with mounted(tmp_path / "mnt", server.url, cache) as mnt:  # warm: nothing decoded
            assert read_everything(mnt) == first
            decoded = status(mnt)["decoded"]
            assert decoded["fetches"] == 0 and decoded["disk_hits"] > 0, decoded
        for block in damaged:  # a flipped byte in every block of decoded values
            flip(block)
        with mounted(tmp_path / "mnt", server.url, cache) as mnt:
            assert read_everything(mnt) == first
            decoded = status(mnt)["decoded"]
            assert decoded["errors"] >= len(damaged) and decoded["fetches"] > 0, decoded
        # decoded again from the network: compressed event data are kept in memory only (their
        # decoded values are what the disk keeps), the files' metadata came from the disk
        assert server.stats.snapshot()["object_requests"] > 0


def test_warm_reads_are_served_on_the_fuse_thread(data_dir: Path, tmp_path: Path) -> None:
    """Bytes the disk cache holds are read on the FUSE thread itself, without a worker
    thread (`FileContent.peek` with `disk`): after a remount, random reads of image.npy and
    whole reads of small feature files read before wait for nothing."""
    cache = tmp_path / "cache"
    rng = np.random.default_rng(7)

    def fuse(mnt: Path) -> Any:
        return json.loads((mnt / ".dcorfs" / "status.json").read_text())["fuse"]

    with DevServer(data_dir) as server:
        with mounted(tmp_path / "mnt", server.url, cache) as mnt:
            directory = mnt / "datasets" / "generated" / "M001_data"
            small = {p.name: p.read_bytes() for p in sorted(directory.glob("*.npy"))[:8]}
            image = (directory / "image.npy").read_bytes()
        server.stats.reset()
        with mounted(tmp_path / "mnt", server.url, cache) as mnt:
            assert any(directory.iterdir())  # (the listing: opened before the reads)
            before = fuse(mnt)
            for name, data in small.items():
                assert (directory / name).read_bytes() == data, name
            fd = os.open(directory / "image.npy", os.O_RDONLY)
            try:
                for offset in rng.integers(0, len(image) - 4096, 40):
                    got = os.pread(fd, 4096, int(offset))
                    assert got == image[offset : offset + 4096], offset
            finally:
                os.close(fd)
            after = fuse(mnt)
        assert server.stats.snapshot()["object_requests"] == 0
    waited = after.get("reads_waited", 0) - before.get("reads_waited", 0)
    assert waited == 0, (before, after)
    assert after["reads_inline"] - before["reads_inline"] >= len(small) + 40, (before, after)


def test_a_streams_bytes_are_pushed_into_the_page_cache(tmp_path: Path) -> None:
    """A sequential reader of a large file finds bytes pushed into the kernel's page cache
    ahead of it (`fs.pagepush`, FUSE notify_store) rather than asking for them 128 KiB at a
    time, when its windows are made before it reads on (warm, from the disk cache; this
    reader pauses for them); every byte is the file's, cold (from the network, where little
    is pushed) and warm, and a second read comes from the page cache: at most 1% of the file is
    asked for again besides pages the kernel let go meanwhile (fincore: a VM's memory can be
    taken back by its host; at most a tenth here), as the file's pages are kept across opens:
    without that all of it would be."""
    data = tmp_path / "data"
    write_json(data / "public-lab" / "big" / "dataset.json", {"title": "Big"})
    write_rtdc(data / "public-lab" / "big" / "M001_data.rtdc", SampleSpec(events=2000, seed=5))
    with dclab.new_dataset(data / "public-lab" / "big" / "M001_data.rtdc") as ds:
        truth = ds["image"][:]

    def fuse(mnt: Path) -> tuple[Any, int]:
        """The counters, and the bytes of this report (counted in the next one)."""
        text = (mnt / ".dcorfs" / "status.json").read_bytes()
        return json.loads(text)["fuse"], len(text)

    with DevServer(data) as server:
        for warm in (False, True):
            with mounted(tmp_path / "mnt", server.url, tmp_path / "cache") as mnt:
                path = mnt / "datasets" / "big" / "M001_data" / "image.npy"
                with path.open("rb", buffering=0) as handle:
                    streamed = handle.read(8 << 20)
                    deadline = time.monotonic() + 30
                    while warm and not fuse(mnt)[0]["pushed_bytes"]:
                        assert time.monotonic() < deadline, "nothing pushed within 30 s"
                        time.sleep(0.05)
                    streamed += b"".join(iter(lambda: handle.read(1 << 20), b""))
                counted, report = fuse(mnt)
                assert np.array_equal(np.load(io.BytesIO(streamed)), truth), warm
                assert counted["push_failures"] == 0, counted
                gone = len(streamed) - resident(path)  # (let go meanwhile: asked again)
                assert gone <= len(streamed) // 10, (gone, warm)
                assert path.read_bytes() == streamed  # from the page cache
                again = fuse(mnt)[0]["bytes_served"] - counted["bytes_served"] - report
                assert 0 <= again <= len(streamed) // 100 + gone, (again, gone, warm)
                if warm and slots.can_direct(tmp_path):  # read past the page cache, in runs
                    status = json.loads((mnt / ".dcorfs" / "status.json").read_text())
                    assert status["memory"]["run_buffers"]["runs"] > 0, status["memory"]


def test_private_data_needs_the_token(devserver: DevServer, tmp_path: Path) -> None:
    entry = rtdc_entries(devserver, private=True)[0]
    cache = tmp_path / "cache"
    with mounted(tmp_path / "anon", devserver.url, cache) as mnt:
        with pytest.raises(PermissionError):
            (mnt / "by-id" / entry["id"]).stat()
        with pytest.raises(PermissionError):
            (mnt / "datasets" / "secret-study").stat()
    with mounted(tmp_path / "alice", devserver.url, cache, token=TOKENS["alice"]) as mnt:
        assert "secret-study" in ls(mnt / "datasets")
        with dclab.new_dataset(entry["path"]) as ds:
            for name in ("deform", "image", "mask"):
                path = resource_dir(mnt, entry) / f"{name}.npy"
                assert np.array_equal(np.load(path), ds[name][:])
        tree_text = b"".join(p.read_bytes() for p in mnt.rglob("*.json") if "by-id" not in str(p))
    with (
        mounted(tmp_path / "bob", devserver.url, cache, token=TOKENS["bob"]) as mnt,
        pytest.raises(PermissionError),
    ):
        (mnt / "by-id" / entry["id"]).stat()
    secret = TOKENS["alice"].encode()
    assert secret not in tree_text
    for path in cache.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
            assert path.stat().st_mode & 0o077 == 0, path
        else:
            assert path.stat().st_mode & 0o077 == 0, path
    assert cache.stat().st_mode & 0o777 == 0o700


def test_cache_stays_within_its_size(devserver: DevServer, tmp_path: Path) -> None:
    entry = next(e for e in rtdc_entries(devserver) if e["name"] == "M001_data.rtdc")
    cache = tmp_path / "cache"
    limit = 3 << 20
    with mounted(tmp_path / "mnt", devserver.url, cache, "--cache-size", "3M") as mnt:
        directory = resource_dir(mnt, entry)
        total = 0
        for name in ("image", "mask", "image_bg", "deform", "trace/fl1_raw"):
            with dclab.new_dataset(entry["path"]) as ds:
                assert np.array_equal(np.load(directory / f"{name}.npy"), truth(ds, name))
            total += (directory / f"{name}.npy").stat().st_size
            stored = on_disk(cache)  # + the entry tables' pages
            assert stored <= limit + (1 << 20) + 4096 * len(object_files(cache)), stored
        assert total > 2 * limit


def test_presigned_urls_are_renewed(data_dir: Path, tmp_path: Path) -> None:
    with DevServer(data_dir) as server:
        server.faults.update({"url_lifetime": 2.0})
        entry = rtdc_entries(server, private=True)[0]
        with mounted(
            tmp_path / "mnt", server.url, tmp_path / "cache", token=TOKENS["alice"]
        ) as mnt:
            directory = resource_dir(mnt, entry)
            with dclab.new_dataset(entry["path"]) as ds:
                assert np.array_equal(np.load(directory / "deform.npy"), ds["deform"][:])
                time.sleep(3)  # every URL handed out so far has expired
                assert np.array_equal(np.load(directory / "image.npy"), ds["image"][:])


def test_foreground_mount_stops_cleanly_on_sigterm(devserver: DevServer, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    command = [sys.executable, "-m", "dcorfs", "mount", str(mnt), "--host", devserver.url]
    process = subprocess.Popen(
        [*command, "--cache-dir", str(tmp_path / "cache"), "--foreground"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no mount after 60 s"
            time.sleep(0.05)
        assert (mnt / "README.txt").read_text().startswith("dcorfs")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert not os.path.ismount(mnt)
    finally:
        kill_and_unmount(process, mnt)


def test_bad_command_lines_give_one_line_errors(tmp_path: Path) -> None:
    missing = dcorfs("mount", str(tmp_path / "nope"), "--host", "http://127.0.0.1:9")
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    (tmp_path / "mnt").mkdir()
    args = ["--cache-dir", str(tmp_path / "cache")]
    unreachable = dcorfs("mount", str(tmp_path / "mnt"), "--host", "http://127.0.0.1:9", *args)
    assert unreachable.returncode != 0 and "cannot reach" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1
    bad_host = dcorfs("mount", str(tmp_path / "mnt"), "--host", "ftp://x", *args)
    assert bad_host.returncode == 2 and "not a DCOR host" in bad_host.stderr
    unknown = dcorfs("mount", str(tmp_path / "mnt"), "--host", "http://no-such-host.invalid", *args)
    assert unknown.returncode != 0  # or, on a machine without DNS: "name lookup failed (DNS)"
    assert "(unknown host)" in unknown.stderr or "(name lookup failed" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(tmp_path / "mnt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "data.txt").write_text("mine\n")
    occupied = dcorfs("mount", str(tmp_path / "full"), "--host", "http://127.0.0.1:9", *args)
    assert occupied.returncode == 2 and "is not empty" in occupied.stderr
    if os.geteuid() != 0:
        return
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmp_path / "mnt")], check=True)
    try:
        busy = dcorfs("mount", str(tmp_path / "mnt"), "--host", "http://127.0.0.1:9", *args)
        assert busy.returncode == 2 and "busy" in busy.stderr
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True)
    no_fuse = subprocess.run(  # a mount namespace of its own whose /dev lacks fuse
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none /dev && exec "$@"', "sh"]
        + [sys.executable, "-m", "dcorfs", "mount", str(tmp_path / "mnt"), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert no_fuse.returncode == 2 and "/dev/fuse is missing" in no_fuse.stderr
