"""The daemon layer: checks before mounting, the wiring, and the running mount's loop.

`mount` is the composition root: it checks the mount point and settings, daemonizes, wires
http → DCOR client → caches → opening → tree → FUSE and runs the trio loop with systemd's
notify protocol (`notify`); `logs` configures logging (the token never logged); `tuning`
sets root-only kernel knobs of one mount; `report` renders the status report that `status`,
`warmup` and the log use.

Imports: every layer below. Pools and threads of a running mount: doc/ARCHITECTURE.md.
"""
