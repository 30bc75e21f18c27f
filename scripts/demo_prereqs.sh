#!/usr/bin/env bash
# What `make demo` needs beyond pip, installed when missing: Python >= 3.10 with venv, and the
# Fashion-MNIST files (Debian package dataset-fashion-mnist). Installs with apt-get as root or through
# passwordless sudo; otherwise prints the one command to run and exits 1. Both commands below need only
# Debian's package registry.
#   DRY_RUN=1            print what would be installed instead of installing it (tests, the curious)
#   PYTHON=python3       the interpreter the venv is made from
#   FASHION_MNIST_DIR    where the idx files are expected (default: where the Debian package puts them)
set -euo pipefail
PYTHON=${PYTHON:-python3}
FASHION_MNIST_DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

say() { echo "demo_prereqs: $*"; }

command -v "$PYTHON" >/dev/null || { say "$PYTHON not found: install Python >= 3.10 (apt-get install python3) or run make demo PYTHON=/path/to/python3"; exit 1; }
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { say "$PYTHON is $("$PYTHON" -V 2>&1); ssl-lightning needs Python >= 3.10: run make demo PYTHON=python3.11 (or newer)"; exit 1; }

need=()
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need+=("python3-venv")
for f in $FILES; do
  [ -f "$FASHION_MNIST_DIR/$f" ] || { need+=("dataset-fashion-mnist"); break; }
done
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
  say "missing ${need[*]} and this is not a Debian/Ubuntu system (no apt-get)."
  say "Put the four Fashion-MNIST idx .gz files ($FILES) in a folder and run: make demo FASHION_MNIST_DIR=<that folder>"
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  as=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as=(sudo -n)
else
  say "missing ${need[*]}; installing it needs root. Run this once, then make demo again:"
  echo "sudo apt-get install -y ${need[*]}"
  exit 1
fi
say "installing ${need[*]} (Debian packages, ~31 MB for the dataset)"
if [ -n "${DRY_RUN:-}" ]; then
  echo "would run: ${as[*]:+${as[*]} }apt-get install -y ${need[*]}"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
"${as[@]}" apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
  || { "${as[@]}" apt-get update -qq && "${as[@]}" apt-get install -y -qq "${need[@]}" >/dev/null; }
say "installed ${need[*]}"
