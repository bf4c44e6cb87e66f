"""The files of a cache dir, named in one place (mount, stores, `cache` and `warmup` use them).

blocks/          block files (diskstore)
index.sqlite3    block accounting (diskstore)
lock             held shared by each mount's store, exclusively by `cache clear`
meta.sqlite3     remembered API answers and synthesized-file structures (metastore)
warmup.journal   files finished by an interrupted `dcorfs warmup`
dcorfs.log       the daemon's log (unless --log-file)
"""

from __future__ import annotations

BLOCKS = "blocks"
INDEX = "index.sqlite3"
LOCK = "lock"
META = "meta.sqlite3"
JOURNAL = "warmup.journal"
LOG = "dcorfs.log"
