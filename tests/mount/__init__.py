"""Real FUSE mounts of the devserver, read by real programs (numpy, h5py, dclab, pandas, polars, R,
h5dump, the shell).
"""
