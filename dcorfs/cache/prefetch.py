"""The prefetch policy: what a mount fetches or makes before a reader asks for it, and how much.

Every constant and decision of it is here; the mechanisms that carry them out live where the
data are (`hdf5.rtdc`, `opening.resources`, `fs.readahead`, `fs.tree`). Measured effects are
in doc/ARCHITECTURE.md, "Speed".

Design note. Two costs dominate a remote HDF5 file: round trips (HDF5 keeps its structure in
small objects scattered through the file, and h5py reads them one after another, each miss a
round trip under h5py's global lock) and decoding (event data are compressed chunks). So the
policy is: learn where the structure lies and fetch it in few parallel batches before h5py
walks it; fetch the chunks of event data in parallel before h5py decodes them; decode once
and keep the decoded values; and for readers that stream, make the next bytes before they
are asked for, within a memory budget. In the order a resource meets them:

1. Opening an `.rtdc` object. Its first `HEAD` and last `TAIL` bytes are fetched in parallel
   (`metadata_ranges`): superblock and root group are at the start, and writers that grow a
   file leave object headers at its end. An object up to `WHOLE[kind]` bytes is fetched whole,
   in the request that also learns its size and ETag (`whole_size`): an upload that small is
   mostly structure, a condensed file that small is all scalars (and is then read from an
   in-memory copy, never through the cache). A larger condensed file up to
   `CONDENSED_WHOLE_ON_OPEN` bytes is fetched whole too (parallel ranges, into the cache)
   before HDF5 reads it (`structure_ranges`): its structure is spread through it, so
   describing it through misses was a chain of ~10 round trips under h5py's lock that fetched
   a third of it anyway (100,000 events, 14 MB: first scalar 0.49 s), and the first read of
   a scalar fetches it whole regardless (3.). The cost: a resource opened for a listing alone
   (`ls -lR`, a file manager) fetches such a condensed file whole too (at 100,000 events
   10.5 MB in 2 requests instead of 3.3 MB in 30: faster at 20 ms, more bytes on a slow link).
   An original larger than `WHOLE["resource"]` that must be described is read by HDF5 only
   once the condensed file is (`original_after_condensed`), its first and last bytes fetched
   meanwhile: HDF5's lock is held across every network miss of a description, a large
   original's structure is scattered (a chain of misses), and the scalars served early from
   the condensed file need that lock too (20,000 events, 20 ms: the first scalar 0.20 s
   instead of 0.12 s).
2. The object headers of what an RT-DC reader walks (`STRUCTURE`: the root; `events`, `logs`,
   `tables`; `events/trace`), one parallel batch per level, `HEADER_GUESS` bytes at each
   header's address (read from the links of the level above). Then the data of logs and
   tables in one batch.
3. Scalar features. Once the condensed file is described and a reader looks one of them up,
   the values of the scalar features it serves are made in the background, when all together
   they are at most `SCALARS_PREFETCH` bytes (`warm_together`) — not for resources opened
   ahead of readers; the first read of a scalar feature fetches a condensed file of up to
   `CONDENSED_PREFETCH` bytes whole, in the background (`condensed_whole_on_first_read`).
4. Event data. Before a feature's chunks are first listed (h5py walks their index, a
   B-tree, one node after another: a miss each), its index is fetched a level of the tree
   at a time (`hdf5.chunkindex`). The chunks holding a slice are fetched in parallel before
   decoding, kept in memory only, and dropped once decoded (except the first and last,
   which may hold events of the next slice); the decoded values are kept, on disk too, in
   blocks of about `DECODED_BLOCK` that hold whole chunks (`decoded_block`): a block of
   1 MiB of images in chunks of 52 events (1,040,000 bytes) straddled two chunks almost
   always, so a random event fetched and decoded two (200 random images of 100,000 events:
   285 MB fetched where the chunks holding them are 121 MB).
5. Read-ahead per open file. A reader whose reads continue where the last one ended (within
   `BACK` behind or `FORWARD` ahead: the kernel's own read-ahead arrives out of order) is a
   stream once it has read `STREAM` bytes in sequence. Windows of `WINDOW_INITIAL` bytes,
   growing with what was read up to `WINDOW_CAP` (at most a quarter of the budget), are made
   up to `WINDOWS_AHEAD` windows ahead; all windows of all files share the budget
   `MemoryPlan.prefetch` (a share of `--memory-limit`, `cache.budget`). A jump elsewhere
   ends the stream; a failed window is not used (prefetch never changes what a read returns).
   Through FUSE, the made bytes of a stream from `PUSH_GAP` to `PUSH_AHEAD` beyond its last
   request are pushed into the kernel's page cache (`fs.pagepush`), so that the reader finds
   them there without a request per 128 KiB; windows are then made ahead of what was pushed.
   A file of at most `SMALL_FILE` bytes is made whole at its handle's first read (one window):
   `numpy.load` of a scalar feature's file reads it all, in the kernel's 128 KiB requests,
   each otherwise a trip to a worker thread and a read of the disk tier of its own (100,000
   events: ~4 ms per file warm, where a trivial pyfuse3 filesystem takes 1.5 ms). Any file
   that small is (a passthrough resource, a small resource's synthesized `.rtdc`): a 4 KiB
   sniff of one fetches or makes up to 2 MiB. Such windows hold at most a quarter of the
   read-ahead budget together, are given back once the file was read to its end, and if
   making one fails, the read is served alone (a byte not asked for never fails a read).
6. Listing a dataset opens its RT-DC resources in the background, side by side, so `ls -lR`
   finds them ready (not an `--s3-only` circle: its resources are unrelated and may be many),
   and starts building the structure of each one's synthesized `.rtdc` once it is opened,
   in a pool of its own that a reader's build never waits behind (any listing of a resource
   directory shows that file's size, so waits for it): not for a resource with a contour
   (`prebuild_synthesized`), whose build first reads the number of points of every event
   (about as much as its contour region) and makes a dataset per event, work left to
   whoever looks at that resource.
7. The disk tier. A short read of a block that is on disk but not in memory reads only the
   pages of it the read needs (`cache.slots`) when blocks are at least `DISK_PARTS_FROM`
   bytes (decoded values: an mmap reader's page fault wants ~128 KiB of a 1 MiB block), and
   keeps nothing in memory (the kernel keeps what it was served); smaller blocks (remote
   objects, where HDF5 reads a block's structure piece by piece) are read whole and kept.
   A read whose bytes are all in memory or in the disk cache is served on the FUSE thread
   itself (a read of a local file, no worker thread: 200 random images warm, 20,000 events,
   0.130–0.168 s against 0.181–0.228 s), unless such a read took longer than
   `DISK_INLINE_SLOW`: then for `DISK_INLINE_PAUSE` seconds they go to worker threads, as
   reads that wait for the network do (a slow or remote cache disk, or other threads keeping
   the GIL between the read's system calls, then holds up the mount's other requests once,
   not at every read).
   Blocks of at least `DISK_DIRECT_FROM` bytes (decoded values, the bulk of a stream) are
   written past the page cache (O_DIRECT, where the cache is on a local disk's filesystem
   that takes it; not tmpfs, nor a network filesystem): a cold
   stream of 2 GB otherwise also filled 2 GB of page cache with the cache files' pages,
   pushing out what the machine had cached, and on this VM writing into pages it had not
   touched yet ran at ~0.4 GB/s (`image.npy` of 100,000 events cold: 8.4–9.5 s against
   10.8–11.1 s; doc/ARCHITECTURE.md, "Speed"). Smaller blocks (the remote objects' blocks
   of `--block-size`, 64 KiB by default; small features) stay in the page cache, where warm
   reads find them. Consecutive blocks of one object that a read (a window) does not find in
   memory are read from their file together, up to `DISK_RUN` bytes a run
   (`slots.read_run`: their entries in one read, the slots of each stretch of stored blocks
   in one more), runs side by side in the cache's pool (the first on the reading thread),
   instead of a read (and a thread's turn, and the GIL's) per block: on this VM's disk one
   reader of large sequential reads is also the fastest (1.8–2.3 GB/s, against 0.9–2.0
   GB/s for four threads reading 1 MiB each), and re-reading `image.npy` of 20,000 events
   from the disk cache went from 0.56–0.91 GB/s (median 0.66) to 0.65–0.95 GB/s (0.81),
   six alternated pairs of two re-reads.
"""

