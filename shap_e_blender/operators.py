"""Operators: Generate, Cancel, Variations, Re-decode, Blend, Use Last Seed, Dismiss Error.

Generate does not carry the UNDO flag: the objects arrive later (from the timer), and the undo step is pushed
then, so one click is exactly one undo step (an UNDO flag would add a second, empty step at click time).
``sync`` runs the job inside the operator (default under ``blender -b``, where no timer ever fires).
Input errors are reported with ``self.report`` *and* shown in the panel with a hint (session.report_error).
"""

import os

import bpy
from bpy.props import BoolProperty, IntProperty, StringProperty

from . import mesh_import, session
from .preferences import get_prefs


def _sync(op) -> bool:
    return op.sync if op.properties.is_property_set("sync") else bool(bpy.app.background)


def _fail(op, err) -> set[str]:
    session.report_error(err)
    op.report({"ERROR"}, f"{session.ui.error} — {session.ui.hint}")
    return {"CANCELLED"}


def _busy(op) -> bool:
    if session.runner.busy:
        op.report({"WARNING"}, "A Shap-E job is already running: wait for it or press Cancel")
        return True
    return False


def _engine_errors():
    from .engine_shim import get_engine

    return (get_engine().EngineError,)


class _JobOperator:
    """What the operators that start an engine job share: one job at a time, engine errors shown in the panel with
    their hint, and ``sync``. Subclasses implement ``start(context)``."""

    bl_options = {"REGISTER"}

    sync: BoolProperty(name="Synchronous", default=False, options={"SKIP_SAVE"},
                       description="Block until done (default when Blender runs in background mode)")

    def execute(self, context):
        if _busy(self):
            return {"CANCELLED"}
        try:
            self.start(context)
        except _engine_errors() as err:
            return _fail(self, err)
        if session.ui.error:  # a sync job that failed
            self.report({"ERROR"}, f"{session.ui.error} — {session.ui.hint}")
            return {"CANCELLED"}
        return {"FINISHED"}


class _GeneratedObjectJob(_JobOperator):
    """A job on the active object, which must be one this extension generated (it holds the latent and settings)."""

    @classmethod
    def poll(cls, context):
        return mesh_import.is_generated(context.active_object)


class SHAP_E_OT_generate(_JobOperator, bpy.types.Operator):
    """Generate 3D objects from the prompt or image (runs in the background; Cancel stops it)"""

    bl_idname = "shap_e.generate"
    bl_label = "Generate"

    prompt: StringProperty(name="Prompt", default="", options={"SKIP_SAVE"},
                           description="Override the panel's prompt (scripting)")
    model: StringProperty(name="Model", default="", options={"SKIP_SAVE"},
                          description="Override the panel's model (scripting)")

    def start(self, context):
        from . import requests

        settings = context.scene.shap_e
        req = requests.build_request(context, settings, get_prefs(context),
                                     prompt=self.prompt or None, model=self.model or None)
        from_file = req.image is not None and settings.image_source == "FILE"
        session.start_generate(req, scene=context.scene, location=context.scene.cursor.location.copy(),
                               spacing=settings.spacing, sync=_sync(self),
                               image_path=bpy.path.abspath(settings.image_path) if from_file else None)


class SHAP_E_OT_variations(_GeneratedObjectJob, bpy.types.Operator):
    """New seeds for the selected generated object (same prompt/image, model and settings), laid out beside it"""

    bl_idname = "shap_e.variations"
    bl_label = "Variations"

    count: IntProperty(name="Count", default=0, min=0, max=16, options={"SKIP_SAVE"},
                       description="How many (0: the panel's Count)")

    @classmethod
    def poll(cls, context):
        if not super().poll(context):
            return False
        meta = mesh_import.objects_meta(context.active_object)
        if not (meta.get("prompt") or meta.get("image")):
            cls.poll_message_set("A blend has no prompt or picture of its own: vary the objects it mixes")
            return False
        return True

    def start(self, context):
        from . import requests

        obj = context.active_object
        meta = mesh_import.objects_meta(obj)
        settings = context.scene.shap_e
        image = name = None
        if not meta.get("prompt"):
            img = bpy.data.images.get(meta.get("image", ""))
            if img is not None:
                image, name = requests.image_array(img), img.name
            elif meta.get("image_path") and os.path.isfile(meta["image_path"]):
                image, name = requests.file_image(meta["image_path"])
            else:
                raise _engine_errors()[0](f"The source image '{meta.get('image')}' is not in this file",
                                          "Load it again (same name), or use Generate with Input: Image")
        req = requests.build_request(context, settings, get_prefs(context), prompt=meta.get("prompt"),
                                     model=meta.get("model"), count=self.count or settings.count,
                                     image=image, image_name=name, like=meta)
        session.start_generate(req, scene=context.scene, location=obj.location.copy(),
                               spacing=settings.spacing, layout_mode="beside", sync=_sync(self),
                               image_path=meta.get("image_path"), reference_latent=_latent_or_none(obj))


