"""The HDF5 layer: reading remote RT-DC files through the cache, and building HDF5 locally.

`rtdc` opens a remote `.rtdc` file through a file object over the block cache and reads event
slices (decoded once into derived objects); `chunks` decodes event data without h5py (off
its global lock and the GIL: Zstd, deflate, shuffle, fletcher32); `structure` reads what a
file holds besides event data (features, attributes, logs, tables) with h5py's low-level API
and `h5attrs`;
`featurerule` is dclab's rule for which features a resource shows and with how many events;
`contour` reads the contour group (one dataset per event) as points and offsets;
`upstream` reads intra-dataset basins; `skeleton` builds the structure of the synthesized
file with libhdf5 itself, event data left to be filled lazily; `fileobj` is the seekable base
of the file objects h5py reads through.

Imports: the shared base and the cache layer. h5py's global lock: see doc/ARCHITECTURE.md.
"""
