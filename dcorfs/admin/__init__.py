"""The admin layer: commands that act on a mount or a cache directory from outside.

`status` reads a running mount's status report; `warmup` reads files once so their bytes are
cached, with progress; `cache_admin` shows what a cache directory holds per resource and
empties it safely; `unmount` unmounts (lazily when the daemon is gone); `demo` serves freshly
generated sample data with the devserver and mounts it, offline.

Imports: every layer below, and the devserver (for the demo).
"""
