"""The persistent tier of the block cache: checksummed blocks on disk, bounded in size.

Layout under the cache dir (0700; every file 0600):
  objects/<2 hex>/<identity>.<block size>.<size>   one sparse file per object: its blocks and
                                                   their entries with page CRCs (`slots`)
  index.sqlite3                                  accounting: blocks (name, bytes, last use),
                                                 objects (identity → key, ETag, size),
                                                 total (bytes of all blocks, kept by triggers)
  lock                                           held shared by every store in use, exclusive
                                                 by `dcorfs cache clear`

A block is named `<object file>-<index>` in the accounting. `get` reads a block, or only the
pages of it a read needs, and checks what it read (`slots`): a torn, truncated, flipped or
misplaced block is a miss (erased by the next `settle`), never data. A read writes nothing:
its mark of use (for LRU eviction) waits for `settle` too. A block is first admitted (its row,
evicting others), then written into its object's file; a block whose row is gone by then
(evicted by another process) is erased again. The size bound (on the blocks' data; the entry
tables add under 0.1%) is enforced at admission inside one SQLite `BEGIN IMMEDIATE`
transaction: least recently used blocks are evicted (erased, their disk space punched out of
the file, after the commit; a file left without blocks removed) until the new blocks fit, so
several dcorfs processes sharing the directory never overshoot together.
No fsync per block: after a crash a torn block fails its CRC and is refetched. A cache dir of
the earlier layout (one file per block under blocks/) is emptied when a store opens it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from . import cachedir, slots
from .identity import ObjectId
from .prefetch import DISK_DIRECT_FROM, DISK_RUN
from .runbuffers import ALIGN, RunBuffers
from .slots import Block, Damaged, Layout

log = logging.getLogger(__name__)

FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
RETRY_FULL = 30.0
TOUCH_EVERY = 5.0
TOUCH_BATCH = 64  # marks of use written together
SETTLE_RETRY = 5.0  # seconds before a failed `settle` is tried again
SETTLED = 60.0  # seconds after which no writer of a block or file can be at work any more


@dataclass(frozen=True)
class StoredObject:
    """What the cache holds of one object (key/etag/size None for blocks stored before the
    objects table existed)."""

    key: str | None
    etag: str | None
    size: int | None
    blocks: int
    nbytes: int  # of data (block headers not counted)


class CacheDamaged(ConfigError):
    """A damaged database in a cache dir that another mount holds (so it cannot be renewed)."""


class CacheInUse(ConfigError):
    """An exclusive hold on a cache dir that a mount (or another command) is using."""


def _take_lock(directory: Path, how: int, *, create: bool) -> int | None:
    """The lock file's descriptor holding `how` (flock flags); None if LOCK_NB would block.
    FileNotFoundError without `create` when no store ever used the directory."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(directory / cachedir.LOCK, flags, 0o600)
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def block_name(layout: Layout, index: int) -> str:
    """A block's name in the accounting: its object file's and its index."""
    return f"{layout.name}-{index}"


def split_name(name: str) -> tuple[Layout, int] | None:
    """The object file and index a block's name stands for; None for names of the earlier
    layout (or any other)."""
    file_name, _, index = name.rpartition("-")
    layout = Layout.parse(file_name)
    if layout is None or not index.isdigit():
        return None
    return layout, int(index)


def _inventory(db: sqlite3.Connection) -> Iterator[StoredObject]:
    has_objects = db.execute("SELECT 1 FROM sqlite_master WHERE name='objects'").fetchone()
    known = {  # caches written before the objects table: their objects are nameless
        identity: (key, etag, size)
        for identity, key, etag, size in (
            db.execute("SELECT * FROM objects") if has_objects else []
        )
    }
    rows = db.execute(
        "SELECT substr(name, 4, 64) AS identity, COUNT(*), SUM(bytes) FROM blocks"
        " GROUP BY identity ORDER BY SUM(bytes) DESC"
    )
    for identity, blocks, nbytes in rows:
        key, etag, size = known.get(identity, (None, None, None))
        yield StoredObject(key, etag, size, int(blocks), int(nbytes))


