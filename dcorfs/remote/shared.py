"""The shared cache tier (`--shared-cache s3://BUCKET/PREFIX`): pieces of remote objects on a
site's S3 store, read and filled by the mounts of many nodes (doc/CLUSTER.md).

It wraps the block cache's fetch function (the cache never learns where bytes come from), so
the read order is memory → local disk → shared tier → DCOR. A miss of an object that may be
shared is looked up in the tier first, in aligned pieces of `PIECE` bytes, all of them side by
side and within `LOOKUP_WAIT` seconds (one request per piece at a time: a reader wanting a
piece another is asking for waits for that answer); what the tier lacks (or fails to give in
time) is fetched from DCOR as without it. The pieces a DCOR fetch covered whole are then uploaded in
the background; a piece it covered in part is first fetched whole from DCOR in the background
(completed), so that the next node finds every piece its reads need (the cost: up to one piece
more from DCOR per partly read piece, on the node that reads first).

Pieces: `PREFIX/v1/<public|private>/<SHA-256 of bucket/key, ETag, size>/<PIECE in KiB>k/<index>`,
the last piece of an object shorter. Each body is a header (magic, the digest of what it
is, offset, length, SHA-256 of the payload) and the payload: the reader checks all of it from
the bytes themselves; a piece that fails is counted corrupt, skipped (DCOR serves the read)
and uploaded again from what DCOR gave.

Identities: a condensed file's ETag is in no CKAN record (doc/DCOR.md), so a mount probes it,
which brings object bytes from DCOR. A node that probed an object of a public dataset writes
its size and ETag to `PREFIX/v1/public/identity/<SHA-256 of bucket/key>`, and other nodes take
them from there instead of probing: kept for good, as the mount's own metadata store keeps
them. Never for private objects: their ETag is what keeps their pieces out of reach of
mounts that may not read them (see `allow`).

Bounds: lookups run in `LOOKUP_THREADS` threads and each waits at most `LOOKUP_WAIT` seconds;
after a failure (not a miss) the tier is left alone for `DOWN_FOR` seconds (reads go straight
to DCOR). Uploads run in `UPLOAD_THREADS` threads; the bytes they wait with are held in
`room` (the memory plan's `uploading` part, `cache.budget`), taken without waiting: a piece
that finds no room keeps no bytes and is fetched again (completed) later; at most `MAX_JOBS`
uploads (pieces and identities) are queued, more are dropped (counted). Reads never wait for
an upload. The last `KEEP` pieces taken from the tier are kept in the same room (`_keep`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..cache.budget import InFlight
from ..cache.identity import ObjectId
from ..errors import DcorfsError, DeadlineExceeded, NotFound
from ..settings import SharedCache
from .http import Http
from .s3 import object_url, sigv4_presigner

log = logging.getLogger(__name__)

PIECE = 1 << 20  # bytes per shared object (S3 wants requests of 1 MiB or more; see CLUSTER.md)
LOOKUP_WAIT = 2.0  # seconds a read waits for the tier before it asks DCOR
DOWN_FOR = 30.0  # seconds the tier is left alone after it failed
LOOKUP_THREADS = 8
UPLOAD_THREADS = 2
UPLOAD_WAIT = 60.0  # seconds an upload (with its completion from DCOR) may take
MAX_JOBS = 1024  # uploads queued at most
RECENT = 4096  # pieces remembered as uploaded (not queued again)
KEEP = 8  # pieces last taken from the tier, kept for the next misses in them (see `_keep`)
DRAIN = 10.0  # seconds `close` waits for queued uploads
MAGIC = b"dcorfs-piece-v1\n"
HEADER = struct.Struct(">16s32sQQ32s")  # magic, what it is, offset, length, SHA-256 of payload

Fetch = Callable[[ObjectId, int, int, float], bytes | memoryview]


class Corrupt(Exception):
    """A shared object whose bytes do not check out."""


def seal(name: bytes, offset: int, payload: bytes | memoryview) -> bytes:
    """The body of a shared object: header, then `payload`."""
    digest = hashlib.sha256(payload).digest()
    return HEADER.pack(MAGIC, name, offset, len(payload), digest) + payload


def unseal(body: bytes, name: bytes, offset: int, length: int | None = None) -> bytes:
    """The payload of a shared object, checked against its header (Corrupt otherwise)."""
    if len(body) < HEADER.size:
        raise Corrupt("shorter than its header")
    magic, named, at, stated, digest = HEADER.unpack_from(body)
    if magic != MAGIC:
        raise Corrupt("not a dcorfs piece")
    if named != name or at != offset:
        raise Corrupt("the header names another piece")
    if stated != len(body) - HEADER.size or (length is not None and stated != length):
        raise Corrupt(f"{len(body) - HEADER.size} bytes, header says {stated}")
    payload = body[HEADER.size :]
    if hashlib.sha256(payload).digest() != digest:
        raise Corrupt("checksum mismatch")
    return payload


def object_digest(obj: ObjectId) -> bytes:
    """What names an object's pieces: its bucket/key, ETag and size."""
    return hashlib.sha256(f"{obj.key}\0{obj.etag}\0{obj.size}".encode()).digest()


