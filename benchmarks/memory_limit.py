"""The daemon's peak RSS against `--memory-limit` while one reader streams the large image.npy.

    .venv/bin/python benchmarks/memory_limit.py [--events 100000] [--limit 150M] [--repeat 2]

Uses benchmarks/run.py's data (generated there once per size, in --workdir) and devserver
(--latency ms per request); each run mounts with an empty cache and `--memory-limit`, reads
`image.npy` from start to end in 1 MiB reads (cold: every byte fetched and decoded), and
prints the daemon's peak RSS (VmHWM) beside the limit, and the throughput. Not a test: nothing
here asserts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from run import (
    MOUNT_OPTIONS,
    daemon_pid,
    devserver,
    entries,
    generate,
    mounted,
    peak_rss_mb,
    read_file,
    say,
)

from dcorfs.settings import parse_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100000)
    parser.add_argument("--limit", default="150M", help="passed on as --memory-limit")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--small", type=int, default=100, help="as for run.py (its data)")
    parser.add_argument("--latency", type=float, default=20.0)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/dcorfs-bench"))
    args = parser.parse_args()
    limit = parse_size(args.limit)
    data = args.workdir / f"data-{args.events}-{args.small}"
    generate(data, args.events, args.small)
    MOUNT_OPTIONS.extend(["--memory-limit", args.limit])
    runs = args.workdir / "runs-memory"
    with devserver(data, args.latency) as url:
        big = next(e for e in entries(url) if e["dataset"] == "bench-big")
        for attempt in range(args.repeat):
            shutil.rmtree(runs, ignore_errors=True)
            mnt = runs / "mnt"
            with mounted(url, mnt, runs / "cache"):
                image = mnt / "datasets" / "bench-big" / Path(big["path"]).stem / "image.npy"
                started = time.perf_counter()
                size = read_file(image)
                seconds = time.perf_counter() - started
                peak = peak_rss_mb(daemon_pid(mnt))
            say(f"run {attempt + 1} of {args.repeat}")
            print(
                f"{args.events} events, --memory-limit {args.limit}: image.npy "
                f"{size / 1e9:.2f} GB in {seconds:.0f} s ({size / seconds / 1e6:.0f} MB/s), "
                f"daemon peak RSS {peak:.0f} MB" + f" ({peak * (1 << 20) / limit:.2f} of the limit)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
