"""How a picture frames its object, against the framing the embedded model learnt from.

The mini model's CLIP and image prior only ever saw renders of one object, centred, on a plain light background,
spanning 34-88 % of the picture (the larger side of its bounding box, smallest and largest over 1,152 renders of
all 288 kinds; 44-72 % for nine in ten). It reads the object's size in the frame as part of its shape: the held-out image prompts of the
evaluation padded with white to 1.5x their size come back with the right shape 7 % of the time instead of 81 %,
cropped to 0.8x 14 %. ``framing_advice`` measures a picture the way the CLIP transform will see it (centre square
crop) and says what to change when it is far from that framing; the pipeline logs it as a warning.
"""

from __future__ import annotations

import numpy as np

TRAINING_EXTENT = (0.33, 0.90)  # the object's extent in the mini model's training renders (all of them)
MIN_BACKGROUND = 0.6  # their backgrounds are white or light grey (luminance 0.75-1)


def border_colour(img: np.ndarray) -> np.ndarray:
    """The median colour of a picture's outermost rows and columns: its plain background."""
    return np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)


def subject_framing(image, tol: int = 24, alpha_background=(1.0, 1.0, 1.0)) -> tuple[float, float] | None:
    """(extent of the object, background luminance) in the centre square crop of a picture (what the CLIP
    transform takes: an (H, W[, 3|4]) uint8 or float array, or a PIL image).

    A picture with alpha is first composited onto ``alpha_background`` as the model's transform does (the default
    is the embedded model's white). The background is the median colour of the crop's border; the object is every
    pixel that differs from it by more than ``tol`` in some channel, and its extent is the larger side of its
    bounding box over the crop's side. None when no such pixel exists.
    """
    from .clip import flatten_alpha

    img = np.asarray(flatten_alpha(image, alpha_background).convert("RGB"))
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[top:top + side, left:left + side].astype(np.float32)
    background = border_colour(crop)
    mask = np.abs(crop - background).max(-1) > tol
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / side
    return float(extent), float(background.mean() / 255)


def reframe(image, scale: float, background=None) -> np.ndarray:
    """The picture (H, W, C) with its canvas scaled by ``scale`` about the centre, so that the object spans 1/scale
    of what it did: > 1 pads with ``background`` (default: the median colour of the picture's border), < 1 crops.
    No resampling: the CLIP transform resizes whatever it is given."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    H, W = max(1, round(h * scale)), max(1, round(w * scale))
    if scale < 1:
        top, left = (h - H) // 2, (w - W) // 2
        return img[top:top + H, left:left + W].copy()
    if background is None:
        background = border_colour(img)
    out = np.empty((H, W) + img.shape[2:], img.dtype)
    out[...] = np.asarray(background, dtype=np.float64).astype(img.dtype)
    top, left = (H - h) // 2, (W - w) // 2
    out[top:top + h, left:left + w] = img
    return out


def framing_advice(image, alpha_background=(1.0, 1.0, 1.0)) -> str | None:
    """What to change so the embedded model reads the picture as it learnt to, or None when it looks right."""
    framing = subject_framing(image, alpha_background=alpha_background)
    if framing is None:
        return ("the picture shows no object on a plain background; the embedded model learnt from one object, "
                "centred on a plain light background")
    extent, background = framing
    if background < MIN_BACKGROUND:
        return (f"the picture's background is dark (luminance {background:.2f}); the embedded model learnt from "
                "objects on a plain light background and may read this one as another shape")
    lo, hi = TRAINING_EXTENT
    if not lo <= extent <= hi:
        what = "pad the picture with background" if extent > hi else "crop the picture closer to the object"
        return (f"the object spans {100 * extent:.0f} % of the picture; the embedded model learnt from pictures where "
                f"it spans {100 * lo:.0f}-{100 * hi:.0f} % and reads its size as part of its shape: {what}")
    return None