def identity_digest(key: str) -> bytes:
    return hashlib.sha256(f"identity\0{key}".encode()).digest()


def piece_range(obj: ObjectId, index: int) -> tuple[int, int]:
    return index * PIECE, min((index + 1) * PIECE, obj.size)


def pieces(start: int, stop: int) -> range:
    """Indices of the pieces holding bytes [start, stop)."""
    return range(start // PIECE, (stop - 1) // PIECE + 1) if stop > start else range(0)


class _Lookup:
    """A piece being asked for: its payload (None: not in the tier) once `done` is set."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.payload: bytes | None = None


class SharedTier:
    """One mount's view of the shared tier: lookups, uploads, and who may share.

    Thread-safe. `allow` is told, per object, whether it may be shared: objects of public
    datasets always, of private ones only with `private` (the opt-in); objects it was not told
    about (and private ones without the opt-in) never touch the tier.
    """

    def __init__(self, *, http: Http, config: SharedCache, room: InFlight) -> None:
        """`config`: where the tier is, its credentials (then requests are signed) and
        options; `room`: the bytes its uploads and kept pieces may hold."""
        self._http = http
        self.config = config
        self.endpoint, self.bucket, self.prefix = config.endpoint, config.bucket, config.prefix
        self.readonly, self.private, self.url = config.readonly, config.private, config.url
        credentials = config.credentials
        self._sign = sigv4_presigner(credentials) if credentials is not None else None
        self._room = room
        self._lock = threading.Lock()
        self._kinds: dict[str, str] = {}  # bucket/key -> "public" | "private", if shared
        self._counts: collections.Counter[str] = collections.Counter()
        self._closing_by = float("inf")  # set by `close`: uploads end by then
        self._jobs: set[tuple[ObjectId, int]] = set()  # pieces queued for upload
        self._writing = 0  # identities queued for upload
        self._recent: collections.OrderedDict[tuple[ObjectId, int], None] = (
            collections.OrderedDict()
        )
        self._kept: collections.OrderedDict[tuple[ObjectId, int], bytes] = collections.OrderedDict()
        self._looking: dict[tuple[ObjectId, int], _Lookup] = {}  # pieces being asked for
        self._down_until = 0.0
        self._uploads_paused_until = 0.0
        self._idle = threading.Condition(self._lock)
        self._dcor: Fetch | None = None
        self._lookups = concurrent.futures.ThreadPoolExecutor(
            max_workers=LOOKUP_THREADS, thread_name_prefix="shared"
        )
        self._uploads = concurrent.futures.ThreadPoolExecutor(
            max_workers=UPLOAD_THREADS, thread_name_prefix="shared-upload"
        )

    def announce(self) -> None:
        """Log, once a mount starts, that private data go to the tier (the opt-in)."""
        if self.private:
            log.warning(
                "objects of private datasets go to the shared cache %s too "
                "(--shared-cache-private): whoever can read it can read them",
                self.url,
            )

    # -- who may share ---------------------------------------------------------------------

    def allow(self, key: str, *, private: bool) -> None:
        """Whether the object `key` (bucket/key) may be shared: an object of a public dataset
        yes, of a private one only with the opt-in."""
        with self._lock:
            if private and not self.private:
                self._kinds.pop(key, None)  # (a dataset made private since)
            else:
                self._kinds[key] = "private" if private else "public"

    def _kind(self, key: str) -> str | None:
        with self._lock:
            return self._kinds.get(key)

    # -- names and requests ----------------------------------------------------------------

    def _name(self, *parts: str) -> str:
        return "/".join(p for p in (self.bucket, self.prefix, "v1", *parts) if p)

    def _piece_name(self, obj: ObjectId, kind: str, index: int) -> str:
        return self._name(kind, object_digest(obj).hex(), f"{PIECE >> 10}k", str(index))

    def _identity_name(self, key: str) -> str:
        return self._name("public", "identity", identity_digest(key).hex())

    def _url(self, name: str, method: str = "GET") -> str:
        url = object_url(self.endpoint, name)
        return self._sign(url, method) if self._sign is not None else url

    def _count(self, **counts: int) -> None:
        with self._lock:
            self._counts.update(counts)

    def up(self) -> bool:
        """False for `DOWN_FOR` seconds after a lookup failed."""
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException, *, upload: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            self._counts["errors"] += 1
            until = self._uploads_paused_until if upload else self._down_until
            if upload:
                self._uploads_paused_until = now + DOWN_FOR
            else:
                self._down_until = now + DOWN_FOR
        if until <= now:  # once per spell
            log.warning(
                "shared cache %s: %s failed (%s); %s for %.0f s",
                self.url,
                what,
                exc,
                "no uploads" if upload else "reads go to DCOR",
                DOWN_FOR,
            )

    def check(self, *, deadline: float) -> None:
        """Ask for an object that is never written: NotFound (NoSuchKey) is the answer of a
        working tier; raises what the store answered else (NoSuchBucket, AccessDenied …)."""
        try:
            self._http.get_document(self._url(self._name("check")), deadline=deadline)
        except NotFound as exc:
            if "NoSuchBucket" in str(exc):
                raise
        else:
            return

    def _get(
        self, name: str, digest: bytes, offset: int, deadline: float, length: int | None = None
    ) -> bytes | None:
        """A shared object's checked payload; None when it is missing, bad or late."""
        try:
            body = self._http.get_document(self._url(name), deadline=deadline, kind="shared")
        except NotFound:
            self._count(misses=1)
            return None
        except DcorfsError as exc:
            self._failed("a lookup", exc)
            return None
        try:
            payload = unseal(body, digest, offset, length)
        except Corrupt as exc:
            self._count(corrupt=1, misses=1)
            log.warning("shared cache: %s is damaged (%s): skipped, written again", name, exc)
            return None
        return payload

    # -- the read path -----------------------------------------------------------------------

    def _abandon(self, obj: ObjectId, indices: Iterable[int]) -> None:
        """Lookups registered but never asked: ended empty (their waiters go to DCOR)."""
        for index in indices:
            with self._lock:
                lookup = self._looking.pop((obj, index), None)
            if lookup is not None:
                lookup.done.set()

    def wrap(self, fetch: Fetch) -> Fetch:
        """The block cache's fetch function: `fetch` (DCOR) behind the tier."""
        self._dcor = fetch
        return self.fetch

    def _from_dcor(
        self, obj: ObjectId, start: int, stop: int, deadline: float
    ) -> bytes | memoryview:
        assert self._dcor is not None, "wrap() a DCOR fetch first"
        data = self._dcor(obj, start, stop, deadline)
        self._count(dcor_bytes=len(data))
        return data

    def fetch(self, obj: ObjectId, start: int, stop: int, deadline: float) -> bytes | memoryview:
        """Bytes [start, stop) of `obj`: the pieces the tier has, the rest from DCOR."""
        kind = self._kind(obj.key)
        if kind is None or not self.up():
            return self._from_dcor(obj, start, stop, deadline)
        indices = pieces(start, stop)
        try:
            found = self._look_up(obj, kind, indices, min(deadline, time.monotonic() + LOOKUP_WAIT))
        except Exception as exc:  # whatever fails in the tier, DCOR serves the read
            self._failed("a lookup", exc)
            found = {}
        missing = [i for i in indices if i not in found]
        if not found:
            # all from DCOR, made `bytes` once: a piece uploaded and a block the cache keeps
            # are then the very same object when they span all of it (a slice of `bytes`
            # that spans all of it is not copied), not one copy each
            whole = bytes(self._from_dcor(obj, start, stop, deadline))
            self.offer(obj, start, whole)
            return whole
        out = bytearray(stop - start)
        for index, payload in found.items():
            a, b = piece_range(obj, index)
            lo, hi = max(a, start), min(b, stop)
            out[lo - start : hi - start] = payload[lo - a : hi - a]
        if missing:
            a = max(start, piece_range(obj, missing[0])[0])
            b = min(stop, piece_range(obj, missing[-1])[1])
            data = self._from_dcor(obj, a, b, deadline)
            out[a - start : b - start] = data
            self.offer(obj, a, data, have=found.keys())
            del data  # (the pieces offered are copies)
        return memoryview(out).toreadonly()  # the block cache copies its blocks out

    def _look_up(
        self, obj: ObjectId, kind: str, indices: range, deadline: float
    ) -> dict[int, bytes]:
        """The pieces the tier has (checked), by index. One request per piece at a time:
        a piece kept or being asked for by another reader is taken from there."""
        digest = object_digest(obj)
        found: dict[int, bytes | None] = {}
        owned: list[int] = []
        waits: dict[int, _Lookup] = {}
        with self._lock:
            for index in indices:
                piece = (obj, index)
                if piece in self._kept:
                    self._kept.move_to_end(piece)
                    found[index] = self._kept[piece]
                elif piece in self._looking:
                    waits[index] = self._looking[piece]
                else:
                    self._looking[piece] = _Lookup()
                    owned.append(index)
        if found or waits:
            self._count(reused=len(found) + len(waits))

        def one(index: int) -> bytes | None:
            piece = (obj, index)
            payload = None
            try:
                if self.up() and time.monotonic() < deadline:
                    a, b = piece_range(obj, index)
                    name = self._piece_name(obj, kind, index)
                    payload = self._get(name, digest, a, deadline, b - a)
                if payload is not None:
                    self._count(hits=1, hit_bytes=len(payload))
                    self._keep(piece, payload)
            finally:
                with self._lock:
                    lookup = self._looking.pop(piece)
                    if payload is None:  # the tier lacks it: upload it again even if we did
                        self._recent.pop(piece, None)
                lookup.payload = payload
                lookup.done.set()
            return payload

        if len(owned) == 1:
            found[owned[0]] = one(owned[0])
        elif owned:
            # side by side, waited for until the deadline: late ones end on their own (the
            # read goes on from DCOR)
            futures: dict[int, concurrent.futures.Future[bytes | None]] = {}
            try:
                for index in owned:
                    futures[index] = self._lookups.submit(one, index)
            finally:  # not submitted (the mount is closing): asked by no one
                self._abandon(obj, [i for i in owned if i not in futures])
            left = max(0.0, deadline - time.monotonic())
            done, _ = concurrent.futures.wait(futures.values(), timeout=left)
            for index, future in futures.items():
                if future in done and future.exception() is None:
                    found[index] = future.result()
        for index, lookup in waits.items():
            if lookup.done.wait(max(0.0, deadline - time.monotonic())):
                found[index] = lookup.payload
        return {i: p for i, p in found.items() if p is not None}

    def _forget_kept(self) -> None:
        """Give back the room of the kept pieces (holding the lock)."""
        for payload in self._kept.values():
            self._room.give(len(payload))
        self._kept.clear()

    def _keep(self, piece: tuple[ObjectId, int], payload: bytes) -> None:
        """Keep the last `KEEP` pieces taken from the tier (in the `room` of uploads, if
        there is room): the block cache asks for the blocks of HDF5's scattered structure one
        miss after another, often several in one piece, each of which would take the whole
        piece from the tier again."""
        if not self._room.try_take(len(payload)):
            return
        with self._lock:
            dropped = [self._kept.pop(piece)] if piece in self._kept else []
            self._kept[piece] = payload
            while len(self._kept) > KEEP:
                dropped.append(self._kept.popitem(last=False)[1])
        for old in dropped:
            self._room.give(len(old))

    # -- uploads -----------------------------------------------------------------------------

    def offer(
        self, obj: ObjectId, offset: int, data: bytes | memoryview, have: Iterable[int] = ()
    ) -> None:
        """Bytes of `obj` from `offset` that came from DCOR (a fetch, a size probe): the pieces
        they hold whole are uploaded, those they hold in part completed, in the background
        (but not the pieces in `have`: the tier gave them)."""
        if self.readonly or not data or self._kind(obj.key) is None or not self._uploading():
            return
        skip = set(have)
        stop = offset + len(data)
        for index in pieces(offset, stop):
            if index in skip:
                continue
            a, b = piece_range(obj, index)
            whole = offset <= a and b <= stop
            self._queue(obj, index, bytes(data[a - offset : b - offset]) if whole else None)

    def _upload_deadline(self) -> float:
        """An upload's deadline: `UPLOAD_WAIT` from now, but never past the end of the
        unmount's wait for uploads (`close`)."""
        return min(time.monotonic() + UPLOAD_WAIT, self._closing_by)

    def _uploading(self) -> bool:
        return self.up() and time.monotonic() >= self._uploads_paused_until

    def _queue(self, obj: ObjectId, index: int, payload: bytes | None) -> None:
        job = (obj, index)
        with self._lock:
            if job in self._jobs or job in self._recent:
                return
            if self._queued() >= MAX_JOBS:
                self._counts["dropped"] += 1
                return
            if payload is not None and not self._room.try_take(len(payload)):
                # uploads come before kept pieces; without room, no bytes are kept: the
                # piece is fetched again when its upload's turn comes
                self._forget_kept()
                if not self._room.try_take(len(payload)):
                    payload = None
            self._jobs.add(job)
        try:
            self._uploads.submit(self._upload, obj, index, payload)
        except RuntimeError:  # shut down: the mount is closing
            self._done(job, payload, uploaded=False)

    def _queued(self) -> int:
        """Uploads queued, pieces and identities (holding the lock)."""
        return len(self._jobs) + self._writing

    def _done(self, job: tuple[ObjectId, int], payload: bytes | None, *, uploaded: bool) -> None:
        if payload is not None:
            self._room.give(len(payload))
        with self._lock:
            self._jobs.discard(job)
            if uploaded:
                self._recent[job] = None
                while len(self._recent) > RECENT:
                    self._recent.popitem(last=False)
            self._idle.notify_all()

    def _upload(self, obj: ObjectId, index: int, payload: bytes | None) -> None:
        job, uploaded = (obj, index), False
        try:
            kind = self._kind(obj.key)
            if kind is None or not self._uploading():
                self._count(dropped=1)
                return
            deadline = self._upload_deadline()
            if payload is None:
                a, b = piece_range(obj, index)
                with self._room.hold(b - a, deadline=deadline, what="shared cache upload"):
                    try:
                        data = self._from_dcor(obj, a, b, deadline)
                    except DcorfsError as exc:  # DCOR's failure, not the tier's: this job only
                        log.debug("shared cache: completing %s piece %d: %s", obj.key, index, exc)
                        self._count(dropped=1)
                        return
                    self._count(completions=1)
                    self._put(self._piece_name(obj, kind, index), obj, index, data, deadline)
            else:
                self._put(self._piece_name(obj, kind, index), obj, index, payload, deadline)
            uploaded = True
        except DeadlineExceeded:
            self._count(dropped=1)
        except DcorfsError as exc:
            self._failed(f"uploading {obj.key} piece {index}", exc, upload=True)
        except Exception:
            log.exception("shared cache: uploading %s piece %d", obj.key, index)
            self._count(errors=1)
        finally:
            self._done(job, payload, uploaded=uploaded)

    def _put(
        self, name: str, obj: ObjectId, index: int, data: bytes | memoryview, deadline: float
    ) -> None:
        self._send(name, seal(object_digest(obj), index * PIECE, data), deadline)
        self._count(uploads=1, uploaded_bytes=len(data))

    def _send(self, name: str, body: bytes, deadline: float) -> None:
        """PUT a sealed body (a piece, an identity) at `name`."""
        self._http.put(self._url(name, "PUT"), body, deadline=deadline, kind="shared_upload")

    # -- identities --------------------------------------------------------------------------

    def identity(self, key: str, *, deadline: float) -> tuple[int, str] | None:
        """(size, ETag) of the object of a public dataset at `key` as another node probed it;
        None when the tier has none (or the object is not public)."""
        if self._kind(key) != "public" or not self.up():
            return None
        wait = min(deadline, time.monotonic() + LOOKUP_WAIT)
        payload = self._get(self._identity_name(key), identity_digest(key), 0, wait)
        if payload is None:
            return None
        try:
            record: Any = json.loads(payload)
            if record["key"] != key or not isinstance(record["etag"], str):
                raise ValueError
            size, etag = int(record["size"]), record["etag"]
        except (ValueError, KeyError, TypeError):
            self._count(corrupt=1)
            return None
        self._count(identities=1)
        return size, etag

    def remember_identity(self, key: str, size: int, etag: str) -> None:
        """Tell other nodes the identity of the object of a public dataset at `key`."""
        if self.readonly or self._kind(key) != "public" or not self._uploading():
            return
        payload = json.dumps({"key": key, "size": size, "etag": etag}).encode()
        body = seal(identity_digest(key), 0, payload)

        def put() -> None:
            try:
                self._send(self._identity_name(key), body, self._upload_deadline())
            except DcorfsError as exc:
                self._failed(f"writing the identity of {key}", exc, upload=True)
            finally:
                with self._lock:
                    self._writing -= 1
                    self._idle.notify_all()

        with self._lock:
            if self._queued() >= MAX_JOBS:
                self._counts["dropped"] += 1
                return
            self._writing += 1
        try:
            self._uploads.submit(put)
        except RuntimeError:  # shut down: the mount is closing
            with self._lock:
                self._writing -= 1

    # -- status and end ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            pending = self._queued()
        names = (
            "hits", "reused", "misses", "corrupt", "errors", "uploads", "completions", "dropped",
            "identities", "hit_bytes", "dcor_bytes", "uploaded_bytes",
        )  # fmt: skip
        return {
            "url": self.url,
            "endpoint": self.endpoint,
            "readonly": self.readonly,
            "private": self.private,
            "up": self.up(),
            "pending": pending,
            "memory_bytes": self._room.used,  # queued uploads, kept pieces
            "memory_limit": self._room.limit,
            **{name: counts.get(name, 0) for name in names},
        }

    def drain(self, seconds: float) -> bool:
        """Wait until no upload is queued (at most `seconds`); whether none is."""
        deadline = time.monotonic() + seconds
        with self._lock:
            while self._queued():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def close(self) -> None:
        """Wait a little for queued uploads (`DRAIN`), then drop the rest: uploads under way
        end by then too (their deadline), so no thread outlives it for long."""
        self._closing_by = time.monotonic() + DRAIN
        if not self.drain(DRAIN):
            log.info("shared cache: %d uploads dropped at unmount", self.stats()["pending"])
        with self._lock:
            self._forget_kept()
        self._lookups.shutdown(wait=False, cancel_futures=True)
        self._uploads.shutdown(wait=False, cancel_futures=True)
