"""dcorfs against dclab's DCOR client and the physical floor, on a devserver with latency.

    .venv/bin/python benchmarks/run.py [--events 20000,100000] [--repeat 3] [--latency 20]
                                       [--workdir DIR] [--json FILE]

Generates (once per size, kept in --workdir) a large measurement (images 80×250, traces,
scalars) and a dataset of many small resources, serves them with `dcorfs devserver --latency
MS`, and prints one table per size of times and ratios measured in the same run: with
--repeat N, every measurement N times, the median with the spread (min–max) beside it, ratios
of medians. Needs root for dropping the page cache (otherwise the warm rows say so). Not a
test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import functools
import json
import mmap
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dclab
import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import requests
from structfloor import structure_floor

from dcorfs.devserver.datadir import write_json
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.remote.dcserv import parse_basins

warnings.simplefilter("ignore")  # dclab's configuration warnings are not what is measured
PY = sys.executable


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def generate(data: Path, events: int, small: int) -> None:
    if (data / "dcor.json").exists():
        say(f"reusing the data in {data}")
        return
    tmp = data.with_name(data.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_json(tmp / "dcor.json", {"users": {}, "collections": {}})
    big = tmp / "bench-lab" / "bench-big"
    write_json(big / "dataset.json", {"title": "A large measurement"})
    say(f"generating {events} events with images and traces (once)")
    write_rtdc(big / "M001_data.rtdc", SampleSpec(events=events, seed=1, image_bg=False))
    many = tmp / "bench-lab" / "bench-small"
    write_json(many / "dataset.json", {"title": f"{small} small resources"})
    for i in range(small):
        spec = SampleSpec(events=100, seed=100 + i, images=False, traces=False)
        write_rtdc(many / f"S{i:03d}_data.rtdc", spec)
    tmp.rename(data)


@contextmanager
def devserver(data: Path, latency: float, extra: Sequence[str] = ()) -> Iterator[str]:
    command = [PY, "-m", "dcorfs", "devserver", "--data", str(data), "--latency", str(latency)]
    command += extra
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url.startswith("http"):
            raise SystemExit("the devserver did not start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


MOUNT_OPTIONS: list[str] = []  # --mount-option: e.g. --kernel-tuning, for A/B runs


@contextmanager
def mounted(url: str, mnt: Path, cache: Path) -> Iterator[Path]:
    """Mounted; unmounted after, and the daemon gone (it may finish what it was doing: the
    next mount of the same cache then finds it remembered, and no CPU is shared with it)."""
    mnt.mkdir(parents=True, exist_ok=True)
    command = [PY, "-m", "dcorfs", "mount", str(mnt), "--host", url, "--cache-dir", str(cache)]
    subprocess.run([*command, *MOUNT_OPTIONS], check=True)
    pid = daemon_pid(mnt)
    try:
        yield mnt
    finally:
        subprocess.run([PY, "-m", "dcorfs", "umount", str(mnt)], check=False)
        until = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < until:
            time.sleep(0.05)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_file(path: Path, chunk: int = 1 << 20) -> int:
    total = 0
    with path.open("rb", buffering=0) as handle:
        while True:
            data = handle.read(chunk)
            if not data:
                return total
            total += len(data)


def resident(path: Path) -> float:
    """The share of a file's pages in the page cache now (mincore of a read-only mapping)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        address = ctypes.c_void_p(view.ctypes.data)
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.mincore(address, ctypes.c_size_t(size), vector)
        del view
    if failed:
        return float("nan")
    return float(np.count_nonzero(np.frombuffer(vector, dtype=np.uint8) & 1)) / pages


DAMON = Path("/sys/kernel/mm/damon/admin/kdamonds")


def paged_out() -> int:
    """Bytes this machine's proactive reclaim (DAMON schemes, as a VM host configures them)
    has paged out so far; 0 where there is none. Page-cache pages it drops are read again
    through the filesystem: a re-read "from the page cache" then partly is not."""
    total = 0
    for kdamond in DAMON.glob("[0-9]*"):
        with contextlib.suppress(OSError):
            (kdamond / "state").write_text("update_schemes_stats")
        for applied in kdamond.glob("contexts/*/schemes/*/stats/sz_applied"):
            with contextlib.suppress(OSError, ValueError):
                total += int(applied.read_text())
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def daemon_pid(mnt: Path) -> int:
    return int(json.loads((mnt / ".dcorfs" / "status.json").read_text())["pid"])


