"""The errors of dcorfs: each carries the errno the kernel sees and whether a retry may help.

Lower layers raise these; `fuse_ops` is the one place they become `pyfuse3.FUSEError`. Messages
are one line, meant for logs and for the command line, and never contain a token or a
presigned URL's query string (use `redact_url`).
"""

from __future__ import annotations

import errno as _errno
from urllib.parse import urlsplit, urlunsplit


class DcorfsError(Exception):
    """Base class: an error with an errno for the kernel and a transient flag for retries."""

    errno: int = _errno.EIO
    transient: bool = False


class ConfigError(DcorfsError):
    """Bad user input (command line, host, mount point, cache dir)."""

    errno = _errno.EINVAL


class StaleMount(ConfigError):
    """A mount whose daemon is gone ("Transport endpoint is not connected")."""

    def __init__(self, path: object) -> None:
        super().__init__(
            f"{path} is a stale mount (Transport endpoint is not connected: its daemon is "
            f"gone): run `dcorfs umount {path}` first"
        )


class NotFound(DcorfsError):
    """An id, name or object that does not exist (on the server or in the tree)."""

    errno = _errno.ENOENT


class AccessDenied(DcorfsError):
    """Private data without a valid token, or an object URL that is not (or no longer) valid.

    `code`: the S3 store's error code when it gave one (`AccessDenied`,
    `SignatureDoesNotMatch`, `InvalidAccessKeyId` …), else ""."""

    errno = _errno.EACCES

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class TransientError(DcorfsError):
    """A failure a retry may cure: timeouts, resets, 5xx, short or mislabelled bodies.

    `retry_after`: seconds the server asked to wait (HTTP Retry-After), 0 if it did not.
    """

    transient = True

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(DcorfsError):
    """Retries ran out of time (`--timeout`): the read fails with EIO instead of hanging."""


def unreachable(exc: DcorfsError) -> bool:
    """Whether `exc` says the server did not answer (a failure retries may cure that they did
    not, or the deadline passed): not what it answered. Then a stored answer may serve."""
    return exc.transient or isinstance(exc, DeadlineExceeded)


class ProtocolError(DcorfsError):
    """The server answered something that cannot be right and will not change on retry."""


class Moved(ProtocolError):
    """An object URL answered with a redirect, which object reads do not follow (a presigned
    query must not go elsewhere): where the URL has a way to be renewed (a link resource's
    external URL, doc/DCOR.md §6), the renewal follows it."""


class ServerError(DcorfsError):
    """The server failed on a request in its own code (CKAN's "Internal Server Error", e.g.
    dcserv on a file it cannot open): asking again at once gives the same answer, so it is
    not retried in a loop but remembered for a while (doc/DCOR.md §8)."""


class ObjectChanged(DcorfsError):
    """An object's ETag or size differs from the one its cached blocks belong to."""


def redact_url(url: str) -> str:
    """`url` without its query string (presigned signatures) and user info, for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    suffix = "?…" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + suffix
