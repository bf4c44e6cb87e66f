"""File contents of the tree: feature arrays (.npy), features.tsv and .fcs, TIFF stacks, text
views, passthrough."""