def tree_pss_mb(pid: int) -> float:
    """The proportional set size of a process and all its descendants together (the daemon
    and its HDF5 worker processes: the memory they use, shared pages counted once)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        now = todo.pop()
        todo += children.get(now, [])
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{now}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
    return total


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def entries(url: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = requests.get(f"{url}/_devserver/info", timeout=30).json()[
        "resources"
    ]
    return result


def remote(url: str, rid: str) -> Any:
    return dclab.new_dataset(rid, host=url.split("://", 1)[1], use_ssl=False)


def network_floor(url: str, rid: str, path: Path) -> float:
    """Seconds of 8 parallel range GETs of the compressed bytes of every image chunk."""
    return timed(network_fetch(url, rid, path))


def image_chunks(url: str, rid: str, path: Path) -> tuple[str, list[tuple[int, int]], int]:
    """The resource's object URL, the (offset, size) of every image chunk, events per chunk."""
    with h5py.File(path) as h5:
        spans: list[tuple[int, int]] = []
        h5["events/image"].id.chunk_iter(lambda c: spans.append((c.byte_offset, c.size)))
        rows = h5["events/image"].chunks[0]
    answer = requests.get(
        f"{url}/api/3/action/dcserv", params={"id": rid, "query": "basins"}, timeout=30
    ).json()["result"]
    object_url = next(b.url for b in parse_basins(answer) if b.kind == "resource")
    return object_url, spans, rows


