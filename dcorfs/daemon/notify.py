"""systemd's notify protocol (sd_notify): READY=1, STATUS=…, STOPPING=1, WATCHDOG=1.

A datagram of `KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET (a leading `@`
names an abstract socket). Without $NOTIFY_SOCKET every call does nothing, so the daemon can
notify unconditionally. A lost datagram never stops the daemon: failures are logged once.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._warned = False

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def active(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> None:
        if self._address is None:
            return
        message = "\n".join(field.replace("\n", " ") for field in fields).encode()
        try:
            kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            with socket.socket(socket.AF_UNIX, kind) as sock:  # never blocks the event loop
                sock.connect(self._address)
                sock.sendall(message)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at $NOTIFY_SOCKET: %s", exc)
                self._warned = True


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Half of $WATCHDOG_USEC in seconds when the watchdog is meant for this process."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6
