"""Files served as they are, by CKAN's own file serving and by other web servers: whole or a
`Range`, with an ETag made from the file's mtime and size (as werkzeug's `send_file`, which
CKAN's download route uses for files not on S3: dc_serve `route_funcs.py` ~140-146;
doc/DCOR.md §6)."""

from __future__ import annotations

import email.utils
import zlib
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from .objects import RangeNotSatisfiable, parse_range


def file_etag(path: Path) -> str:
    info = path.stat()
    check = zlib.adler32(str(path).encode()) & 0xFFFFFFFF
    return f"{info.st_mtime}-{info.st_size}-{check}"


def send_file(handler: BaseHTTPRequestHandler, path: Path, *, filename: str = "") -> int:
    """Answer `handler`'s GET/HEAD with the file (200, or 206 for a Range); bytes sent."""
    size = path.stat().st_size
    try:
        byte_range = parse_range(handler.headers.get("Range"), size)
    except RangeNotSatisfiable:
        handler.send_response(416)
        handler.send_header("Content-Range", f"bytes */{size}")
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return 0
    start, stop = byte_range if byte_range is not None else (0, size)
    handler.send_response(206 if byte_range is not None else 200)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.send_header("Content-Length", str(stop - start))
    if byte_range is not None:
        handler.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
    handler.send_header("ETag", f'"{file_etag(path)}"')
    handler.send_header("Last-Modified", email.utils.formatdate(path.stat().st_mtime, usegmt=True))
    handler.send_header("Accept-Ranges", "bytes")
    if filename:
        handler.send_header("Content-Disposition", f'attachment; filename="{filename}"')
    handler.end_headers()
    if handler.command == "HEAD" or stop == start:
        return 0
    with path.open("rb") as handle:
        return int(handler.connection.sendfile(handle, start, stop - start))
