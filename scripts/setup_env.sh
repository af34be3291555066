#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the given extras.
# Usage: scripts/setup_env.sh [extras]   e.g. "test,blender"
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,blender}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${extras//,/_}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating virtual environment in .venv"
  "$py" -m venv .venv
fi
if [ ! -f "$stamp" ]; then
  echo "[setup] installing dependencies (first run only; a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
  # torch 2.14.1 + torchvision 0.29.1 are the pair that imports cleanly together (open_clip needs torchvision).
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[${extras}]"
  touch "$stamp"
fi
