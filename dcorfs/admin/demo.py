"""`dcorfs demo MOUNTPOINT`: a DCOR to try offline — freshly generated sample data served by
the devserver on loopback, mounted in the foreground as the demo user (who may see the private
circle too). Ctrl-C here or `dcorfs umount MOUNTPOINT` unmounts, stops the server and removes
the temporary data and cache."""

from __future__ import annotations

import contextlib
import ctypes
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cache import cachedir
from ..daemon.mount import mount
from ..daemon.preflight import check_mountpoint
from ..devserver.datadir import DEMO_USER, write_demo_data
from ..errors import ConfigError, DcorfsError
from ..settings import MountSettings, Token

PR_SET_PDEATHSIG = 1
SERVER_START = 600.0  # seconds: the devserver condenses every resource before it answers


def _say(message: str) -> None:
    print(f"dcorfs demo: {message}", file=sys.stderr, flush=True)


def die_with_parent() -> Callable[[], None]:
    """For the child before exec: SIGTERM when the demo dies, even by SIGKILL (Linux). libc is
    looked up here, in the parent, so the child only makes one system call."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate(process: subprocess.Popen[Any], grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class _Server:
    """The devserver as a child process in its own session (Ctrl-C reaches only us), ended
    with the demo however the demo ends."""

    def __init__(self, data: Path, log: Path) -> None:
        self._log = log
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dcorfs", "devserver", "--data", str(data), "--port", "0"],
                stdout=subprocess.PIPE,
                stderr=sink,
                text=True,
                start_new_session=True,
                # one prctl call; the demo runs no other threads yet (the mount comes later)
                preexec_fn=die_with_parent(),  # noqa: PLW1509
            )

    def url(self) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + SERVER_START
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(timeout=0.5):
                    line = self.process.stdout.readline().strip()
                    if line:
                        return line
                if self.process.poll() is not None:
                    break
        tail = self._log.read_text(errors="replace").strip().splitlines()[-1:]
        raise DcorfsError(f"the devserver did not start: {' '.join(tail) or 'no output'}")

    def stop(self) -> None:
        terminate(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _command() -> str:
    """How this dcorfs was started, for commands the user can paste."""
    if Path(sys.argv[0]).name == "dcorfs":
        return shlex.quote(sys.argv[0])
    return f"{shlex.quote(sys.executable)} -m dcorfs"


def _instructions(mountpoint: Path, url: str) -> str:
    mnt = shlex.quote(str(mountpoint))
    resource = f"{mountpoint}/datasets/hl60-deformability/M001_data"
    quoted = shlex.quote(resource)
    numpy = f"import numpy as np; print(np.load('{resource}/deform.npy')[:5])"
    dcorfs = _command()
    return f"""
The sample DCOR served at {url} is mounted at {mountpoint},
as user {DEMO_USER!r}, who may also see the private circle. Try, in another shell:

  ls {mnt}/circles {mnt}/datasets
  ls -l {quoted}
  head -n 3 {quoted}/features.tsv
  {shlex.quote(sys.executable)} -c "{numpy}"
  h5ls -r {quoted}/M001_data.rtdc
  {dcorfs} status {mnt}
  {dcorfs} warmup {mnt}/datasets/hl60-deformability

Ctrl-C here (or `{dcorfs} umount {mnt}`) unmounts, stops the server and removes the sample data.
"""


def _interrupt(number: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM/SIGHUP while starting: clean up as on Ctrl-C


def demo(mountpoint: Path, *, events: int) -> int:
    made = not mountpoint.exists()  # (removed again at the end, when empty)
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"mount point {mountpoint}: {exc.strerror}") from None
    try:
        return _demo(mountpoint, events=events)
    finally:
        if made:
            with contextlib.suppress(OSError):  # (not empty, or still mounted: left)
                mountpoint.rmdir()


def _demo(mountpoint: Path, *, events: int) -> int:
    check_mountpoint(mountpoint)  # before minutes of sample data, not after
    for number in (signal.SIGTERM, signal.SIGHUP):  # the mount installs its own later
        signal.signal(number, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="dcorfs-demo-"))
    server: _Server | None = None
    try:
        _say(f"generating sample data ({events} events per measurement) …")
        token = write_demo_data(work / "data", events, progress=_say)
        _say("starting the devserver (it condenses every measurement first) …")
        server = _Server(work / "data", work / "devserver.log")
        url = server.url()
        settings = MountSettings(
            mountpoint=mountpoint.absolute(),
            host=url,
            token=Token(token),
            cache_dir=work / "cache",
            foreground=True,
            log_level="WARNING",
            log_file=work / "cache" / cachedir.LOG,
        )
        code = mount(settings, on_ready=lambda: print(_instructions(mountpoint, url), flush=True))
        _say("unmounted; stopping the devserver")
        return code
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
