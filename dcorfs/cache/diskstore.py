"""The persistent tier of the block cache: one checksummed file per block, bounded in size.

Layout under the cache dir (0700; every file 0600):
  blocks/<2 hex>/<sha256(key NUL etag)>-<index>   header + data
  index.sqlite3                                  accounting: blocks (name, bytes, last use),
                                                 objects (identity → key, ETag, size),
                                                 total (bytes of all blocks, kept by triggers)
  lock                                           held shared by every store in use, exclusive
                                                 by `dcorfs cache clear`

A block file starts with MAGIC, the identity hash, the block index, the data length and the
CRC32 of the data; `get` checks all of it, so a torn, truncated, flipped or misplaced file is
a miss (and is removed), never data. A block is first admitted (its row, evicting others),
then written to a temp file and renamed into place; a file whose row is gone by then (evicted
by another process) is removed again. The size bound is enforced at admission inside one
SQLite `BEGIN IMMEDIATE` transaction: least recently used blocks are evicted (their files
unlinked after the commit) until the new blocks fit, so several dcorfs processes sharing the
directory never overshoot together.
No fsync per block: after a crash a torn file fails its CRC and is refetched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from . import cachedir
from .identity import ObjectId

log = logging.getLogger(__name__)

MAGIC = b"DCFSBLK1"
HEADER = struct.Struct("<8s32sQQI")  # magic, identity, index, length, crc32
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
RETRY_FULL = 30.0
TOUCH_EVERY = 5.0
TOUCH_BATCH = 64  # marks of use written together


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


def _read_block(path: Path, length: int) -> tuple[bytes, bytes]:
    """Header and data of a block file whose data should be `length` bytes, the data read
    into a buffer of its own (no copy); a file of another size reads as nothing (and fails)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != HEADER.size + length:
            return b"", b""
        return os.pread(fd, HEADER.size, 0), os.pread(fd, length, HEADER.size)
    finally:
        os.close(fd)


def _valid(header: bytes, data: bytes, identity: bytes, index: int, length: int) -> bool:
    """Whether a block file's header names this block (of the object with this identity),
    its length and its data's CRC."""
    if len(header) != HEADER.size or len(data) != length:
        return False
    magic, stored_identity, stored_index, stored_length, crc = HEADER.unpack(header)
    return bool(
        magic == MAGIC
        and stored_identity == identity
        and stored_index == index
        and stored_length == length
        and zlib.crc32(data) == crc
    )


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
        data = int(nbytes) - int(blocks) * HEADER.size
        yield StoredObject(key, etag, size, int(blocks), data)


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