from __future__ import annotations

# 1. opening an .rtdc object
HEAD = 256 << 10  # first bytes of every RT-DC object fetched on open (HDF5 metadata)
TAIL = 1 << 20  # last bytes too: writers that grow a file leave object headers at its end
# objects up to this size are fetched whole on open: uploaded files (mostly event data) …
WHOLE = {"resource": 1 << 20, "condensed": 4 << 20}  # … and condensed ones (all scalars)
CONDENSED_WHOLE_ON_OPEN = 16 << 20  # condensed files up to this: whole before HDF5 reads them

# 2. object headers, level by level (parents first)
STRUCTURE = (("/",), ("events", "logs", "tables"), ("events/trace",))
HEADER_GUESS = 4096  # bytes fetched at an object header's address (the block around it, really)

# 3. scalar features
CONDENSED_PREFETCH = 64 << 20  # condensed files up to this size: fetched whole on first read
SCALARS_PREFETCH = 8 << 20  # all scalar values of a resource, up to this size: warmed together

# 4. event data
DECODED_BLOCK = 1 << 20  # blocks of decoded feature values: large, they are read in streams
CHUNK_ALIGNED_UP_TO = 4 << 20  # decoded chunks up to this size make blocks of whole chunks

# 5. read-ahead per open file
STREAM = 512 << 10  # read-ahead starts after this many bytes read in sequence (4 kernel reads)
BACK = 1 << 20  # a read this far behind the stream's end still continues it
FORWARD = 16 << 20  # ... and this far ahead
WINDOW_INITIAL = 1 << 20  # the first window; then as large as what was read so far …
WINDOW_CAP = 16 << 20  # … up to this (and a quarter of the budget)
WINDOWS_AHEAD = 2  # windows made ahead of the reader
PUSH_GAP = 4 << 20  # made windows this far beyond a FUSE stream's last request: pushed …
PUSH_AHEAD = 32 << 20  # … into the kernel's page cache, up to this far beyond it
SMALL_FILE = 2 << 20  # files up to this size: made whole at their first read

