"""Panel settings -> engine.GenerationRequest: the single bpy -> engine mapping, and where input errors surface.

Everything the user can get wrong (empty prompt, no image, an unreadable file, an unknown or absent model, a
model of the wrong kind) is caught here, on the main thread, before any job starts, as an EngineError with a hint
that names the control to change. Nothing is created in the .blend while checking (a file loaded only to read its
pixels is removed again).
"""

from __future__ import annotations

import dataclasses
import os
import random

import bpy

from .engine_shim import get_engine
from .imaging import pixels_to_srgb_uint8
from .properties import model_infos


def _error(message: str, hint: str):
    return get_engine().EngineError(message, hint)


def check_model(name: str, mode: str, *, presence: bool = True) -> None:
    """Known name and the right kind for ``mode``; with ``presence`` also that its weights are installed."""
    infos = {n: (kind, present) for n, kind, present, _ in model_infos()}
    if name not in infos:
        raise _error(f"Unknown model '{name}'", f"Choose one of: {', '.join(infos)}")
    kind, present = infos[name]
    if kind not in ("both", mode):
        other = "an image" if kind == "image" else "a text prompt"
        raise _error(f"Model '{name}' takes {other}, not {'a prompt' if mode == 'text' else 'an image'}",
                     f"Switch Input to {'Image' if kind == 'image' else 'Text'}, or pick another model")
    if not presence:
        return
    if not present and name == "mini":
        raise _error("The embedded 'mini' model's weights are missing from this installation",
                     "Reinstall the extension (the zip ships them in engine/weights/mini)")
    if not present:
        raise _error(f"Model '{name}' is not downloaded",
                     "Edit > Preferences > Add-ons > Shap-E > Download official models, or use 'mini'")


def _editor_image(context):
    space = getattr(context, "space_data", None)
    if space is not None and space.type == "IMAGE_EDITOR" and space.image is not None:
        return space.image
    screen = getattr(context, "screen", None)
    for area in (screen.areas if screen else []):
        if area.type == "IMAGE_EDITOR" and area.spaces.active.image is not None:
            return area.spaces.active.image
    return None


def image_array(img):
    """A Blender image's pixels as the engine's input: (H, W, 3|4) uint8, top-down, sRGB."""
    if img.type in ("RENDER_RESULT", "COMPOSITING"):
        raise _error(f"'{img.name}' is a render result, whose pixels Python cannot read",
                     "Image > Save As, then pick the saved image")
    w, h = img.size
    channels = img.channels
    if w == 0 or h == 0 or channels == 0:
        raise _error(f"Image '{img.name}' has no pixels (missing or unreadable file?)",
                     "Reload the image or choose another one")
    import numpy as np

    buf = np.empty(w * h * channels, dtype=np.float32)
    img.pixels.foreach_get(buf)
    cs = img.colorspace_settings
    linear = not cs.is_data and (img.is_float or cs.name.lower().startswith("linear"))
    if channels < 3:  # grey (+ alpha): repeat the grey value into RGB
        grey = buf.reshape(-1, channels)
        rgba = np.ones((grey.shape[0], 4), dtype=np.float32)
        rgba[:, :3] = grey[:, :1]
        if channels == 2:
            rgba[:, 3] = grey[:, 1]
        buf, channels = rgba.reshape(-1), 4
    # Float buffers hold premultiplied colour; an alpha channel that is not transparency is left out.
    out = pixels_to_srgb_uint8(buf, w, h, channels, linear=linear, premultiplied=img.is_float)
    return out[..., :3] if channels == 4 and img.alpha_mode in ("CHANNEL_PACKED", "NONE") else out


def file_image(path: str):
    path = bpy.path.abspath(path)
    if not path:
        raise _error("No image file chosen", "Pick a file in 'Image File', or set 'Image from' to Image Editor")
    if not os.path.isfile(path):
        raise _error(f"Image file not found: {path}", "Check the path in 'Image File'")
    before = set(bpy.data.images)
    try:
        img = bpy.data.images.load(path, check_existing=True)
    except RuntimeError as err:
        raise _error(f"'{os.path.basename(path)}' is not an image Blender can read ({err})",
                     "Choose a PNG, JPEG, WebP, TIFF or EXR file") from None
    created = img not in before
    try:
        return image_array(img), os.path.basename(path)
    except Exception:
        raise _error(f"'{os.path.basename(path)}' is not an image Blender can read",
                     "Choose a PNG, JPEG, WebP, TIFF or EXR file") from None
    finally:
        if created:
            bpy.data.images.remove(img)  # reading a file must leave the .blend unchanged


def source_image(context, settings):
    """(array, name) of the image the settings point at."""
    if settings.image_source == "FILE":
        return file_image(settings.image_path)
    if settings.image_source == "DATABLOCK":
        img = settings.image
        if img is None:
            raise _error("No image selected", "Pick an image in the Shap-E panel, or set 'Image from' to File")
    else:
        img = _editor_image(context)
        if img is None:
            raise _error("No image is shown in an Image Editor",
                         "Open the picture in an Image Editor, or set 'Image from' to Image or File")
    return image_array(img), img.name


def build_request(context, settings, prefs, *, prompt: str | None = None, model: str | None = None,
                  seed: int | None = None, count: int | None = None, image=None, image_name: str | None = None,
                  like: dict | None = None):
    """The GenerationRequest for the current settings (overrides for scripting and Variations).

    ``like``: metadata of a generated object (Variations): its steps, guidance, sampler and grid size win over
    the panel's, and the seed is always new.
    """
    eng = get_engine()
    model = model or settings.model
    mode = "image" if (image is not None or (prompt is None and settings.input_mode == "IMAGE")) else "text"
    check_model(model, mode, presence=False)  # input errors first, missing weights last
    if mode == "text":
        text = (settings.prompt if prompt is None else prompt).strip()
        if not text:
            raise _error("The prompt is empty", "Type what to generate, e.g. 'a red cube', or switch Input to Image")
    else:
        text = None
        if image is None:
            image, image_name = source_image(context, settings)
    check_model(model, mode)
    if seed is None:
        seed = random.randrange(2**31) if (settings.random_seed or like) else settings.seed
    like = like or {}
    kwargs = dict(
        prompt=text, image=image, image_name=image_name, model=model, seed=int(seed),
        steps=like.get("steps", None if settings.use_model_defaults else settings.steps),
        guidance_scale=like.get("guidance", None if settings.use_model_defaults else settings.guidance_scale),
        sampler=like.get("sampler", settings.sampler), grid_size=int(like.get("grid_size", settings.grid_size)),
        batch_size=int(count or settings.count),
        device=prefs.device, precision=prefs.precision,
    )
    names = {f.name for f in dataclasses.fields(eng.GenerationRequest)}
    if "preview_every" in names and settings.show_preview:
        kwargs["preview_every"] = 4
    return eng.GenerationRequest(**{k: v for k, v in kwargs.items() if k in names})
