#!/usr/bin/env bash
# The two entry points of the README. Both set everything up on a fresh clone (virtual environment in .venv).
#   bash run.sh demo   generate objects with the embedded model in headless Blender -> out/demo.blend, out/demo.png, out/*.glb
#   bash run.sh test   run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  demo)
    bash scripts/setup_env.sh test,blender
    .venv/bin/python -m shap_e_blender.demo --out out "${@:2}"
    ;;
  test)
    bash scripts/setup_env.sh test,blender
    .venv/bin/python -m pytest tests "${@:2}"
    ;;
  *)
    echo "usage: bash run.sh demo|test" >&2; exit 2 ;;
esac
