"""dcorfs against dclab's DCOR client and the physical floor, on a devserver with latency.

    .venv/bin/python benchmarks/run.py [--events 100000] [--latency 20] [--workdir DIR]

Generates (once, kept in --workdir) a large measurement (images 80×250, traces, scalars) and a
dataset of many small resources, serves them with `dcorfs devserver --latency MS`, and prints
one table of times and ratios measured in the same run. Needs root for dropping the page cache
(otherwise the warm rows say so). Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dclab
import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import requests

from dcorfs.devserver.datadir import write_json
from dcorfs.devserver.sample import SampleSpec, write_rtdc
from dcorfs.remote.dcserv import parse_basins

warnings.simplefilter("ignore")  # dclab's configuration warnings are not what is measured
PY = sys.executable
ROWS: list[tuple[str, str, str, str, str]] = []


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def row(what: str, ours: str, reference: str, ratio: str, target: str) -> None:
    ROWS.append((what, ours, reference, ratio, target))
    say(f"{what}: {ours} | {reference} | {ratio} | {target}")


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
def devserver(data: Path, latency: float) -> Iterator[str]:
    command = [PY, "-m", "dcorfs", "devserver", "--data", str(data), "--latency", str(latency)]
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
    mnt.mkdir(parents=True, exist_ok=True)
    command = [PY, "-m", "dcorfs", "mount", str(mnt), "--host", url, "--cache-dir", str(cache)]
    subprocess.run([*command, *MOUNT_OPTIONS], check=True)
    try:
        yield mnt
    finally:
        subprocess.run([PY, "-m", "dcorfs", "umount", str(mnt)], check=False)


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


def daemon_pid(mnt: Path) -> int:
    return int(json.loads((mnt / ".dcorfs" / "status.json").read_text())["pid"])


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
    """8 parallel range GETs of the compressed bytes of every image chunk."""
    with h5py.File(path) as h5:
        spans: list[tuple[int, int]] = []
        h5["events/image"].id.chunk_iter(lambda c: spans.append((c.byte_offset, c.size)))
    answer = requests.get(
        f"{url}/api/3/action/dcserv", params={"id": rid, "query": "basins"}, timeout=30
    ).json()["result"]
    object_url = next(b.url for b in parse_basins(answer) if b.kind == "resource")

    def get(span: tuple[int, int]) -> int:
        headers = {"Range": f"bytes={span[0]}-{span[0] + span[1] - 1}"}
        return len(requests.get(object_url, headers=headers, timeout=60).content)

    def fetch_all() -> None:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(get, spans)) == sum(s for _, s in spans)

    return timed(fetch_all)


def decode_floor(path: Path) -> float:
    def decode() -> None:
        with h5py.File(path) as h5:
            image = h5["events/image"]
            step = image.chunks[0] * 16
            for start in range(0, image.shape[0], step):
                image[start : start + step]

    return timed(decode)


def memory_ceiling(size: int) -> float:
    """GB/s of `read_file` re-reading a file in memory (tmpfs) on this machine: what a
    page-cache re-read can reach here at most (up to 1 GiB of it, read twice: the second read
    is timed)."""
    size = min(size, 1 << 30)
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="dcorfs-bench-") as handle:
        chunk = os.urandom(1 << 20)
        for _ in range(size // len(chunk)):
            handle.write(chunk)
        handle.flush()
        path = Path(handle.name)
        read_file(path)
        return path.stat().st_size / timed(lambda: read_file(path)) / 1e9


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=100, help="resources of the many-dataset")
    parser.add_argument("--latency", type=float, default=20.0, help="ms added to every request")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/dcorfs-bench"))
    parser.add_argument("--dclab-image-events", type=int, default=1000)
    parser.add_argument("--random-events", type=int, default=200)
    parser.add_argument(
        "--mount-option", action="append", default=[], help="passed on to dcorfs mount"
    )
    args = parser.parse_args()
    MOUNT_OPTIONS.extend(args.mount_option)
    work = args.workdir
    data = work / f"data-{args.events}-{args.small}"
    generate(data, args.events, args.small)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    with devserver(data, args.latency) as url:
        found = entries(url)
        big = next(e for e in found if e["dataset"] == "bench-big")
        rid, source = big["id"], Path(big["path"])
        mnt = runs / "mnt"
        directory = mnt / "datasets" / "bench-big" / "M001_data"
        with dclab.new_dataset(source) as ds:
            scalars = sorted(f for f in ds.features_innate if dclab.dfn.scalar_feature_exists(f))
        say(f"{len(scalars)} scalar features, {big['size'] / 1e6:.0f} MB resource")

        # (a) all scalars cold
        def dclab_scalars() -> None:
            with remote(url, rid) as ds:
                for f in scalars:
                    ds[f][:]

        t_dclab = timed(dclab_scalars)

        def our_scalars(base: Path) -> Callable[[], None]:
            return lambda: [np.load(base / f"{f}.npy") for f in scalars]

        with mounted(url, mnt, runs / "cache-a"):
            t_ours = timed(our_scalars(directory))
        row(
            "(a) all scalars, cold",
            f"{t_ours:.2f} s",
            f"dclab {t_dclab:.2f} s",
            ratio(t_ours, t_dclab),
            "≤ 0.5",
        )
        # (b) warm, after remount and a dropped page cache
        dropped = drop_page_cache()
        with mounted(url, mnt, runs / "cache-a"):
            t_warm = timed(our_scalars(directory))
        row(
            "(b) all scalars, warm (remount" + (", page cache dropped)" if dropped else ")"),
            f"{t_warm:.3f} s",
            f"dclab cold {t_dclab:.2f} s",
            ratio(t_warm, t_dclab),
            "≤ 0.05",
        )
        # (c) image.npy sequentially, cold; (g) daemon RSS; (e) re-reads
        t_net = network_floor(url, rid, source)
        t_dec = decode_floor(source)
        floor = max(t_net, t_dec)
        with mounted(url, mnt, runs / "cache-c"):
            image = directory / "image.npy"
            size = image.stat().st_size
            t_img = timed(lambda: read_file(image))
            rss = peak_rss_mb(daemon_pid(mnt))
            t_page = timed(lambda: read_file(image))
            dropped = drop_page_cache()
            t_disk = timed(lambda: read_file(image))
        k = min(args.dclab_image_events, args.events)

        def dclab_images() -> None:
            with remote(url, rid) as ds:
                for i in range(k):
                    ds["image"][i]

        t_dclab_img = timed(dclab_images) * args.events / k
        row(
            "(c) image.npy sequential, cold",
            f"{t_img:.1f} s ({size / t_img / 1e6:.0f} MB/s)",
            f"floor {floor:.1f} s (net {t_net:.1f}, decode {t_dec:.1f})",
            ratio(t_img, floor),
            "≤ 2",
        )
        row(
            "(c) … vs dclab iterating ds['image']",
            f"{t_img:.1f} s",
            f"dclab ~{t_dclab_img:.0f} s (first {k} events, scaled)",
            ratio(t_dclab_img, t_img) + "× faster",
            "≥ 10× faster",
        )
        ceiling = memory_ceiling(size)
        row(
            "(e) re-read from the page cache",
            f"{size / t_page / 1e9:.2f} GB/s",
            f"a tmpfs file here {ceiling:.2f} GB/s",
            ratio(size / t_page / 1e9, ceiling),
            "≥ 5 GB/s",
        )
        row(
            "(e) re-read from the disk cache" + ("" if dropped else " (page cache NOT dropped)"),
            f"{size / t_disk / 1e9:.2f} GB/s",
            "",
            "",
            "≥ 1 GB/s",
        )
        row("(g) daemon peak RSS during (c)", f"{rss:.0f} MB", "", "", "≤ 300 MB")
        # (d) random image events, cold
        picks = np.random.default_rng(0).choice(args.events, args.random_events, replace=False)

        def dclab_random() -> None:
            with remote(url, rid) as ds:
                for i in picks:
                    ds["image"][int(i)]

        t_dclab_rand = timed(dclab_random)
        with mounted(url, mnt, runs / "cache-d"):

            def ours_random() -> None:
                images = np.load(directory / "image.npy", mmap_mode="r")
                for i in picks:
                    np.array(images[int(i)])

            t_rand = timed(ours_random)
        row(
            f"(d) {args.random_events} random image events, cold",
            f"{t_rand:.2f} s",
            f"dclab {t_dclab_rand:.2f} s",
            ratio(t_rand, t_dclab_rand),
            "≤ 1.0",
        )
        # (f) ls -lR of the many-resource dataset
        many = mnt / "datasets" / "bench-small"
        ls = ["ls", "-lR", str(many)]
        with mounted(url, mnt, runs / "cache-f"):
            t_cold = timed(lambda: subprocess.run(ls, check=True, capture_output=True))
            t_again = timed(lambda: subprocess.run(ls, check=True, capture_output=True))
        row(
            f"(f) ls -lR of {args.small} resources, cold",
            f"{t_cold:.2f} s",
            f"then warm {t_again:.3f} s",
            "",
            "cold ≤ 2 s",
        )
        # (h) all scalars through the synthesized .rtdc, with dclab
        with mounted(url, mnt, runs / "cache-h"):

            def rtdc_scalars() -> None:
                with dclab.new_dataset(directory / "M001_data.rtdc") as ds:
                    for f in scalars:
                        ds[f][:]

            t_rtdc = timed(rtdc_scalars)
        row(
            "(h) all scalars via dclab on the mounted .rtdc, cold",
            f"{t_rtdc:.2f} s",
            f"dclab DCOR {t_dclab:.2f} s",
            ratio(t_rtdc, t_dclab),
            "(faster than dclab)",
        )
    print(f"\ndcorfs benchmark: {args.events} events, latency {args.latency:g} ms per request\n")
    widths = [max(len(r[i]) for r in ROWS) for i in range(5)]
    header = ("measurement", "dcorfs", "reference", "ratio", "target")
    for line in [header, tuple("-" * w for w in widths), *ROWS]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
