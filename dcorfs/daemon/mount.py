"""`dcorfs mount`: check what can be checked (`preflight`), then fork the daemon (`loop.run`)
and wait on a pipe until the mount is up (exit 0) or failed (one-line reason, exit 1); in the
foreground, run it in this process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ..settings import MountSettings
from .loop import run
from .preflight import check


def mount(settings: MountSettings, *, on_ready: Callable[[], None] | None = None) -> int:
    """Mount; returns the exit code. In the background unless `settings.foreground`, where
    `on_ready` runs once the mount is up (the demo prints what to try)."""
    check(settings)
    if settings.foreground:

        def ready(message: str) -> None:
            if message == "ok" and on_ready is not None:
                on_ready()
            elif message != "ok":
                print(f"dcorfs: {message}", file=sys.stderr)

        return run(settings, ready=ready)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        code = 1
        try:
            code = run(settings, ready=lambda message: _tell(write_end, message))
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    if message == "ok":
        return 0
    os.waitpid(pid, 0)
    print(f"dcorfs: {message or 'the daemon died while mounting (see the log)'}", file=sys.stderr)
    return 1


def _tell(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode())
    finally:
        os.close(fd)