class SHAP_E_OT_redecode(_GeneratedObjectJob, bpy.types.Operator):
    """Rebuild the selected generated object's mesh from its stored latent at another grid size"""

    bl_idname = "shap_e.redecode"
    bl_label = "Re-decode"

    grid_size: IntProperty(name="Grid Size", default=0, min=0, max=256, options={"SKIP_SAVE"},
                           description="0: the panel's re-decode grid")

    def start(self, context):
        obj = context.active_object
        grid = self.grid_size or int(context.scene.shap_e.redecode_grid_size)
        session.start_redecode(obj, _stored_latent(obj), grid_size=grid, device=get_prefs(context).device,
                               sync=_sync(self))


def _stored_latent(obj):
    try:
        latent = mesh_import.load_latent(obj)
    except ValueError as err:
        raise _engine_errors()[0](str(err), "Generate the object again") from None
    if latent is None:
        raise _engine_errors()[0](f"'{obj.name}' has no stored latent",
                                  "Its latent text block was deleted: generate it again from its seed")
    return latent


def _latent_or_none(obj):
    """The object's latent for comparisons that can do without it (a damaged latent text gives None)."""
    try:
        return mesh_import.load_latent(obj)
    except ValueError:
        return None


def _blend_partner(context):
    """The other selected generated object when exactly two are selected, the active one among them."""
    active = context.active_object
    others = [o for o in context.selected_objects if o is not active and mesh_import.is_generated(o)]
    return others[0] if len(others) == 1 and len(context.selected_objects) == 2 else None


class SHAP_E_OT_blend(_GeneratedObjectJob, bpy.types.Operator):
    """Objects in between the two selected generated objects, decoded from their latents mixed in steps (both
    must come from the same model)"""

    bl_idname = "shap_e.blend"
    bl_label = "Blend"

    count: IntProperty(name="Count", default=0, min=0, max=16, options={"SKIP_SAVE"},
                       description="How many objects in between (0: the panel's Count)")

    @classmethod
    def poll(cls, context):
        if not super().poll(context) or _blend_partner(context) is None:
            cls.poll_message_set("Select two generated objects (the active one is the start)")
            return False
        return True

    def start(self, context):
        a, b = context.active_object, _blend_partner(context)
        models = [o.get(mesh_import.PREFIX + "model", "mini") for o in (a, b)]
        if models[0] != models[1]:
            raise _engine_errors()[0](f"'{a.name}' and '{b.name}' come from different models ({models[0]}, "
                                      f"{models[1]}), whose latents do not mix", "Select two objects of one model")
        za, zb = _stored_latent(a), _stored_latent(b)
        if za.size != zb.size:
            raise _engine_errors()[0](f"The latents of '{a.name}' and '{b.name}' differ in size",
                                      "Select two objects of one model")
        grid = int(a.get(mesh_import.PREFIX + "grid_size", 64))
        settings = context.scene.shap_e
        session.start_blend(a, b, za, zb, count=self.count or settings.count, grid_size=grid,
                            device=get_prefs(context).device, spacing=settings.spacing, sync=_sync(self))


class SHAP_E_OT_cancel(bpy.types.Operator):
    """Stop the running Shap-E job after the current network call; nothing is added to the scene"""

    bl_idname = "shap_e.cancel"
    bl_label = "Cancel"

    def execute(self, context):
        session.cancel()
        return {"FINISHED"}


class SHAP_E_OT_use_last_seed(bpy.types.Operator):
    """Reuse the last seed (turns Random Seed off)"""

    bl_idname = "shap_e.use_last_seed"
    bl_label = "Reuse Seed"
    bl_options = {"REGISTER", "UNDO"}

    from_object: BoolProperty(default=False, options={"SKIP_SAVE"})

    def execute(self, context):
        s = context.scene.shap_e
        obj = context.active_object
        seed = obj.get(mesh_import.PREFIX + "seed") if self.from_object and obj else s.last_seed
        if seed is None or seed < 0:
            self.report({"WARNING"}, "No seed to reuse yet")
            return {"CANCELLED"}
        s.seed, s.random_seed = int(seed), False
        return {"FINISHED"}


class SHAP_E_OT_dismiss_error(bpy.types.Operator):
    """Hide the error message"""

    bl_idname = "shap_e.dismiss_error"
    bl_label = "Dismiss"

    def execute(self, context):
        session.clear_error()
        return {"FINISHED"}


classes = (SHAP_E_OT_generate, SHAP_E_OT_variations, SHAP_E_OT_redecode, SHAP_E_OT_blend, SHAP_E_OT_cancel,
           SHAP_E_OT_use_last_seed, SHAP_E_OT_dismiss_error)
register, unregister = bpy.utils.register_classes_factory(classes)
