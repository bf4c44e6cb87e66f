"""The filesystem layer: the tree a user sees, file contents, and its two front ends.

`tree` is the namespace (datasets, circles, collections, by-id, resource directories) with
lazy, refreshed listings; `s3tree` the namespace of `--s3-only` mounts; `names` makes safe,
unique file names; `content` says what a file holds (a size known up front, reads of any byte
range) and `producers/` makes each kind of file (`.npy`, `features.tsv`, `features.fcs`, TIFF
stacks, the synthesized `.rtdc`, text views, passthrough bytes); `readahead` prefetches for
sequential readers; `fuse_ops` is the thin kernel-facing adapter (inodes, handles, errno only
here), `dav` the read-only WebDAV provider over the same tree (HTTP statuses only there), and
`activity` their counters and recent errors.

Imports: every layer below (shared base, cache, remote, hdf5, opening). Semantics promised to
users: doc/SEMANTICS.md.
"""
