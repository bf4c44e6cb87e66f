"""File names from server-supplied text: safe, short enough, and unique within a directory.

A name loses `/` and NUL (→ `_`), cannot be empty, `.` or `..`, and is cut to 255 bytes of
UTF-8. When two entries of one directory end up with the same name, every one of them but the
first (in the server's order, which is stable) gets a suffix made from its id, so names do not
depend on listing order beyond that and never collide.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

MAX_NAME = 255
T = TypeVar("T")


def sanitize(name: str) -> str:
    clean = name.replace("/", "_").replace("\0", "_").strip()
    if clean in ("", ".", ".."):
        clean = f"_{clean}_"
    return _cut(clean, MAX_NAME)


def _cut(name: str, limit: int) -> str:
    data = name.encode("utf-8", "surrogateescape")
    if len(data) <= limit:
        return name
    return data[:limit].decode("utf-8", "ignore")


def with_suffix(name: str, tag: str) -> str:
    """`name` with `~tag` inserted before its extension, within the length limit."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    tail = f"~{tag}" + (f".{ext}" if ext else "")
    return _cut(stem, MAX_NAME - len(tail.encode())) + tail


def unique(entries: Iterable[tuple[str, str, T]]) -> dict[str, T]:
    """{name: item} for (wanted name, stable id, item), sanitized, collisions suffixed by id."""
    result: dict[str, T] = {}
    for wanted, ident, item in entries:
        name = sanitize(wanted)
        if name in result:
            name = with_suffix(name, sanitize(ident)[:12])
            counter = 2
            while name in result:
                name = with_suffix(sanitize(wanted), f"{sanitize(ident)[:12]}-{counter}")
                counter += 1
        result[name] = item
    return result
