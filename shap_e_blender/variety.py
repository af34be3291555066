"""The panel's line after new objects were added (no bpy): how many, and whether seeds repeated an object
(``engine.variety``), with what to change."""

from __future__ import annotations


def message(added: int, alike: int, *, variations: bool, hint: str) -> str:
    """``alike`` of the ``added`` objects repeat an object already there; ``hint`` is the engine's advice."""
    text = f"Added {added} object(s)"
    if alike:
        what = "the selected object or another new one" if variations else "another new one"
        text += f"; {alike} of them are the same object as {what}: {hint}"
    return text
