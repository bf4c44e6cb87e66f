"""The tree's second front end: a read-only WebDAV share (class 1) through WsgiDAV, beside the
FUSE adapter (`fuse_ops`). The same nodes, names, sizes, dates and contents: a path is resolved
by the tree's own `lookup`s, a file's bytes are read from the content object FUSE would read
(wrapped in the same read-ahead), so a ranged GET fetches what a read of the mount would.

WsgiDAV runs each request in a worker thread of its server, so blocking here is fine (the
tree's calls block on the network as they do in FUSE's worker threads). Errors become HTTP
statuses with a one-line reason: not found 404, access denied 403, out of time 504, DCOR
failing 502 (also when a GET's first bytes cannot be read; once the answer has begun, a failed
read ends the connection short of the length it announced); every write method is refused (the
provider is read-only: 403), there are no locks (class 1), and PROPFIND with Depth infinity
(the default of one without a Depth header) is refused as RFC 4918 allows (403,
propfind-finite-depth): one request would walk all of DCOR. Semantics: doc/SEMANTICS.md;
the server around it: daemon/webdav.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import mimetypes
import time
from typing import Any

from wsgidav.dav_error import (
    HTTP_BAD_GATEWAY,
    HTTP_FORBIDDEN,
    HTTP_GATEWAY_TIMEOUT,
    HTTP_NOT_FOUND,
    DAVError,
    PRECONDITION_CODE_PropfindFiniteDepth,
)
from wsgidav.dav_provider import DAVCollection, DAVNonCollection, DAVProvider, _DAVResource

from ..errors import AccessDenied, DcorfsError, DeadlineExceeded, NotFound
from ..hdf5.fileobj import SeekableFile
from .activity import Activity
from .content import Buffer, FileContent, StaticContent
from .readahead import Prefetcher, ReadAhead
from .tree import Dir, File, Node

log = logging.getLogger(__name__)
TYPES = {
    ".npy": "application/octet-stream",
    ".rtdc": "application/x-hdf5",
    ".tsv": "text/tab-separated-values; charset=utf-8",
    ".fcs": "application/vnd.isac.fcs",
    ".tif": "image/tiff",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
}


def http_error(exc: DcorfsError) -> DAVError:
    """The HTTP status and one-line reason of one of dcorfs's errors."""
    if isinstance(exc, NotFound):
        status = HTTP_NOT_FOUND
    elif isinstance(exc, AccessDenied):
        status = HTTP_FORBIDDEN
    elif isinstance(exc, DeadlineExceeded):
        status = HTTP_GATEWAY_TIMEOUT
    else:
        status = HTTP_BAD_GATEWAY
    return DAVError(status, context_info=str(exc).splitlines()[0] if str(exc) else None)


class TreeProvider(DAVProvider):  # type: ignore[misc]
    """The tree under `root`, read-only."""

    def __init__(
        self, root: Dir, *, timeout: float, prefetcher: Prefetcher | None, activity: Activity
    ) -> None:
        super().__init__()
        self.root = root
        self.timeout = timeout
        self.prefetcher = prefetcher
        self.activity = activity

    def is_readonly(self) -> bool:
        return True

    def get_resource_inst(self, path: str, environ: dict[str, Any]) -> _DAVResource | None:
        self.activity.counters["dav_resolves"] += 1
        depth = environ.get("HTTP_DEPTH", "infinity").lower()  # asked before WsgiDAV's default
        if environ.get("REQUEST_METHOD") == "PROPFIND" and depth == "infinity":
            raise DAVError(
                HTTP_FORBIDDEN,
                context_info="PROPFIND with Depth infinity: ask with Depth 0 or 1",
                err_condition=PRECONDITION_CODE_PropfindFiniteDepth,
            )
        try:
            node = self._resolve(path)
        except NotFound:
            return None
        except DcorfsError as exc:
            self.activity.note_error("resolve", exc)
            raise http_error(exc) from None
        return self.resource(path, node, environ)

    def resource(self, path: str, node: Node, environ: dict[str, Any]) -> _DAVResource:
        if isinstance(node, Dir):
            return DirResource(path, environ, node, self)
        assert isinstance(node, File)
        return FileResource(path, environ, node, self)

    def _resolve(self, path: str) -> Node:
        node: Node = self.root
        for name in (part for part in path.split("/") if part):
            if not isinstance(node, Dir):
                raise NotFound(f"{path} does not exist")
            node = node.lookup(name)
        if not node.settled:
            node.settle()
        return node


