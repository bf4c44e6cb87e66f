#!/usr/bin/env bash
# Prepare a Debian/Ubuntu machine for dcorfs: the system packages it needs (FUSE 3, the
# compiler bits pyfuse3 builds with, HDF5 command-line tools) and a virtualenv in .venv with
# dcorfs installed in editable mode with the extras given as $1 (default: test).
# Safe to re-run: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-test}

need=(fuse3 libfuse3-dev pkg-config gcc make hdf5-tools)
# systemd-analyze verifies the units in systemd/; R reads features.tsv in the tests; ImageJ
# (headless, under xvfb-run) and libtiff's tiffinfo read the TIFF stacks
[ "$extras" = test ] && need+=(systemd r-base-core r-cran-hdf5r imagej xvfb libtiff-tools rclone davfs2)
py=${PYTHON:-python3}
command -v "$py" >/dev/null || need+=(python3)
"$py" -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
"$py" -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
  2>/dev/null || need+=(python3-dev)

missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing system packages: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$py" -m venv .venv
fi
stamp=.venv/.installed-$extras
if [ ! -e "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  echo "bootstrap: installing dcorfs[$extras] into .venv (first time: a few minutes)" >&2
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[$extras]"
  touch "$stamp"
fi
