"""Scene.shap_e: every setting the panel shows (SHAP_E_PG_settings). Runtime job state lives in session.py.

The model list is a dynamic enum filled from ``engine.available_models()`` on first draw (never at register
time: that would import the engine). 'mini' is always first, so the enum's default index is the embedded model.
"""

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

GRID_ITEMS = [("64", "64", "Fast, coarse (about 1 s with mini on a CPU)"),
              ("128", "128", "Detailed"),
              ("256", "256", "Very detailed; slow on a CPU")]
FALLBACK_MODELS = (("mini", "both", True, "embedded model: simple coloured primitives"),
                   ("text300M", "text", False, "official Shap-E text-conditional model"),
                   ("image300M", "image", False, "official Shap-E image-conditional model"))

_model_items: list[tuple[str, str, str]] = []  # Blender keeps pointers into these strings: keep them alive


def model_infos(refresh: bool = False):
    """(name, kind, present, description) of every model; falls back to a static list if the engine is absent."""
    global _infos_cache
    if refresh or _infos_cache is None:
        try:
            from .engine_shim import get_engine

            _infos_cache = [(m.name, m.kind, bool(m.present), m.description)
                            for m in get_engine().available_models()]
        except Exception:  # engine not importable yet: the panel still draws, generation reports why
            _infos_cache = list(FALLBACK_MODELS)
    return _infos_cache


_infos_cache = None


def _models_enum(self, context):
    _model_items.clear()
    for name, kind, present, desc in model_infos():
        label = name if present else f"{name} (not downloaded)"
        _model_items.append((name, label, f"{desc} [{kind}]"))
    return _model_items


class SHAP_E_PG_settings(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description="What to generate, e.g. 'a red cube'", default="")
    input_mode: EnumProperty(name="Input", items=[("TEXT", "Text", "Generate from the prompt"),
                                                  ("IMAGE", "Image", "Generate from a picture")], default="TEXT")
    image_source: EnumProperty(
        name="Image from",
        items=[("EDITOR", "Image Editor", "The image shown in the active Image Editor"),
               ("DATABLOCK", "Image", "An image datablock picked here"),
               ("FILE", "File", "An image file on disk")], default="EDITOR")
    image: PointerProperty(name="Image", type=bpy.types.Image)
    image_path: StringProperty(name="Image File", subtype="FILE_PATH", default="")
    model: EnumProperty(name="Model", items=_models_enum, description="Which Shap-E model to use")
    random_seed: BoolProperty(name="Random Seed", default=True,
                              description="Draw a new seed each time (the seed used is shown and reusable)")
    seed: IntProperty(name="Seed", default=0, min=0, max=2**31 - 1)
    last_seed: IntProperty(name="Last Seed", default=-1, description="The seed of the last generation")
    use_model_defaults: BoolProperty(name="Model Defaults", default=True,
                                     description="Use the model's own steps and guidance scale")
    steps: IntProperty(name="Steps", default=64, min=1, max=1024, description="Sampler steps (official: 64)")
    guidance_scale: FloatProperty(name="Guidance", default=15.0, min=0.0, soft_max=30.0,
                                  description="Classifier-free guidance (official: 15 text, 3 image; embedded: 1 text, 1.25 image)")
    grid_size: EnumProperty(name="Grid", items=GRID_ITEMS, default="64", description="Marching cubes resolution")
    count: IntProperty(name="Count", default=1, min=1, max=16,
                       description="How many variants (seeds seed, seed+1, ...) laid out in a grid at the cursor")
    sampler: EnumProperty(name="Sampler", items=[("heun", "Heun", "Official sampler (2 network calls/step)"),
                                                 ("euler", "Euler", "1 network call per step"),
                                                 ("dpmpp_2m", "DPM++ 2M", "1 call per step, fewer steps")],
                          default="heun")
    spacing: FloatProperty(name="Spacing", default=2.0, min=0.5, soft_max=10.0, subtype="DISTANCE",
                           description="Distance between variants")
    redecode_grid_size: EnumProperty(name="Re-decode Grid", items=GRID_ITEMS, default="128")
    show_preview: BoolProperty(name="Preview", default=True, description="Show a coarse preview while sampling")


classes = (SHAP_E_PG_settings,)
_register, _unregister = bpy.utils.register_classes_factory(classes)


def register():
    _register()
    bpy.types.Scene.shap_e = PointerProperty(type=SHAP_E_PG_settings)


def unregister():
    del bpy.types.Scene.shap_e
    _unregister()
