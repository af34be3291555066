"""The coarse preview thumbnail shown while sampling: an ImagePreview in a bpy.utils.previews collection.

A preview collection is not a datablock: updating it never touches the .blend, the undo stack or the scene, so
a cancelled job leaves no trace. The engine sends a small (H, W, 3) uint8 render every few steps
(StepEvent.preview); writing 64x64 floats with foreach_set costs well under a millisecond on the main thread.
"""

from __future__ import annotations

import bpy.utils.previews

from .imaging import preview_to_rgba_float

_collection = None
KEY = "shap_e_preview"


def update(image) -> None:
    if _collection is None or image is None:
        return
    pv = _collection.get(KEY) or _collection.new(KEY)
    h, w = image.shape[:2]
    pv.image_size = (w, h)
    pv.image_pixels_float.foreach_set(preview_to_rgba_float(image))


def icon_id() -> int:
    if _collection is None or KEY not in _collection:
        return 0
    return _collection[KEY].icon_id


def clear() -> None:
    if _collection is not None:
        _collection.clear()


def register():
    global _collection
    _collection = bpy.utils.previews.new()


def unregister():
    global _collection
    if _collection is not None:
        bpy.utils.previews.remove(_collection)
    _collection = None


classes = ()