# 7. the disk tier
DISK_PARTS_FROM = 512 << 10  # blocks this large are read from disk in parts by short reads
DISK_DIRECT_FROM = 512 << 10  # blocks this large are written past the page cache (O_DIRECT)
DISK_RUN = 16 << 20  # consecutive blocks of one object read from disk in one read, up to this
DISK_INLINE_SLOW = 0.010  # a read from the disk cache on the FUSE thread slower than this …
DISK_INLINE_PAUSE = 60.0  # … sends such reads to worker threads for this many seconds


def decoded_block(chunk_bytes: int) -> int:
    """The block size of a feature's decoded values stored in chunks of `chunk_bytes` decoded
    bytes (0: not chunked, or not known): the whole number of chunks nearest `DECODED_BLOCK`
    (at least one, and then between half and one and a half of it), so that every block is
    made from its own chunks; `DECODED_BLOCK` for chunks larger than `CHUNK_ALIGNED_UP_TO`."""
    if chunk_bytes <= 0 or chunk_bytes > CHUNK_ALIGNED_UP_TO:
        return DECODED_BLOCK
    return chunk_bytes * max(1, round(DECODED_BLOCK / chunk_bytes))


def metadata_ranges(size: int, whole: int) -> list[tuple[int, int]]:
    """The byte ranges fetched before HDF5 opens an object of `size` bytes: all of it when it
    is at most `whole` bytes, else its head and tail."""
    if size <= whole:
        return [(0, size)]
    return [(0, HEAD), (max(HEAD, size - TAIL), size)]


def structure_ranges(kind: str, size: int) -> list[tuple[int, int]]:
    """The byte ranges of a `kind` object fetched before HDF5 opens it (`metadata_ranges`)."""
    whole = CONDENSED_WHOLE_ON_OPEN if kind == "condensed" else whole_size(kind)
    return metadata_ranges(size, whole)


def original_after_condensed(size: int | None) -> bool:
    """Whether an original of `size` bytes (None: unknown) is described after its condensed
    file: one too large to be fetched whole."""
    return size is None or size > whole_size("resource")


def whole_size(kind: str) -> int:
    """Objects of `kind` ("resource", "condensed") up to this size are fetched whole on open."""
    return WHOLE.get(kind, WHOLE["resource"])


def condensed_whole_on_first_read(kind: str, size: int) -> bool:
    """Whether the first read of a scalar feature fetches this object whole (background)."""
    return kind == "condensed" and size <= CONDENSED_PREFETCH


def prebuild_synthesized(contour: bool) -> bool:
    """Whether a listed dataset's resource, once opened ahead of readers, has the structure
    of its synthesized `.rtdc` built too (6.): not when it has a contour."""
    return not contour


def warm_together(total: int) -> bool:
    """Whether values of `total` bytes (a resource's scalar features) are made ahead."""
    return total <= SCALARS_PREFETCH
