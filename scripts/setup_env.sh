#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the given extras.
# Usage: scripts/setup_env.sh [extras]   e.g. "test,blender"
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,blender}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${extras//,/_}"
if [ -f "$stamp" ]; then
  exit 0
fi
# A first install takes about 7 GB (torch's CUDA build, which also runs on the CPU, plus bpy): check before
# starting, so that a full disk gives a clear message instead of a half-installed environment.
if ! compgen -G ".venv/lib/python3*/site-packages/torch" >/dev/null; then
  free_mb=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1024 ))
  if [ "$free_mb" -lt 8192 ]; then
    echo "[setup] only ${free_mb} MB free on the disk of $(pwd); the first install needs about 8 GB." >&2
    echo "[setup] free some space (or clone the repository onto another disk) and run the command again." >&2
    exit 1
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating virtual environment in .venv"
  "$py" -m venv .venv
fi
echo "[setup] installing dependencies (first run only; a few minutes)"
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# torch 2.14.1 + torchvision 0.29.1 are the pair that imports cleanly together (open_clip needs torchvision).
.venv/bin/python -m pip install -q --no-cache-dir "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q --no-cache-dir -e ".[${extras}]"
touch "$stamp"