def random_floor(url: str, rid: str, path: Path, picks: Any, *, decode: bool = False) -> float:
    """Seconds of one range GET after another of the compressed chunks holding the picked
    image events, each chunk once, in the order of the picks: the least a reader of random
    events waits for the network. `decode`: each chunk, once fetched, also decoded (by h5py,
    from the local copy `path`) before the next is asked for — a reader of one event after
    another that decodes whole chunks has the event only then, and cannot know the next."""
    object_url, spans, rows = image_chunks(url, rid, path)
    chunks = list(dict.fromkeys(int(i) // rows for i in picks))
    with requests.Session() as session, h5py.File(path) as h5:
        image = h5["events/image"]

        def fetch() -> None:
            for chunk in chunks:
                offset, size = spans[chunk]
                headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
                assert len(session.get(object_url, headers=headers, timeout=60).content) == size
                if decode:
                    image[chunk * rows : (chunk + 1) * rows]

        return timed(fetch)


def network_fetch(url: str, rid: str, path: Path) -> Callable[[], None]:
    """8 parallel range GETs of the compressed bytes of every image chunk (to be called)."""
    object_url, spans, _ = image_chunks(url, rid, path)

    def get(span: tuple[int, int]) -> int:
        headers = {"Range": f"bytes={span[0]}-{span[0] + span[1] - 1}"}
        return len(requests.get(object_url, headers=headers, timeout=60).content)

    def fetch_all() -> None:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(get, spans)) == sum(s for _, s in spans)

    return fetch_all


def decode_part(task: tuple[str, int, int]) -> int:
    """Decode images [start, stop) of a local file (in a process of its own)."""
    path, start, stop = task
    with h5py.File(path) as h5:
        image = h5["events/image"]
        step = image.chunks[0] * 16
        for first in range(start, stop, step):
            image[first : min(stop, first + step)]
    return stop - start


def decode_floor(path: Path, processes: int, alongside: Callable[[], None] | None = None) -> float:
    """Seconds to decode every image of the local file with h5py in `processes` processes
    (each a part of the chunks: h5py decodes on one core per process); `alongside`: run at
    the same time (in a thread), the seconds until both are done."""
    with h5py.File(path) as h5:
        events, per_chunk = h5["events/image"].shape[0], h5["events/image"].chunks[0]
    chunks = -(-events // per_chunk)
    bounds = [min(events, per_chunk * (chunks * i // processes)) for i in range(processes + 1)]
    tasks = [(str(path), a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    with multiprocessing.get_context("forkserver").Pool(processes) as pool:
        pool.map(decode_part, [(str(path), 0, 0)] * processes)  # started before the clock

        def decode() -> None:
            with concurrent.futures.ThreadPoolExecutor(1) as beside:
                other = beside.submit(alongside) if alongside is not None else None
                pool.map(decode_part, tasks)
                if other is not None:
                    other.result()  # (its failure is the measurement's)

        return timed(decode)


DCLAB_WARM = """
import sys, time, warnings
warnings.simplefilter("ignore")
import dclab, numpy as np
from dclab.cached import StoreKeeper
keeper = StoreKeeper.get_instance()
keeper.set_disk_store_path(sys.argv[1])
keeper.set_disk_store_size_bytes(64 << 30)
host, rid, what = sys.argv[2], sys.argv[3], sys.argv[4]
started = time.perf_counter()
with dclab.new_dataset(rid, host=host, use_ssl=False) as ds:
    if what == "scalars":
        for f in sorted(ds.features_innate):
            if dclab.dfn.scalar_feature_exists(f):
                ds[f][:]
    else:
        for i in [int(x) for x in what.split(",")]:
            ds["image"][i]
print(time.perf_counter() - started)  # the reads, not the interpreter's start
keeper.perform_tasks()  # what was read, into the disk store
"""


def dclab_with_disk_store(url: str, rid: str, what: str, store: Path) -> float:
    """Seconds of dclab reading `what` ("scalars" or comma-separated image events) in a fresh
    process with its persistent disk cache (`StoreKeeper.set_disk_store_path`, as DCscope
    configures it) at `store`."""
    host = url.split("://", 1)[1]
    command = [PY, "-c", DCLAB_WARM, str(store), host, rid, what]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(done.stdout.split()[0])


def memory_ceiling(size: int) -> tuple[float, float]:
    """GB/s of `read_file` reading a file in memory (tmpfs) on this machine, up to 1 GiB of
    it: its first read after it was written, and a second one. What a page-cache re-read can
    reach here at most, read the same way as the mount's file is re-read: the first read of
    pages just put into the page cache (by writes here, by the cold read there) is slower
    than later ones, on tmpfs too (measured here, 400 MiB: tmpfs 6.3–7.0 GB/s first, 7.9–10.3
    after; the mount's image.npy 7.5 first, 11.3–11.7 after), so each re-read is compared
    with the same read of tmpfs."""
    size = min(size, 1 << 30)
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="dcorfs-bench-") as handle:
        chunk = os.urandom(1 << 20)
        for _ in range(size // len(chunk)):
            handle.write(chunk)
        handle.flush()
        path = Path(handle.name)
        size = path.stat().st_size
        first = size / timed(lambda: read_file(path)) / 1e9
        return first, size / timed(lambda: read_file(path)) / 1e9


def load_scalars(directory: Path, scalars: Sequence[str]) -> None:
    """What rows (a) and (b) time: `numpy.load` of every scalar feature's .npy."""
    for f in scalars:
        np.load(directory / f"{f}.npy")


def read_random(image: Path, picks: Any) -> None:
    """What row (d) times: the picked events of an image.npy, through a memory map."""
    images = np.load(image, mmap_mode="r")
    for i in picks:
        np.array(images[int(i)])


def small_files(url: str, found: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    """The bytes of the original and of the condensed file of each small resource."""
    pairs = []
    for e in found:
        if e["dataset"] == "bench-small":
            where = f"{url}/dataset/{e['dataset_id']}/resource/{e['id']}/condensed.rtdc"
            condensed = requests.get(where, timeout=60)
            condensed.raise_for_status()
            pairs.append((Path(e["path"]).read_bytes(), condensed.content))
    return pairs


def keep_copies(directory: Path, to: Path, features: Sequence[str]) -> None:
    """Local copies of features' .npy files (for `floors`)."""
    to.mkdir(parents=True, exist_ok=True)
    for feature in features:
        shutil.copyfile(directory / f"{feature}.npy", to / f"{feature}.npy")


@contextmanager
def fuse_floor(source: Path, mnt: Path, *extra: str) -> Iterator[Path]:
    """benchmarks/fusefloor.py mounted over `source`: the least a pyfuse3 filesystem does."""
    mnt.mkdir(parents=True, exist_ok=True)
    floor = Path(__file__).with_name("fusefloor.py")
    process = subprocess.Popen(
        [PY, str(floor), str(source), str(mnt), *extra], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise SystemExit("fusefloor.py did not mount")
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        process.wait(timeout=60)


def floors(runs: Path, name: str, scalars: Sequence[str], picks: Any) -> dict[str, float]:
    """The warm rows read through fusefloor.py (a trivial pyfuse3 filesystem) from local copies
    of the same files, after the page cache is dropped as for dcorfs' rows: what any pyfuse3
    filesystem costs on this machine, reading on the trio thread (`_floor`, as dcorfs reads its
    disk cache), in a worker thread (`_floor_thread`), and for the scalars from memory."""
    m: dict[str, float] = {}
    mnt = runs / "floor-mnt"

    for suffix, extra in (("", ()), ("_thread", ("--thread",)), ("_memory", ("--memory",))):
        with fuse_floor(runs / "floor-scalars", mnt, *extra):
            drop_page_cache()
            m["b_floor" + suffix] = timed(functools.partial(load_scalars, mnt / name, scalars))
        if suffix == "_memory":
            continue
        with fuse_floor(runs / "floor-image", mnt, *extra):
            image = mnt / name / "image.npy"
            drop_page_cache()
            read = functools.partial(read_file, image)
            m["e_floor" + suffix] = image.stat().st_size / timed(read) / 1e9
            drop_page_cache()
            m["d_floor" + suffix] = timed(functools.partial(read_random, image, picks))
    return m


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}"


FAULTS = [
    "--error-rate", "0.1", "--reset-rate", "0.05", "--short-rate", "0.05",
    "--wrong-range-rate", "0.02", "--stall-rate", "0.01", "--stall-seconds", "5",
]  # fmt: skip


def concurrent_readers(
    mnt: Path, big: Path, source: Path, small: list[tuple[Path, Path]], seconds: float
) -> dict[str, float]:
    """16 threads for `seconds`: 8 reading random events of the big file's image.npy (pread,
    not mmap: an EIO is then an error, not SIGBUS), 8 reading whole scalar files of the small
    resources at random; every value checked against the local files (few reads hit the page
    cache: 8 threads have all events to pick from, 8 all scalar files). The daemon's peak
    RSS (sampled every 50 ms), reads, errors (EIO) and wrong values."""
    local = h5py.File(source)
    events = local["events/image"].shape[0]
    files: list[tuple[Path, Path, str]] = []
    for path, directory in small:
        with h5py.File(path) as h5:
            files += [
                (path, directory, name) for name in h5["events"] if h5["events"][name].ndim == 1
            ]
    pid = daemon_pid(mnt)
    stop = float("inf")  # set once the readers start
    counts = {"reads": 0, "errors": 0, "wrong": 0}
    lock = threading.Lock()
    peak, together = [0.0], [0.0]
    with (big / "image.npy").open("rb") as handle:
        version = np.lib.format.read_magic(handle)
        header = np.lib.format
        read = header.read_array_header_1_0 if version == (1, 0) else header.read_array_header_2_0
        shape, _, dtype = read(handle)
        offset, row = handle.tell(), int(np.prod(shape[1:])) * dtype.itemsize

    def sample() -> None:
        while time.monotonic() < stop:
            peak[0] = max(peak[0], rss_mb(pid))
            together[0] = max(together[0], tree_pss_mb(pid))
            time.sleep(0.05)

    def note(good: bool | None) -> None:
        with lock:
            counts["reads"] += 1
            counts["errors" if good is None else "wrong"] += good is not True

    def images(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(big / "image.npy", os.O_RDONLY)
        try:
            while time.monotonic() < stop:
                i = rng.randrange(events)
                try:
                    data = os.pread(fd, row, offset + i * row)
                except OSError:
                    note(None)
                    continue
                note(data == np.ascontiguousarray(local["events/image"][i], dtype).tobytes())
        finally:
            os.close(fd)

    def scalars(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            path, directory, name = rng.choice(files)
            try:
                values = np.load(directory / f"{name}.npy")
            except OSError:
                note(None)
                continue
            with h5py.File(path) as h5:
                note(np.array_equal(values, h5["events"][name][:], equal_nan=True))

    threads = [threading.Thread(target=sample)]
    threads += [threading.Thread(target=images, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=scalars, args=(i,)) for i in range(8)]
    stop = time.monotonic() + seconds
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        local.close()
    return {
        "peak": max(peak[0], peak_rss_mb(pid)),
        "together": together[0],
        **{k: float(v) for k, v in counts.items()},
    }


def measure(args: argparse.Namespace, events: int) -> dict[str, float]:
    """One run of every measurement at `events` events: raw numbers, by name."""
    work = args.workdir
    data = work / f"data-{events}-{args.small}"
    generate(data, events, args.small)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    m: dict[str, float] = {}
    with devserver(data, args.latency) as url:
        found = entries(url)
        big = next(e for e in found if e["dataset"] == "bench-big")
        rid, source = big["id"], Path(big["path"])
        mnt = runs / "mnt"
        directory = mnt / "datasets" / "bench-big" / "M001_data"
        with dclab.new_dataset(source) as ds:
            scalars = sorted(f for f in ds.features_innate if dclab.dfn.scalar_feature_exists(f))
        m["scalars"], m["size"] = len(scalars), big["size"]
        say(f"{events} events: {len(scalars)} scalar features, {big['size'] / 1e6:.0f} MB")

        # (a) all scalars cold; (b) warm, after remount and a dropped page cache
        def dclab_scalars() -> None:
            with remote(url, rid) as ds:
                for f in scalars:
                    ds[f][:]

        our_scalars = functools.partial(load_scalars, directory, scalars)
        m["a_dclab"] = timed(dclab_scalars)
        with mounted(url, mnt, runs / "cache-a"):
            m["a"] = timed(our_scalars)
        m["dropped"] = float(drop_page_cache())
        with mounted(url, mnt, runs / "cache-a"):
            m["b"] = timed(our_scalars)
            keep_copies(directory, runs / "floor-scalars" / directory.name, scalars)
        store = runs / "dclab-store"
        dclab_with_disk_store(url, rid, "scalars", store)
        m["b_dclab_warm"] = dclab_with_disk_store(url, rid, "scalars", store)
        # (c) image.npy sequentially, cold; (e) re-reads; RSS
        m["c_net"] = network_floor(url, rid, source)
        m["c_decode_1"] = decode_floor(source, 1)
        m["c_decode"] = decode_floor(source, os.cpu_count() or 1)
        # both at once, as a reader needs them: the devserver and the decoding share the cores
        m["c_both"] = decode_floor(source, os.cpu_count() or 1, network_fetch(url, rid, source))
        with mounted(url, mnt, runs / "cache-c"):
            image = directory / "image.npy"
            m["image_size"] = size = image.stat().st_size
            reclaimed = paged_out()
            m["c"] = timed(lambda: read_file(image))
            m["c_rss"] = peak_rss_mb(daemon_pid(mnt))
            m["e_resident"] = resident(image)
            m["e_page"] = size / timed(lambda: read_file(image)) / 1e9
            m["e_reclaimed"] = (paged_out() - reclaimed) / 1e6
            m["e_page_again"] = size / timed(lambda: read_file(image)) / 1e9
            m["dropped"] = min(m["dropped"], float(drop_page_cache()))
            m["e_disk"] = size / timed(lambda: read_file(image)) / 1e9
            keep_copies(directory, runs / "floor-image" / directory.name, ["image"])
        m["e_tmpfs_first"], m["e_tmpfs"] = memory_ceiling(size)
        k = min(args.dclab_image_events, events)

        def dclab_images() -> None:
            with remote(url, rid) as ds:
                for i in range(k):
                    ds["image"][i]

        m["c_dclab"] = timed(dclab_images) * events / k
        # (d) random image events, cold and warm
        picks = np.random.default_rng(0).choice(events, args.random_events, replace=False)
        m["random_events"] = args.random_events

        def dclab_random() -> None:
            with remote(url, rid) as ds:
                for i in picks:
                    ds["image"][int(i)]

        ours_random = functools.partial(read_random, directory / "image.npy", picks)
        m["d_dclab"] = timed(dclab_random)
        m["d_net"] = random_floor(url, rid, source, picks)
        m["d_net_decode"] = random_floor(url, rid, source, picks, decode=True)
        with mounted(url, mnt, runs / "cache-d"):
            m["d"] = timed(ours_random)
        m["dropped"] = min(m["dropped"], float(drop_page_cache()))
        with mounted(url, mnt, runs / "cache-d"):
            m["d_warm"] = timed(ours_random)
        m.update(floors(runs, directory.name, scalars, picks))
        listed = ",".join(str(int(i)) for i in picks)
        dclab_with_disk_store(url, rid, listed, store)
        m["d_dclab_warm"] = dclab_with_disk_store(url, rid, listed, store)
        # (f) ls -lR of the many-resource dataset
        ls = ["ls", "-lR", str(mnt / "datasets" / "bench-small")]
        with mounted(url, mnt, runs / "cache-f"):
            m["f"] = timed(lambda: subprocess.run(ls, check=True, capture_output=True))
            m["f_warm"] = timed(lambda: subprocess.run(ls, check=True, capture_output=True))
        pairs = small_files(url, found)
        m["f_hdf5_1"] = structure_floor(pairs, 1)
        m["f_hdf5"] = structure_floor(pairs, os.cpu_count() or 1)
        # (h) all scalars through the synthesized .rtdc, with dclab
        with mounted(url, mnt, runs / "cache-h"):

            def rtdc_scalars() -> None:
                with dclab.new_dataset(directory / "M001_data.rtdc") as ds:
                    for f in scalars:
                        ds[f][:]

            m["h"] = timed(rtdc_scalars)
        small = [
            (Path(e["path"]), mnt / "datasets" / "bench-small" / Path(e["path"]).stem)
            for e in found
            if e["dataset"] == "bench-small"
        ]
        # (g) 16 concurrent readers, clean
        with mounted(url, mnt, runs / "cache-g"):
            g = concurrent_readers(mnt, directory, source, small, args.concurrent_seconds)
        m.update({f"g_{key}": value for key, value in g.items()})
    # ... and against a server that fails (its own cache: nothing read before)
    with devserver(data, args.latency, FAULTS) as url:
        with mounted(url, mnt, runs / "cache-g-faults"):
            g = concurrent_readers(mnt, directory, source, small, args.concurrent_seconds)
        m.update({f"gf_{key}": value for key, value in g.items()})
    return m


def spread(runs: list[dict[str, float]], key: str, fmt: str, scale: float = 1.0) -> str:
    """The median of `key` over the runs, with (min–max) when there are several."""
    values = [run[key] * scale for run in runs]
    text = format(statistics.median(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}–{format(max(values), fmt)})"
    return text


def table(runs: list[dict[str, float]]) -> list[tuple[str, str, str, str, str]]:
    """The rows of one size: measurement, dcorfs, reference, ratio (of medians), target."""

    def med(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    dropped = min(run["dropped"] for run in runs) > 0
    warm = "(remount, page cache dropped)" if dropped else "(remount, page cache NOT dropped)"
    floor = max(med("c_net"), med("c_decode"))
    page = med("e_page")

    def versus(
        label: str, mine: tuple[str, str], other: tuple[str, str], target: str
    ) -> tuple[str, str, str, str, str]:
        """A row of our time (key, format) against a reference's (name, key): medians with
        spreads, their ratio."""
        (ours, fmt), (reference, theirs) = mine, other
        ours_text = spread(runs, ours, fmt) + " s"
        theirs_text = f"{reference} " + spread(runs, theirs, ".2f") + " s"
        return (label, ours_text, theirs_text, ratio(med(ours), med(theirs)), target)

    return [
        versus(
            f"(a) all {med('scalars'):.0f} scalars, cold",
            ("a", ".2f"),
            ("dclab", "a_dclab"),
            "≤ 0.5",
        ),
        versus(f"(b) the same, warm {warm}", ("b", ".3f"), ("dclab cold", "a_dclab"), "≤ 0.05"),
        (
            "(b) … against a trivial pyfuse3 fs (fusefloor.py), same files",
            spread(runs, "b", ".3f") + " s",
            f"from local disk {spread(runs, 'b_floor', '.3f')} s (in a worker thread "
            f"{spread(runs, 'b_floor_thread', '.3f')} s), from memory "
            f"{spread(runs, 'b_floor_memory', '.3f')} s",
            ratio(med("b"), med("b_floor_thread")),
            "",
        ),
        versus(
            "(b) … against dclab warm (its disk cache)",
            ("b", ".3f"),
            ("dclab warm", "b_dclab_warm"),
            "",
        ),
        (
            "(c) image.npy sequential, cold",
            spread(runs, "c", ".1f") + f" s ({med('image_size') / med('c') / 1e6:.0f} MB/s)",
            f"floor {floor:.1f} s (network {med('c_net'):.1f}, decode on all cores "
            f"{med('c_decode'):.1f}, on one {med('c_decode_1'):.1f})",
            ratio(med("c"), floor),
            "≤ 2",
        ),
        (
            "(c) … against dclab iterating ds['image']",
            spread(runs, "c", ".1f") + " s",
            f"dclab ~{med('c_dclab'):.0f} s (first events, scaled)",
            ratio(med("c_dclab"), med("c")) + "× faster",
            "≥ 20× faster",
        ),
        (
            "(c) … dclab over network and decode (h5py, all cores) at once, measured here",
            f"network and decode at once {spread(runs, 'c_both', '.1f')} s",
            f"dclab ~{med('c_dclab'):.0f} s",
            ratio(med("c_dclab"), med("c_both")) + "× faster",
            "",
        ),
        (
            "(e) re-read from the page cache (its first re-read)",
            spread(runs, "e_page", ".2f") + " GB/s",
            "a tmpfs file here, its first read after being written "
            + spread(runs, "e_tmpfs_first", ".2f")
            + " GB/s (a second read "
            + spread(runs, "e_tmpfs", ".2f")
            + ")",
            ratio(page, med("e_tmpfs_first")),
            "≥ 0.8",
        ),
        (
            "(e) … pages dropped before the re-read; the machine's proactive reclaim; again",
            f"{100 * (1 - med('e_resident')):.2f}% of the file not cached "
            f"({spread(runs, 'e_resident', '.4f')} resident)",
            f"DAMON paged out {spread(runs, 'e_reclaimed', '.0f')} MB meanwhile; "
            f"a second re-read {spread(runs, 'e_page_again', '.2f')} GB/s (against tmpfs' "
            "second read)",
            ratio(med("e_page_again"), med("e_tmpfs")),
            "",
        ),
        (
            "(e) re-read from the disk cache",
            spread(runs, "e_disk", ".2f") + " GB/s",
            f"a trivial pyfuse3 fs reading a local copy {spread(runs, 'e_floor', '.2f')} GB/s "
            f"(in a worker thread {spread(runs, 'e_floor_thread', '.2f')})",
            ratio(med("e_disk"), med("e_floor")),
            "≥ 1 GB/s",
        ),
        versus(
            f"(d) {med('random_events'):.0f} random image events, cold",
            ("d", ".2f"),
            ("dclab", "d_dclab"),
            "≤ 0.3",
        ),
        versus(
            "(d) … against the network alone (a GET of each picked chunk once, one after another)",
            ("d", ".2f"),
            ("floor", "d_net"),
            "",
        ),
        (
            "(d) … the network floor over dclab",
            "",
            "",
            ratio(med("d_net"), med("d_dclab")),
            "",
        ),
        versus(
            "(d) … against the network and decoding (a GET of each picked chunk, then h5py "
            "decoding it, one after another)",
            ("d", ".2f"),
            ("floor", "d_net_decode"),
            "",
        ),
        (
            "(d) … that floor over dclab (the least ratio here of a reader that fetches, then "
            "decodes whole chunks, one event after another)",
            "",
            "",
            ratio(med("d_net_decode"), med("d_dclab")),
            "",
        ),
        versus(
            f"(d) the same, warm {warm}",
            ("d_warm", ".3f"),
            ("dclab warm (its disk cache)", "d_dclab_warm"),
            "≤ 0.1",
        ),
        (
            "(d) … against a trivial pyfuse3 fs (fusefloor.py), a local copy",
            spread(runs, "d_warm", ".3f") + " s",
            f"read on its trio thread {spread(runs, 'd_floor', '.3f')} s, in a worker thread "
            f"{spread(runs, 'd_floor_thread', '.3f')} s",
            ratio(med("d_warm"), med("d_floor_thread")),
            "",
        ),
        (
            "(f) ls -lR of the small resources, cold",
            spread(runs, "f", ".2f") + " s",
            "then warm " + spread(runs, "f_warm", ".3f") + " s",
            "",
            "≤ 2 s",
        ),
        (
            "(f) … against its HDF5 work alone (structfloor.py: dcorfs' readers and builder, "
            "from memory)",
            spread(runs, "f", ".2f") + " s",
            f"on all cores {spread(runs, 'f_hdf5', '.2f')} s, on one "
            f"{spread(runs, 'f_hdf5_1', '.2f')} s",
            ratio(med("f"), med("f_hdf5")),
            "",
        ),
        (
            "(g) daemon peak RSS during (c)",
            spread(runs, "c_rss", ".0f") + " MB",
            "",
            "",
            "≤ 300 MB",
        ),
        (
            "(g) … 16 concurrent readers",
            spread(runs, "g_peak", ".0f") + " MB",
            f"{med('g_reads'):.0f} reads, {med('g_errors'):.0f} EIO, {med('g_wrong'):.0f} wrong; "
            f"with its HDF5 workers {spread(runs, 'g_together', '.0f')} MB (PSS of all)",
            "",
            "≤ 300 MB",
        ),
        (
            "(g) … 16 concurrent readers, faults",
            spread(runs, "gf_peak", ".0f") + " MB",
            f"{med('gf_reads'):.0f} reads, {med('gf_errors'):.0f} EIO, "
            f"{med('gf_wrong'):.0f} wrong; with its HDF5 workers "
            f"{spread(runs, 'gf_together', '.0f')} MB (PSS of all)",
            "",
            "≤ 300 MB",
        ),
        versus(
            "(h) all scalars via dclab on the mounted .rtdc, cold",
            ("h", ".2f"),
            ("dclab DCOR", "a_dclab"),
            "(faster than dclab)",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events", default="20000,100000", help="sizes of the large measurement, comma-separated"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each size (median)")
    parser.add_argument("--small", type=int, default=100, help="resources of the many-dataset")
    parser.add_argument("--latency", type=float, default=20.0, help="ms added to every request")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/dcorfs-bench"))
    parser.add_argument("--dclab-image-events", type=int, default=1000)
    parser.add_argument("--random-events", type=int, default=200)
    parser.add_argument("--concurrent-seconds", type=float, default=30.0, help="for (g)")
    parser.add_argument("--json", type=Path, help="write every run's numbers here too")
    parser.add_argument(
        "--mount-option", action="append", default=[], help="passed on to dcorfs mount"
    )
    args = parser.parse_args()
    MOUNT_OPTIONS.extend(args.mount_option)
    sizes = [int(size) for size in args.events.split(",")]
    results: dict[str, list[dict[str, float]]] = {}
    for events in sizes:
        results[str(events)] = []
        for attempt in range(args.repeat):
            say(f"{events} events, run {attempt + 1} of {args.repeat}")
            results[str(events)].append(measure(args, events))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    for events in sizes:
        rows = table(results[str(events)])
        print(
            f"\ndcorfs benchmark: {events} events, {args.small} small resources, latency "
            f"{args.latency:g} ms per request, {args.repeat} run(s): median (min–max)\n"
        )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        header = ("measurement", "dcorfs", "reference", "ratio", "target")
        for line in [header, tuple("-" * w for w in widths), *rows]:
            print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
