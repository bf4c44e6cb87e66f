"""Unit tests: one module or a few, no server, no FUSE (fakes only at the transport boundary)."""
