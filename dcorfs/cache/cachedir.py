"""The files of a cache dir, named in one place (mount, stores, `cache` and `warmup` use them).

objects/         object files holding cached blocks (diskstore, slots)
index.sqlite3    block accounting (diskstore)
lock             held shared by each mount's store, exclusively by `cache clear`
meta.sqlite3     remembered API answers and synthesized-file structures (metastore)
warmup.journal   files finished by an interrupted `dcorfs warmup`
dcorfs.log       the daemon's log (unless --log-file)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

OBJECTS = "objects"
LEGACY_BLOCKS = "blocks"  # one file per block, before the object files: removed on open
INDEX = "index.sqlite3"
LOCK = "lock"
META = "meta.sqlite3"
JOURNAL = "warmup.journal"
LOG = "dcorfs.log"


def is_damaged(exc: sqlite3.Error) -> bool:
    """A database file that is not one or is corrupt (SQLITE_NOTADB, SQLITE_CORRUPT: raised as
    a plain DatabaseError), not locked, busy, read-only or a misuse (its subclasses)."""
    return type(exc) is sqlite3.DatabaseError


def discard_database(path: Path) -> None:
    """Remove a damaged SQLite database with its WAL and shared-memory files."""
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        (path.parent / name).unlink(missing_ok=True)
