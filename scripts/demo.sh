#!/usr/bin/env bash
# Offline demo: a devserver with generated sample data on loopback, mounted with dcorfs.
# Ctrl-C unmounts and stops the server. Run through `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
MNT=${DEMO_MOUNT:-/tmp/dcorfs-demo}
WORK=$(mktemp -d /tmp/dcorfs-demo-state.XXXXXX)
mkdir -p "$MNT"
.venv/bin/dcorfs devserver --data "$WORK/data" --sample-data --port 0 >"$WORK/url" 2>"$WORK/devserver.log" &
SERVER=$!
cleanup() {
    .venv/bin/dcorfs umount "$MNT" 2>/dev/null || true
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
echo "generating sample data and starting the devserver (about a minute the first time) …"
for _ in $(seq 600); do
    [ -s "$WORK/url" ] && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/devserver.log" >&2; exit 1; }
    sleep 0.5
done
URL=$(head -n1 "$WORK/url")
.venv/bin/dcorfs mount "$MNT" --host "$URL" --cache-dir "$WORK/cache"
cat <<TEXT

DCOR sample data from $URL is mounted at $MNT. Try, in another shell:

  ls $MNT/datasets
  ls -l $MNT/datasets/*/M001_data
  head -n 3 $MNT/datasets/*/M001_data/features.tsv
  .venv/bin/python -c "import numpy as np, glob; print(np.load(glob.glob('$MNT/datasets/*/M001_data/deform.npy')[0])[:5])"

Press Ctrl-C here to unmount and stop.
TEXT
wait "$SERVER"
