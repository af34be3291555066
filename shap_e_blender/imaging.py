"""Blender image pixels -> the engine's image input (top-down sRGB uint8), and the sRGB transfer functions.

Blender's ``Image.pixels`` is a flat float RGBA buffer with rows bottom-up. Byte images hold their stored
(colour-space encoded, usually sRGB) values / 255; float images (EXR, HDR, renders) hold scene-linear values.
The engine (like the official CLIP preprocessing) expects sRGB-encoded pictures, so linear buffers are encoded
with the sRGB OETF (IEC 61966-2-1). Pure numpy: no bpy here, so it is unit-tested outside Blender.
"""

from __future__ import annotations

import numpy as np


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, np.power((x + 0.055) / 1.055, 2.4))


def pixels_to_srgb_uint8(pixels, width: int, height: int, channels: int = 4, *, linear: bool,
                         premultiplied: bool = False) -> np.ndarray:
    """Flat Blender pixel buffer (bottom-up rows) -> (H, W, C) uint8 top-down sRGB, C = channels (3 or 4).

    ``linear``: the buffer holds scene-linear values (float images) and must be sRGB-encoded; alpha never is.
    ``premultiplied``: the colours are multiplied by alpha (Blender's float buffers); they are divided back, so the
    result has straight alpha, as PNG stores it and as the engine composites it.
    """
    arr = np.asarray(pixels, dtype=np.float32)
    if arr.size != width * height * channels:
        raise ValueError(f"pixel buffer has {arr.size} values, expected {width}x{height}x{channels}")
    img = arr.reshape(height, width, channels)[::-1]  # (H, W, C), top row first
    rgb = img[..., :3]
    if premultiplied and channels == 4:
        a = img[..., 3:4]
        rgb = np.where(a > 0, rgb / np.maximum(a, 1e-6), 0.0)
    if linear:
        rgb = linear_to_srgb(rgb)
    out = np.empty((height, width, channels), dtype=np.uint8)
    out[..., :3] = np.round(np.clip(rgb, 0.0, 1.0) * 255.0)
    if channels == 4:
        out[..., 3] = np.round(np.clip(img[..., 3], 0.0, 1.0) * 255.0)
    return out


def preview_to_rgba_float(preview: np.ndarray) -> np.ndarray:
    """(H, W, 3|4) uint8 top-down -> flat float RGBA bottom-up, what ImagePreview/Image pixel buffers take."""
    img = np.asarray(preview)
    h, w = img.shape[:2]
    rgba = np.ones((h, w, 4), dtype=np.float32)
    rgba[..., : min(3, img.shape[2])] = img[..., :3].astype(np.float32) / 255.0
    return rgba[::-1].reshape(-1)
