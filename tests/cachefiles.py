"""A cache dir's object files as tests see them from outside (dcorfs/cache/slots.py): the
blocks stored, the disk space taken, and damage done to blocks on purpose."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from dcorfs.cache import cachedir, slots
from dcorfs.cache.slots import Layout


@dataclass(frozen=True)
class StoredBlock:
    path: Path
    layout: Layout
    index: int

    @property
    def data_at(self) -> int:
        return self.layout.data_at(self.index)

    @property
    def entry_at(self) -> int:
        return self.layout.entry_at(self.index)


def object_files(cache: Path) -> list[tuple[Path, Layout]]:
    found = []
    for path in sorted((cache / cachedir.OBJECTS).glob("*/*")):
        layout = Layout.parse(f"{path.parent.name}/{path.name}")
        if layout is not None:
            found.append((path, layout))
    return found


def stored_blocks(cache: Path, identities: set[str] | None = None) -> list[StoredBlock]:
    """The blocks whose entries are not empty, of all objects or of these identities (hex)."""
    blocks = []
    for path, layout in object_files(cache):
        if identities is not None and layout.identity.hex() not in identities:
            continue
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(path, os.O_RDONLY)
            try:
                blocks += [StoredBlock(path, layout, i) for i in slots.present(fd, layout)]
            finally:
                os.close(fd)
    return blocks


def intact(block: StoredBlock) -> bool:
    """Whether a stored block passes the disk store's checks (its entry, length, CRCs)."""
    fd = os.open(block.path, os.O_RDONLY)
    try:
        return slots.read(fd, block.layout, block.index) is not None
    except slots.Damaged:
        return False
    finally:
        os.close(fd)


def index_rows(cache: Path) -> dict[str, float]:
    """Last use of every block the cache dir's index accounts for, by block name."""
    db = sqlite3.connect(cache / cachedir.INDEX)
    try:
        return {
            str(name): float(used) for name, used in db.execute("SELECT name, used FROM blocks")
        }
    finally:
        db.close()


def on_disk(cache: Path) -> int:
    """The disk space the object files take now (holes take none; the daemon may be at work)."""
    total = 0
    for path, _ in object_files(cache):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_blocks * 512
    return total


def flip(block: StoredBlock, at: float = 0.5) -> None:
    """Flip a byte of a block's data (`at`: where, as a fraction of its length)."""
    offset = block.data_at + int(block.layout.length(block.index) * at)
    with block.path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def damage(blocks: list[StoredBlock]) -> dict[str, int]:
    """Flip a byte in some blocks, cut some short (their file ends inside them), erase some,
    swap two (each with the other's entry and data): what was done, counted."""
    done = {"flipped": 0, "truncated": 0, "deleted": 0, "swapped": 0}
    cut: set[Path] = set()
    for number, block in enumerate(blocks):
        kind = number % 4
        if kind == 0:
            flip(block)
            done["flipped"] += 1
        elif (
            kind == 1
            and block.path not in cut
            and block.index == max(b.index for b in blocks if b.path == block.path)
        ):  # the last stored block of its file: the file ends in the middle of it
            with block.path.open("r+b") as handle:
                handle.truncate(block.data_at + block.layout.length(block.index) // 3)
            cut.add(block.path)
            done["truncated"] += 1
        elif kind in (1, 2):
            with block.path.open("r+b") as handle:
                handle.seek(block.entry_at)
                handle.write(bytes(block.layout.entry_size))
            done["deleted"] += 1
        elif number + 1 < len(blocks):
            other = blocks[number + 1]
            if other.path != block.path or other.layout.length(other.index) != (
                block.layout.length(block.index)
            ):
                continue
            with block.path.open("r+b") as handle:
                size = block.layout.entry_size
                length = block.layout.length(block.index)
                mine = (
                    os.pread(handle.fileno(), size, block.entry_at),
                    os.pread(handle.fileno(), length, block.data_at),
                )
                theirs = (
                    os.pread(handle.fileno(), size, other.entry_at),
                    os.pread(handle.fileno(), length, other.data_at),
                )
                for target, (entry, data) in ((block, theirs), (other, mine)):
                    os.pwrite(handle.fileno(), entry, target.entry_at)
                    os.pwrite(handle.fileno(), data, target.data_at)
            done["swapped"] += 2
    return done
