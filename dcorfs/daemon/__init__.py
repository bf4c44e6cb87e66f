"""The daemon layer: checks before mounting, the wiring, the running mount's loop, the share.

`preflight` checks what can be found wrong while the user waits (mount point, cache dir, the
host or S3 endpoint, the token); `mount` forks the daemon and waits until it is up or failed;
`loop` runs it: builds the layers (`wiring`, the composition root: every layer from
`MountSettings`, bottom up), mounts, answers FUSE on one trio thread and keeps systemd informed
with its notify protocol (`notify`); `logs` configures logging (the token never logged);
`tuning` sets root-only kernel knobs of one mount; `memory` bounds glibc's malloc arenas;
`report` renders the status report that `status`, `warmup` and the log use; `webdav` serves
the same tree (`wiring.build_front`) as a read-only WebDAV share on cheroot instead of mounting.

Imports: every layer below. Pools and threads of a running mount: doc/ARCHITECTURE.md.
"""
