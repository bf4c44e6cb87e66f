"""`dcorfs devserver`: serve a data directory until SIGINT/SIGTERM."""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from .datadir import DEMO_USER, write_demo_data
from .faults import FaultConfig
from .repository import DataDirError
from .server import DevServer
from .site import SiteOptions


def say(message: str) -> None:
    print(f"dcorfs devserver: {message}", file=sys.stderr, flush=True)


def serve(
    data: Path | None,
    *,
    bind: str,
    port: int,
    state_dir: Path | None,
    faults: FaultConfig,
    options: SiteOptions,
    seed: int | None,
    sample_data: bool,
    sample_events: int,
) -> int:
    """Run the devserver in the foreground; print its URL on stdout once it is ready."""
    temporary = None
    if data is None:
        temporary = Path(tempfile.mkdtemp(prefix="dcorfs-devserver-"))
        data, sample_data = temporary, True
    try:
        if sample_data:
            if data.exists() and any(data.iterdir()):
                if not (data / "dcor.json").exists():
                    say(f"{data} is not empty; --sample-data needs an empty or new directory")
                    return 1
                say(f"reusing the sample data in {data}")
            else:
                say(f"generating sample data in {data}")
                token = write_demo_data(data, sample_events, progress=say)
                say(f"user {DEMO_USER!r} (member of the private circle) has the API token {token}")
        if bind not in ("127.0.0.1", "localhost", "::1"):
            say(f"warning: binding to {bind} exposes test data and test hooks beyond this machine")
        try:
            server = DevServer(
                data,
                bind=bind,
                port=port,
                state_dir=state_dir,
                faults=faults,
                options=options,
                seed=seed,
                progress=say,
            )
        except OSError as exc:
            say(f"cannot listen on {bind}:{port}: {exc.strerror or exc}")
            return 1
        stop = threading.Event()
        starting = True

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if starting:  # (condensing may take minutes: what it made so far is removed)
                raise KeyboardInterrupt
            stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            server.start()
        except DataDirError as exc:
            say(str(exc))
            return 1
        except KeyboardInterrupt:
            say("stopped while starting")
            return 1
        starting = False
        site = server.site
        assert site is not None
        datasets = len(site.repo.datasets)
        resources = sum(len(d.resources) for d in site.repo.datasets.values())
        say(
            f"serving {datasets} dataset{'' if datasets == 1 else 's'} with "
            f"{resources} resource{'' if resources == 1 else 's'} from {data}"
        )
        print(server.url, flush=True)
        while not stop.wait(0.5):
            pass
        server.stop()
        say("stopped")
        return 0
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