def _intact(raw: bytes, file_name: str) -> bool:
    """A block file whose header matches its name and whose data matches its CRC."""
    identity, _, index = file_name.partition("-")
    try:
        named = bytes.fromhex(identity), int(index)
    except ValueError:
        return False
    header, data = raw[: HEADER.size], raw[HEADER.size :]
    return _valid(header, data, *named, len(data))


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
    # one row per block file: its name `<2 hex>/<identity hex>-<index>` under blocks/, its
    # length in bytes and when it was last used (seconds since the epoch; eviction goes by it)
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
    ) -> None:
        """`exclusive`: fail with CacheInUse unless no other store uses the directory."""
        self.directory = directory
        self.limit = limit_bytes
        self.block_size = block_size
        self._blocks = directory / cachedir.BLOCKS
        self._conn: sqlite3.Connection | None = None  # see `_sql`
        self._sql_lock = threading.RLock()
        self._full_until = 0.0
        self._touched: dict[str, float] = {}
        self._pending: dict[str, float] = {}  # marks of use not written yet
        self._touch_lock = threading.Lock()
        self._flushed = time.time()
        self.errors = 0
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._blocks.mkdir(mode=0o700, exist_ok=True)
        for path in (directory, self._blocks):
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
        """Rows for the valid block files found (after the index was renewed); bad files go."""
        rows = []
        for path in self._blocks.glob("*/*"):
            if ".tmp" in path.name:
                continue
            try:
                raw = path.read_bytes()
                used = path.stat().st_mtime
            except OSError:
                continue
            name = f"{path.parent.name}/{path.name}"
            if _intact(raw, path.name):
                rows.append((name, len(raw), used))
            else:
                path.unlink(missing_ok=True)
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

    @staticmethod
    def name(obj: ObjectId, index: int) -> str:
        digest = obj.identity.hex()
        return f"{digest[:2]}/{digest}-{index}"

    def _path(self, name: str) -> Path:
        return self._blocks / name

    def _reconcile(self) -> None:
        """After a crash: drop rows without files, remove files without rows, old temp files.

        Files are listed before rows are read: a block is admitted (its row committed) before
        its file is renamed into place, so a file seen here that has no row afterwards really
        is unaccounted, even while other processes write blocks."""
        now = time.time()
        seen = set()
        for sub in self._blocks.iterdir():
            if not sub.is_dir():
                continue
            for path in sub.iterdir():
                if ".tmp" in path.name:
                    with contextlib.suppress(OSError):
                        if now - path.stat().st_mtime > 60:
                            path.unlink()
                    continue
                seen.add(f"{sub.name}/{path.name}")
        with self._sql() as db:
            rows = {name for (name,) in db.execute("SELECT name FROM blocks")}
            settled = {  # rows of blocks another process may be writing now are left alone
                name
                for (name,) in db.execute("SELECT name FROM blocks WHERE used < ?", (now - 60,))
            }
            for name in seen - rows:  # unaccounted (its row was evicted): it must go
                self._path(name).unlink(missing_ok=True)
            missing = (rows & settled) - seen
            if missing:
                db.executemany("DELETE FROM blocks WHERE name=?", [(n,) for n in missing])

    def get(self, obj: ObjectId, index: int, *, block_size: int | None = None) -> bytes | None:
        """Block `index` of `obj` (blocks of `block_size`, by default the store's), or None."""
        name = self.name(obj, index)
        block = block_size or self.block_size
        expected = min(block, obj.size - index * block)
        try:
            header, data = _read_block(self._path(name), expected)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cache block %s unreadable: %s", name, exc)
            return None
        if not _valid(header, data, obj.identity, index, expected):
            self.errors += 1
            log.warning("cache block %s failed its integrity check: removed", name)
            self._drop(name)
            return None
        self._touch(name)
        return data

    def _touch(self, name: str) -> None:
        """Mark a block used: at most every TOUCH_EVERY seconds per block, written in batches
        (and before any eviction by this process, so that its LRU order is exact)."""
        now = time.time()
        if now - self._touched.get(name, 0.0) <= TOUCH_EVERY:
            return
        self._touched[name] = now
        with self._touch_lock:
            self._pending[name] = now
            if len(self._pending) < TOUCH_BATCH and now - self._flushed < TOUCH_EVERY:
                return
        with contextlib.suppress(sqlite3.Error), self._transaction() as db:
            self._write_touches(db)

    def _write_touches(self, db: sqlite3.Connection) -> None:
        """Write the pending marks of use (inside the caller's transaction)."""
        with self._touch_lock:
            pending, self._pending = self._pending, {}
            self._flushed = time.time()
        db.executemany(
            "UPDATE blocks SET used=? WHERE name=?", [(t, n) for n, t in pending.items()]
        )

    def _drop(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self._path(name).unlink()
        with contextlib.suppress(sqlite3.Error), self._sql() as db:
            db.execute("DELETE FROM blocks WHERE name=?", (name,))

    def put_many(self, obj: ObjectId, blocks: dict[int, bytes]) -> int:
        """Store blocks of one object (one accounting transaction); returns how many."""
        now = time.time()
        if now < self._full_until:
            return 0
        chosen: list[tuple[str, int, bytes, int]] = []
        total = 0
        for index, data in sorted(blocks.items()):
            size = HEADER.size + len(data)
            if total + size > self.limit:
                break  # never more than the limit, even in one batch
            chosen.append((self.name(obj, index), index, data, size))
            total += size
        if not chosen:
            return 0
        try:
            self._admit(obj, [(name, size) for name, _, _, size in chosen], now)
            for name, index, data, _ in chosen:
                self._write(obj, name, index, data)
            self._drop_evicted([name for name, *_ in chosen])
        except OSError as exc:
            for name, *_ in chosen:
                self._unadmit(name)
            if exc.errno in FULL_DISK:
                if self._full_until == 0.0:
                    log.warning("cache disabled for now (%s): reads go to the network", exc)
                self._full_until = now + RETRY_FULL
                return 0
            raise
        except sqlite3.Error as exc:
            log.warning("cache accounting failed (%s): blocks not stored", exc)
            return 0
        return len(chosen)

    def _write(self, obj: ObjectId, name: str, index: int, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        temp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        header = HEADER.pack(MAGIC, obj.identity, index, len(data), zlib.crc32(data))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(header)
                handle.write(data)
            temp.replace(path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _admit(self, obj: ObjectId, entries: list[tuple[str, int]], now: float) -> None:
        """Record blocks and evict LRU blocks so that the total stays within the limit."""
        size = sum(nbytes for _, nbytes in entries)
        names = [(name,) for name, _ in entries]
        with self._transaction() as db:
            self._write_touches(db)
            db.executemany("DELETE FROM blocks WHERE name=?", names)
            (used,) = db.execute("SELECT bytes FROM total").fetchone()
            victims = []
            if used + size > self.limit:
                for victim, nbytes in db.execute("SELECT name, bytes FROM blocks ORDER BY used"):
                    victims.append(victim)
                    used -= nbytes
                    if used + size <= self.limit:
                        break
            db.executemany("DELETE FROM blocks WHERE name=?", [(v,) for v in victims])
            db.executemany("INSERT INTO blocks VALUES (?, ?, ?)", [(n, b, now) for n, b in entries])
            db.execute(
                "INSERT OR IGNORE INTO objects VALUES (?, ?, ?, ?)",
                (obj.identity.hex(), obj.key, obj.etag, obj.size),
            )
        # after the commit: a writer that still saw a victim's row is now bound to see it gone
        for victim in victims:
            self._path(victim).unlink(missing_ok=True)

    def _drop_evicted(self, names: list[str]) -> None:
        """Another process may have evicted a block between its admission and our rename:
        a file without its row would escape the size bound, so it goes."""
        with self._sql() as db:
            for name in names:
                if db.execute("SELECT 1 FROM blocks WHERE name=?", (name,)).fetchone() is None:
                    self._path(name).unlink(missing_ok=True)

    def _unadmit(self, name: str) -> None:
        with contextlib.suppress(sqlite3.Error), self._sql() as db:
            db.execute("DELETE FROM blocks WHERE name=?", (name,))

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
        for sub in self._blocks.iterdir():  # rows are gone: any file left would be unaccounted
            if sub.is_dir():
                for path in sub.iterdir():
                    if ".tmp" not in path.name:  # a writer's rename must not fail; its
                        path.unlink(missing_ok=True)  # block goes once it sees its row gone
        self._touched.clear()
        with self._touch_lock:
            self._pending.clear()
        return int(nbytes), int(count)

    def close(self) -> None:
        with self._sql_lock:
            db, self._conn = self._conn, None
            if db is not None:
                if self._pending:
                    with contextlib.suppress(sqlite3.Error):
                        self._write_touches(db)
                db.close()
        if self._hold >= 0:
            os.close(self._hold)  # releases the lock
            self._hold = -1