class DirResource(DAVCollection):  # type: ignore[misc]
    def __init__(
        self, path: str, environ: dict[str, Any], node: Dir, provider: TreeProvider
    ) -> None:
        super().__init__(path, environ)
        self._node = node
        self._tree = provider

    def get_display_info(self) -> dict[str, str]:
        return {"type": "Directory"}

    def get_last_modified(self) -> float:
        return self._node.mtime

    def get_creation_date(self) -> float:
        return self._node.mtime

    def _children(self) -> dict[str, Node]:
        try:
            children = self._node.children()
        except DcorfsError as exc:
            self._tree.activity.note_error("list", exc)
            raise http_error(exc) from None
        self._node.listed(children)  # a dataset opens its resources side by side now
        return children

    def get_member_names(self) -> list[str]:
        return sorted(self._children())

    def _member(self, name: str, node: Node, operation: str) -> _DAVResource:
        """The resource of a child, its attributes known (DcorfsError if they cannot be)."""
        try:
            if not node.settled:
                node.settle()
        except DcorfsError as exc:
            self._tree.activity.note_error(operation, exc)
            raise
        return self._tree.resource(self.path.rstrip("/") + "/" + name, node, self.environ)

    def get_member(self, name: str) -> _DAVResource | None:
        node = self._children().get(name)
        if node is None:
            return None
        try:
            return self._member(name, node, "resolve")
        except DcorfsError as exc:
            raise http_error(exc) from None

    def get_member_list(self) -> list[_DAVResource]:
        """The members whose attributes can be known now; one that cannot (its resource
        fails to open) is left out of the listing, as in the mount (its own request says
        why)."""
        members = []
        for name, node in sorted(self._children().items()):
            with contextlib.suppress(DcorfsError):
                members.append(self._member(name, node, "list"))
        return members


class FileResource(DAVNonCollection):  # type: ignore[misc]
    def __init__(
        self, path: str, environ: dict[str, Any], node: File, provider: TreeProvider
    ) -> None:
        super().__init__(path, environ)
        self._node = node
        self._tree = provider
        self._made: FileContent | None = None

    def _content(self) -> FileContent:
        """The file's content, made once per request (it may open a resource: blocking)."""
        if self._made is None:
            try:
                self._made = self._node.content()
            except DcorfsError as exc:
                self._tree.activity.note_error("open", exc)
                raise http_error(exc) from None
        return self._made

    def get_content_length(self) -> int:
        # a dynamic file (status.json) has size 0 in the mount, read with direct I/O; over
        # HTTP its length is that of the bytes made for this request
        return self._content().size if self._node.dynamic else self._node.size

    def get_content_type(self) -> str:
        name = self.name.lower()
        suffix = name[name.rfind(".") :] if "." in name else ""
        return TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"

    def get_creation_date(self) -> float:
        return self._node.mtime

    def get_last_modified(self) -> float:
        return self._node.mtime

    def get_etag(self) -> str:
        described = f"{self._node.path}\0{self.get_content_length()}\0{self._node.mtime}"
        return hashlib.sha256(described.encode()).hexdigest()[:32]

    def support_etag(self) -> bool:
        return True

    def support_ranges(self) -> bool:
        return True

    def get_content(self) -> io.RawIOBase:
        content = self._content()
        if self._tree.prefetcher is not None and not isinstance(content, StaticContent):
            content = self._tree.prefetcher.wrap(content)  # a GET that streams reads ahead
        self._tree.activity.counters["opens"] += 1
        return ContentStream(content, timeout=self._tree.timeout, activity=self._tree.activity)


class ContentStream(SeekableFile):
    """A file's content as the seekable binary stream WsgiDAV sends (seek, then reads)."""

    def __init__(self, content: FileContent, *, timeout: float, activity: Activity) -> None:
        super().__init__()
        self._content = content
        self._timeout = timeout
        self._activity = activity

    def end(self) -> int:
        return self._content.size

    def readinto(self, buffer: Any) -> int:
        data = self._read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        data = self._read(size)
        return data if isinstance(data, bytes) else bytes(data)  # (WSGI wants bytes)

    def _read(self, size: int | None) -> Buffer:
        remaining = max(0, self._content.size - self._pos)
        length = remaining if size is None or size < 0 else min(size, remaining)
        if length == 0:
            return b""
        started = time.monotonic()
        try:
            data = self._content.read(self._pos, length, deadline=started + self._timeout)
        except DcorfsError as exc:
            self._activity.note_error("read", exc)
            raise http_error(exc) from None
        self._activity.observe_read(time.monotonic() - started)
        self._pos += len(data)
        self._activity.counters["reads"] += 1
        self._activity.counters["bytes_served"] += len(data)
        return data

    def close(self) -> None:
        if isinstance(self._content, ReadAhead):
            self._content.close()
        super().close()