def read_inventory(directory: Path) -> list[StoredObject]:
    """What a cache dir holds, read without changing anything (for `cache info`)."""
    if not (directory / cachedir.INDEX).exists():
        return []
    uri = f"{(directory / cachedir.INDEX).as_uri()}?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=10.0)
    try:
        return list(_inventory(db))
    finally:
        db.close()


def damage_of(path: Path) -> sqlite3.DatabaseError | None:
    """Why this SQLite file of a cache dir is damaged (not a database, corrupt), else None.
    Read-only; its tables are scanned. Locked or busy is not damage."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        tables = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()
    except sqlite3.DatabaseError as exc:
        return exc if cachedir.is_damaged(exc) else None
    finally:
        db.close()
    return None


def in_use(directory: Path) -> bool:
    """Whether a store (a mount) holds the directory now."""
    try:
        fd = _take_lock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB, create=False)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot check the cache dir {directory}: {exc.strerror}") from None
    if fd is None:
        return True
    os.close(fd)
    return False


TOTAL_TRIGGERS = ("total_in", "total_out")  # made by `create_schema`


def create_schema(db: sqlite3.Connection) -> None:
    """The index of a cache dir (`index.sqlite3`), made if missing, in one transaction: what
    every process sharing the directory reads and keeps (the block files themselves are the
    truth; the index is their accounting, reconciled with them on open)."""
    # one row per stored block: its name `<object file>-<index>` (the file under objects/,
    # see `slots.Layout`), its length in bytes and when it was last used (seconds since the
    # epoch; eviction goes by it)
    db.execute(
        "CREATE TABLE IF NOT EXISTS blocks (name TEXT PRIMARY KEY, bytes INTEGER, used REAL)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS blocks_used ON blocks (used)")
    # what each identity hash names: the object's bucket/key, ETag and size (`cache info`
    # tells resources apart by it)
    db.execute(
        "CREATE TABLE IF NOT EXISTS objects"
        " (identity TEXT PRIMARY KEY, key TEXT, etag TEXT, size INTEGER)"
    )
    # the bytes and number of all blocks in one row, kept by triggers (every process's
    # inserts and deletes keep it, whatever its version; a block's row is never updated in
    # place), so admitting blocks or reporting usage does not sum the whole table each time
    # (~6 ms at 100,000 blocks); an index from before it gets the row from its blocks
    db.execute(
        "CREATE TABLE IF NOT EXISTS total (one INTEGER PRIMARY KEY CHECK (one = 1),"
        " bytes INTEGER NOT NULL, blocks INTEGER NOT NULL)"
    )
    db.execute(
        "CREATE TRIGGER IF NOT EXISTS total_in AFTER INSERT ON blocks BEGIN"
        " UPDATE total SET bytes = bytes + NEW.bytes, blocks = blocks + 1; END"
    )
    db.execute(
        "CREATE TRIGGER IF NOT EXISTS total_out AFTER DELETE ON blocks BEGIN"
        " UPDATE total SET bytes = bytes - OLD.bytes, blocks = blocks - 1; END"
    )
    db.execute(
        "INSERT OR IGNORE INTO total SELECT 1, COALESCE(SUM(bytes), 0), COUNT(*) FROM blocks"
    )


class DiskStore:
    def __init__(
        self,
        directory: Path,
        *,
        limit_bytes: int,
        block_size: int = 1 << 20,
        exclusive: bool = False,
        direct_from: int | None = DISK_DIRECT_FROM,
    ) -> None:
        """`exclusive`: fail with CacheInUse unless no other store uses the directory.
        Blocks of at least `direct_from` bytes (None: none) are written past the page cache
        where the directory is on a local disk's filesystem that takes it (`slots.can_direct`;
        `cache.prefetch`, 7.)."""
        self.directory = directory
        self.limit = limit_bytes
        self.block_size = block_size
        self._objects = directory / cachedir.OBJECTS
        self._conn: sqlite3.Connection | None = None  # see `_sql`
        self._sql_lock = threading.RLock()
        self._full_until = 0.0
        self._touched: dict[str, float] = {}
        # what reads left to be written (`settle`): marks of use (the oldest made at
        # `_marked`, monotonic) and damaged blocks to erase
        self._pending: dict[str, float] = {}
        self._marked = 0.0
        self._damaged: set[str] = set()  # block names
        self._retry_at = 0.0  # (monotonic) no `settle` before then: the last one failed
        self._marks_lock = threading.Lock()
        self._closed = False
        # called when `settle` comes due sooner (a first mark, a full batch, a damaged block):
        # the disk writer (`WriteBehind`) wakes for it; never called holding a lock here
        self.on_unsettled: Callable[[], None] | None = None
        self.errors = 0
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._objects.mkdir(mode=0o700, exist_ok=True)
        self._punch = slots.can_punch(self._objects)
        self._direct_from = direct_from
        if direct_from is not None and not slots.can_direct(self._objects):
            self._direct_from = None
        # runs of such blocks (a stream's) read past the page cache too: DISK_RUN bytes of
        # blocks of at least `direct_from` bytes, each slot up to a filesystem block more
        most_blocks = DISK_RUN // max(direct_from or DISK_RUN, 64 << 10)  # (more: not pooled)
        self.run_buffers = RunBuffers(DISK_RUN + most_blocks * ALIGN)
        self._runs_due: float | None = None  # when unused ones are let go (`_trim_runs`)
        self._direct_lock = threading.Lock()
        if not self._punch:
            log.warning("%s cannot punch holes: the cache evicts whole objects", directory)
        for path in (directory, self._objects):
            if path.stat().st_uid != os.getuid():
                log.warning("cache dir %s belongs to another user", path)
            path.chmod(0o700)
        self._hold = self._lock_directory(exclusive)
        self._db_path = directory / cachedir.INDEX
        try:
            if not self._renew_damaged(exclusive):
                self._open_index()
        except BaseException:
            self.close()
            raise

    def _renew_damaged(self, exclusive: bool) -> bool:
        """Replace the cache dir's damaged databases, under the exclusive lock; True if the
        index was renewed (and so opened).

        Only while no other store holds the directory: another mount may be using the file.
        A shared hold is given up to ask for the exclusive one (flock converts by unlocking
        first), then taken again; whoever got it may have renewed the files meanwhile."""
        databases = (self._db_path, self.directory / cachedir.META)
        damaged = [(path, exc) for path in databases if (exc := damage_of(path)) is not None]
        if not damaged:
            return False
        if not exclusive:
            try:
                fcntl.flock(self._hold, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fcntl.flock(self._hold, fcntl.LOCK_SH)
                still = [str(path) for path, _ in damaged if damage_of(path) is not None]
                if still:
                    raise CacheDamaged(
                        f"{', '.join(still)} damaged and in use by another mount: unmount the "
                        f"mounts of {self.directory}, then mount again (it is renewed then)"
                    ) from None
                return False
        try:
            for path, exc in damaged:
                if damage_of(path) is None:  # renewed by another process meanwhile
                    continue
                log.warning("%s is damaged (%s): replaced by a new one", path, exc)
                cachedir.discard_database(path)
            if not self._db_path.exists():
                self._open_index(adopt=True)
                return True
            return False
        finally:
            if not exclusive:
                fcntl.flock(self._hold, fcntl.LOCK_SH)

    def _open_index(self, *, adopt: bool = False) -> None:
        """Create or check the accounting tables, then reconcile them with the block files:
        rows without files are dropped, files without rows removed, or (`adopt`, for a new
        index under the exclusive lock) the valid files are taken in."""
        os.close(os.open(self._db_path, os.O_RDWR | os.O_CREAT, 0o600))
        with self._sql() as db:
            for _ in range(100):  # two processes opening a fresh cache at once: one waits
                try:
                    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        db.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    time.sleep(0.1)
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints
        with self._transaction() as db:
            create_schema(db)
        if adopt:
            self._adopt()
        self._reconcile()

    def _adopt(self) -> None:
        """Rows for the valid blocks found (after the index was renewed); bad ones erased."""
        rows = []
        for _, _, layout, fd, used in self._object_files(os.O_RDWR):
            with contextlib.suppress(OSError):
                for index in slots.present(fd, layout):
                    try:
                        intact = slots.read(fd, layout, index) is not None
                    except Damaged:
                        intact = False
                    if intact:
                        rows.append((block_name(layout, index), layout.length(index), used))
                    else:
                        slots.erase(fd, layout, index, punch=self._punch)
        with self._sql() as db:
            db.executemany("INSERT OR IGNORE INTO blocks VALUES (?, ?, ?)", rows)
        log.warning("renewed cache index: %d cached blocks kept", len(rows))

    def _lock_directory(self, exclusive: bool) -> int:
        # shared: waits only while a `cache clear` runs
        how = fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH
        fd = _take_lock(self.directory, how, create=True)
        if fd is None:
            raise CacheInUse(f"the cache dir {self.directory} is in use by a mount")
        return fd

    @contextmanager
    def _sql(self) -> Iterator[sqlite3.Connection]:
        """The index's one connection, for one statement or transaction at a time. (Not one
        per thread: a connection outlives the thread that made it until the cycle collector
        frees it, and the daemon runs that sparingly, so short-lived threads left open files.)"""
        with self._sql_lock:
            if self._conn is None:
                db = sqlite3.connect(
                    self._db_path, timeout=10.0, isolation_level=None, check_same_thread=False
                )
                db.execute("PRAGMA busy_timeout=10000")
                db.execute("PRAGMA synchronous=NORMAL")
                self._conn = db
            yield self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """`_sql` inside BEGIN IMMEDIATE … COMMIT (ROLLBACK on any error)."""
        with self._sql() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _file(self, layout: Layout) -> str:
        """The path of an object's file, to open (a string: a `pathlib` join, ~1.7 µs, costs
        about as much as reading a block's entry, on every read of a block)."""
        return f"{self._objects}/{layout.name}"

    def name(self, obj: ObjectId, index: int, block_size: int | None = None) -> str:
        """Block `index` of `obj`'s name in the accounting."""
        return block_name(Layout.of(obj, block_size or self.block_size), index)

    def _files(self) -> Iterator[tuple[str, Path]]:
        """The object files: (name under objects/, path)."""
        for sub in self._objects.iterdir():
            if sub.is_dir():
                for path in sub.iterdir():
                    name = f"{sub.name}/{path.name}"
                    if Layout.parse(name) is not None:
                        yield name, path

    def _object_files(self, flags: int) -> Iterator[tuple[str, Path, Layout, int, float]]:
        """Each object file opened with `flags`: (name, path, layout, descriptor, last
        change); closed when the caller moves on. Files that cannot be opened are skipped."""
        for name, path in self._files():
            layout = Layout.parse(name)
            assert layout is not None
            try:
                fd = os.open(path, flags | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                changed = os.fstat(fd).st_mtime
                yield name, path, layout, fd, changed
            finally:
                os.close(fd)

    def _reconcile(self) -> None:
        """After a crash: drop rows of blocks not stored, erase blocks without rows, remove
        files without blocks; empty a cache of the earlier layout.

        Files and their entries are read before rows are: a block is admitted (its row
        committed) before it is written, so a block seen here that has no row afterwards
        really is unaccounted. Files written to in the last `SETTLED` seconds, and rows used
        in them, are left alone: another process may be at work on them."""
        now = time.time()
        legacy = self.directory / cachedir.LEGACY_BLOCKS
        if legacy.is_dir():
            log.warning("cache dir %s: blocks of an earlier dcorfs layout removed", self.directory)
            shutil.rmtree(legacy, ignore_errors=True)
        seen: dict[str, tuple[Layout, Path, set[int], bool]] = {}
        for name, path, layout, fd, changed in self._object_files(os.O_RDONLY):
            with contextlib.suppress(OSError):
                present = set(slots.present(fd, layout))
                seen[name] = (layout, path, present, now - changed > SETTLED)
        with self._sql() as db:
            rows: dict[str, set[int]] = defaultdict(set)
            gone = []
            for name, used in db.execute("SELECT name, used FROM blocks"):
                split = split_name(name)
                if split is None:  # of the earlier layout
                    gone.append(name)
                    continue
                layout, index = split
                rows[layout.name].add(index)
                stored = seen.get(layout.name)
                if used < now - SETTLED and (stored is None or index not in stored[2]):
                    gone.append(name)
            if gone:
                db.executemany("DELETE FROM blocks WHERE name=?", [(n,) for n in gone])
        for name, (layout, path, present, settled) in seen.items():
            if not settled:
                continue
            if not rows.get(name):
                path.unlink(missing_ok=True)
            elif present - rows[name]:
                self._erase(layout, sorted(present - rows[name]))

    def _erase(self, layout: Layout, indices: list[int]) -> None:
        """Erase blocks of one object file (that has no rows for them any more)."""
        try:
            fd = os.open(self._file(layout), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            for index in indices:
                slots.erase(fd, layout, index, punch=self._punch)
        finally:
            os.close(fd)

    def get(
        self,
        obj: ObjectId,
        index: int,
        *,
        block_size: int | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Block | None:
        """Bytes [start, stop) of block `index` of `obj` (blocks of `block_size`, by default
        the store's; offsets within the block, the whole block by default), or None. Only the
        pages of the block holding those bytes are read and checked (`slots`). Nothing is
        written here, nor waited for (reads run on the FUSE thread too, and the index may be
        busy with another writer, of this process or another): the block's mark of use, and
        the erasure of a block found damaged (a miss from then on), wait for `settle`."""
        layout = Layout.of(obj, block_size or self.block_size)
        name = block_name(layout, index)
        if name in self._damaged:
            return None
        try:
            fd = os.open(self._file(layout), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cache file %s unreadable: %s", layout.name, exc)
            return None
        try:
            data = slots.read(fd, layout, index, start, stop)
        except Damaged as exc:
            if not slots.stored(fd, layout, index):  # (evicted while read: a miss)
                return None
            self.errors += 1
            log.warning(
                "cache block %s failed its integrity check (%s): to be erased", layout.name, exc
            )
            with self._marks_lock:
                self._damaged.add(name)
            self._unsettled()
            return None
        except OSError as exc:
            log.warning("cache file %s unreadable: %s", layout.name, exc)
            return None
        finally:
            os.close(fd)
        if data is not None:
            self._touch(name)
        return data

    def get_run(
        self,
        obj: ObjectId,
        first: int,
        count: int,
        *,
        block_size: int | None = None,
        pooled: bool = False,
    ) -> list[Block | None]:
        """Whole blocks `first` … `first + count - 1` of `obj` (each as `get` gives it, or
        None), read from their file together (`slots.read_run`); a block that fails a check
        there is read alone by `get`, which finds and handles its damage. With `pooled`, for
        a caller that lets them go soon (a stream's window), blocks written past the page
        cache are read past it too, as views of the store's reused buffers (`runbuffers`)."""
        layout = Layout.of(obj, block_size or self.block_size)
        indices = range(first, first + count)
        path = self._file(layout)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return [None] * count
        except OSError:  # (each `get` then says what)
            return [self.get(obj, index, block_size=block_size) for index in indices]
        direct = self._direct_run(path, layout, count) if pooled else None
        try:
            found, failed = slots.read_run(fd, layout, first, count, direct=direct)
        except OSError:
            found, failed = [None] * count, list(indices)
        finally:
            os.close(fd)
            if direct is not None:
                os.close(direct[0])
        again = set(failed)
        blocks: list[Block | None] = []
        for index, read in zip(indices, found, strict=True):
            name = block_name(layout, index)
            if index in again:
                blocks.append(self.get(obj, index, block_size=block_size))
            elif read is None or name in self._damaged:  # (so found by another reader)
                blocks.append(None)
            else:
                self._touch(name)
                blocks.append(read)
        return blocks

    def _direct_run(self, path: str, layout: Layout, count: int) -> slots.Direct | None:
        """For a run of `count` blocks, each written past the page cache (`direct_from`): the
        file opened again with O_DIRECT, to read them past it too into the store's reused
        buffers (`runbuffers`); None for other runs, or where the open is refused."""
        least = self._direct_from
        if least is None or count < 2 or layout.block_size < least or self.run_buffers.refused:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | slots.O_DIRECT)
        except OSError:
            return None
        with self._marks_lock:  # (their buffers are let go at a settling: `_trim_runs`)
            first = self._runs_due is None
            if first:
                self._runs_due = time.monotonic() + TOUCH_EVERY
        if first:
            self._unsettled()
        return fd, self.run_buffers

    def _touch(self, name: str) -> None:
        """Mark a block used (at most every TOUCH_EVERY seconds per block), for `settle`."""
        now = time.time()
        if now - self._touched.get(name, 0.0) <= TOUCH_EVERY:
            return
        self._touched[name] = now
        with self._marks_lock:
            first = not self._pending
            if first:
                self._marked = time.monotonic()
            self._pending[name] = now
            batch = len(self._pending) == TOUCH_BATCH
        if first or batch:
            self._unsettled()

    def _unsettled(self) -> None:
        """Tell `on_unsettled` (whoever runs `settle`) that its due time came nearer."""
        wake = self.on_unsettled
        if wake is not None:
            wake()

    def settle_in(self) -> float | None:
        """Seconds until `settle` is due (0: now), None when reads left nothing to write:
        a damaged block is erased at once, marks of use once there are TOUCH_BATCH of them
        or the oldest waited TOUCH_EVERY seconds; after a failed `settle`, not before
        SETTLE_RETRY seconds."""
        now = time.monotonic()
        with self._marks_lock:
            dues = [] if self._runs_due is None else [max(0.0, self._runs_due - now)]
            if self._damaged or self._pending:
                due = self._marked + TOUCH_EVERY
                if self._damaged or len(self._pending) >= TOUCH_BATCH:
                    due = 0.0
                dues.append(max(0.0, due - now, self._retry_at - now))
            return min(dues) if dues else None

    def settle(self) -> None:
        """Write what reads left to be written (`get`), in one transaction: their marks of
        use (so that other stores of the directory evict in LRU order), and the rows of the
        damaged blocks they found, each checked again there (a block written anew meanwhile,
        by this process or another, stays); the slots of those blocks are erased after the
        commit, as evictions are (a writer that still saw a row erases its own block). Called
        by the disk writer (`WriteBehind`) when due, and by `close`; marks are also written by
        any admission (`put_many`, before it evicts). A failure of the index (busy beyond its
        timeout, damaged) loses the marks taken (they only order evictions) and keeps the
        damaged blocks (misses meanwhile) for a retry in SETTLE_RETRY seconds."""
        self._trim_runs()
        if self._closed:
            return
        marks = self._take_marks()
        with self._marks_lock:
            damaged = set(self._damaged)
            if not (marks or damaged):
                return  # (due for `_trim_runs` alone)
            # (until it ends well: whatever fails, it is not tried again at once)
            self._retry_at = time.monotonic() + SETTLE_RETRY
        try:
            with self._transaction() as db:
                self._write_marks(db, marks)
                erase = dict.fromkeys(name for name in damaged if self._bad(name))
                db.executemany("DELETE FROM blocks WHERE name=?", [(name,) for name in erase])
        except sqlite3.Error as exc:
            log.warning("cache accounting failed (%s): marks of use lost, erasing later", exc)
            return
        self._free(erase, set())
        with self._marks_lock:
            self._damaged -= damaged
            self._retry_at = 0.0

    def _trim_runs(self) -> None:
        """Let the run buffers nothing refers to go, once due (`TOUCH_EVERY` seconds after
        the first run read into them, then again while some stay in use)."""
        with self._marks_lock:
            due = self._runs_due
        if due is None or time.monotonic() < due:
            return
        self.run_buffers.trim()
        with self._marks_lock:
            self._runs_due = time.monotonic() + TOUCH_EVERY if len(self.run_buffers) else None

    def _bad(self, name: str) -> bool:
        """Whether a block found damaged is to be erased: it still fails its check, or it is
        gone from its file (its row, if any, goes); not one written anew since."""
        split = split_name(name)
        if split is None:
            return True
        layout, index = split
        try:
            fd = os.open(self._file(layout), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return True
        try:
            return slots.read(fd, layout, index) is None
        except Damaged:
            return True
        except OSError:
            return False  # (not to be judged now: left as it is)
        finally:
            os.close(fd)

    def _take_marks(self) -> dict[str, float]:
        """The pending marks of use (last use by block name), to be written by the taker."""
        with self._marks_lock:
            marks, self._pending = self._pending, {}
        return marks

    @staticmethod
    def _write_marks(db: sqlite3.Connection, marks: dict[str, float]) -> None:
        """Write marks of use (inside the caller's transaction)."""
        db.executemany("UPDATE blocks SET used=? WHERE name=?", [(t, n) for n, t in marks.items()])

    def put_many(
        self,
        obj: ObjectId,
        blocks: dict[int, bytes],
        *,
        block_size: int | None = None,
        behind: bool = False,
    ) -> int:
        """Store blocks of one object (one accounting transaction); returns how many.
        (`behind`: as `WriteBehind.put_many` takes it; here, with no writer of its own,
        written now either way.)"""
        now = time.time()
        if now < self._full_until:
            return 0
        layout = Layout.of(obj, block_size or self.block_size)
        chosen: dict[int, bytes] = {}
        entries: list[tuple[str, int]] = []  # accounted as the disk space each block takes
        total = 0
        for index, data in sorted(blocks.items()):
            taken = slots.footprint(len(data))  # whole pages: a small block takes one
            if total + taken > self.limit:
                break  # never more than the limit, even in one batch
            chosen[index] = data
            entries.append((block_name(layout, index), taken))
            total += taken
        if not chosen:
            return 0
        names = [name for name, _ in entries]
        try:
            self._admit(obj, entries, now)
            self._write(layout, chosen)
            self._drop_evicted(layout, chosen)
        except OSError as exc:
            self._unadmit(names)
            with contextlib.suppress(OSError):
                self._erase(layout, list(chosen))
            if exc.errno in FULL_DISK:
                if self._full_until == 0.0:
                    log.warning("cache disabled for now (%s): reads go to the network", exc)
                self._full_until = now + RETRY_FULL
                return 0
            raise
        except sqlite3.Error as exc:
            log.warning("cache accounting failed (%s): blocks not stored", exc)
            return 0
        if self._damaged:  # written anew: no longer misses, nor to be erased
            with self._marks_lock:
                self._damaged.difference_update(names)
        return len(chosen)

    def _write(self, layout: Layout, blocks: dict[int, bytes]) -> None:
        path = Path(self._file(layout))
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            for index, data in blocks.items():
                self._write_block(fd, layout, index, data)
        finally:
            os.close(fd)

    def _write_block(self, fd: int, layout: Layout, index: int, data: bytes) -> None:
        """A block of at least `direct_from` bytes past the page cache; where that is refused
        (EINVAL: the probe passed, but this file's filesystem or device wants other
        alignments, or a write came back short) every block goes through the page cache
        from then on, said once, this one too."""
        least = self._direct_from  # (read once: another thread may turn it off)
        if least is not None and len(data) >= least:
            try:
                slots.write(fd, layout, index, data, direct=True)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._no_direct(exc)
        slots.write(fd, layout, index, data)

    def _no_direct(self, refused: OSError) -> None:
        with self._direct_lock:
            if self._direct_from is None:
                return
            self._direct_from = None
        log.warning(
            "cache writes past the page cache refused (%s): written through it",
            refused.strerror or refused,
        )

    def _admit(self, obj: ObjectId, entries: list[tuple[str, int]], now: float) -> None:
        """Record blocks and evict LRU blocks so that the total stays within the limit."""
        size = sum(nbytes for _, nbytes in entries)
        names = [(name,) for name, _ in entries]
        with self._transaction() as db:
            self._write_marks(db, self._take_marks())
            db.executemany("DELETE FROM blocks WHERE name=?", names)
            (used,) = db.execute("SELECT bytes FROM total").fetchone()
            victims: dict[str, None] = {}
            if used + size > self.limit:
                for victim, nbytes in db.execute("SELECT name, bytes FROM blocks ORDER BY used"):
                    if victim in victims:
                        continue
                    for name, freed in self._with_its_file(db, victim, nbytes):
                        victims[name] = None
                        used -= freed
                    if used + size <= self.limit:
                        break
            db.executemany("DELETE FROM blocks WHERE name=?", [(v,) for v in victims])
            # before the new rows: a file left without blocks goes, even the one written to
            # now (its new blocks go into a new file, written after `_free`): without holes
            # its evicted blocks' space comes back only so
            emptied = self._emptied(db, victims)
            db.executemany("INSERT INTO blocks VALUES (?, ?, ?)", [(n, b, now) for n, b in entries])
            db.execute(
                "INSERT OR IGNORE INTO objects VALUES (?, ?, ?, ?)",
                (obj.identity.hex(), obj.key, obj.etag, obj.size),
            )
        # after the commit: a writer that still saw a victim's row is now bound to see it gone
        self._free(victims, emptied)

    def _with_its_file(
        self, db: sqlite3.Connection, victim: str, nbytes: int
    ) -> list[tuple[str, int]]:
        """The blocks an eviction of `victim` takes: itself, or, where holes cannot be
        punched, every block of its file (whose space only comes back with the file)."""
        split = split_name(victim)
        if self._punch or split is None:
            return [(victim, nbytes)]
        prefix = f"{split[0].name}-"
        rows = db.execute(
            "SELECT name, bytes FROM blocks WHERE substr(name, 1, ?) = ?", (len(prefix), prefix)
        )
        return [(name, int(size)) for name, size in rows]

    @staticmethod
    def _emptied(db: sqlite3.Connection, victims: dict[str, None]) -> set[str]:
        """The object files of these evicted blocks that have no block left (in the
        transaction that evicted them)."""
        files = {split[0].name for v in victims if (split := split_name(v)) is not None}
        return {
            name
            for name in files
            if db.execute(
                "SELECT 1 FROM blocks WHERE substr(name, 1, ?) = ? LIMIT 1",
                (len(name) + 1, f"{name}-"),
            ).fetchone()
            is None
        }

    def _free(self, victims: dict[str, None], emptied: set[str]) -> None:
        """Give the disk space of blocks whose rows are gone back (evicted, or found damaged:
        `settle`): whole files removed, blocks erased."""
        by_file: dict[str, list[int]] = defaultdict(list)
        for victim in victims:
            split = split_name(victim)
            if split is not None and split[0].name not in emptied:
                by_file[split[0].name].append(split[1])
        for name in emptied:
            (self._objects / name).unlink(missing_ok=True)
        for name, indices in by_file.items():
            layout = Layout.parse(name)
            assert layout is not None
            with contextlib.suppress(OSError):
                self._erase(layout, indices)

    def _drop_evicted(self, layout: Layout, blocks: dict[int, bytes]) -> None:
        """Another process may have evicted a block between its admission and its writing:
        a block without its row would escape the size bound, so it goes."""
        with self._sql() as db:
            gone = [
                index
                for index in blocks
                if db.execute(
                    "SELECT 1 FROM blocks WHERE name=?", (block_name(layout, index),)
                ).fetchone()
                is None
            ]
        if gone:
            self._erase(layout, gone)

    def _unadmit(self, names: list[str]) -> None:
        with contextlib.suppress(sqlite3.Error), self._sql() as db:
            db.executemany("DELETE FROM blocks WHERE name=?", [(n,) for n in names])

    def usage(self) -> tuple[int, int]:
        """(bytes, blocks) stored by all processes; (0, 0) if the accounting is unreadable."""
        try:
            with self._sql() as db:
                total, count = db.execute("SELECT bytes, blocks FROM total").fetchone()
        except sqlite3.Error as exc:
            log.warning("cache accounting unreadable: %s", exc)
            return 0, 0
        return int(total), int(count)

    def clear(self) -> tuple[int, int]:
        """Remove every block (of all processes); returns (bytes, blocks) removed."""
        with self._transaction() as db:
            nbytes, count = db.execute("SELECT bytes, blocks FROM total").fetchone()
            db.execute("DELETE FROM blocks")
            db.execute("DELETE FROM objects")
        for _, path in list(self._files()):  # rows are gone: any block left is unaccounted
            path.unlink(missing_ok=True)  # (a writer at work erases it, seeing its row gone)
        self._touched.clear()
        with self._marks_lock:
            self._pending.clear()
            self._damaged.clear()
        return int(nbytes), int(count)

    def close(self) -> None:
        if self.settle_in() is not None:
            with self._marks_lock:
                self._retry_at = 0.0  # (the last chance)
            self.settle()
        self._closed = True
        with self._sql_lock:
            db, self._conn = self._conn, None
            if db is not None:
                db.close()
        if self._hold >= 0:
            os.close(self._hold)  # releases the lock
            self._hold = -1
