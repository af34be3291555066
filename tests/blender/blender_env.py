"""Shared facts for the bpy-wheel tests (a plain module: test files import it; conftest is not importable by name)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def mini_weights_reason() -> str | None:
    """Why the real engine cannot run (None when it can)."""
    if not (ROOT / "engine" / "pipeline.py").exists():
        return "engine/pipeline.py does not exist yet"
    if not (ROOT / "engine" / "weights" / "mini" / "mini.json").exists():
        return "the mini model's weights (engine/weights/mini) are not in the repository yet"
    return None
