"""File contents of the tree: feature arrays (.npy), features.tsv, text views, passthrough."""
