"""Add-on preferences: models folder, device, precision, model downloads and the dependency installer.

``bl_idname = __package__`` (``bl_ext.<repo>.shap_e_generator`` when installed as an extension). Writable data
lives in the extension's user directory (``extension_path_user``), never in the add-on folder; when the add-on
runs outside an extension repository (the repo's demo/tests register the package directly) that call raises,
and we fall back to a ``shap_e`` folder in Blender's user data files.
"""

import os
from types import SimpleNamespace

import bpy
from bpy.props import EnumProperty, StringProperty

from . import deps, session

DEVICE_ITEMS = [("auto", "Auto", "CUDA when a usable NVIDIA GPU is found, else CPU (with a notice)"),
                ("cuda", "CUDA", "NVIDIA GPU"), ("cpu", "CPU", "Slow but always works")]
PRECISION_ITEMS = [("auto", "Auto", "fp16 on CUDA (like the official code), fp32 on the CPU"),
                   ("fp32", "FP32", "Full precision (more VRAM)"), ("fp16", "FP16", "Half precision (CUDA only)")]
DEFAULTS = SimpleNamespace(models_dir="", device="auto", precision="auto")


def user_dir(sub: str) -> str:
    """A writable folder for this extension's data (models, site-packages)."""
    try:
        return bpy.utils.extension_path_user(__package__, path=sub, create=True)
    except (ValueError, TypeError, AttributeError):  # not under bl_ext.*: "does not name an extension"
        root = bpy.utils.user_resource("DATAFILES", path="shap_e", create=True)
        path = os.path.join(root, sub)
        os.makedirs(path, exist_ok=True)
        return path


def get_prefs(context=None):
    context = context or bpy.context
    addon = context.preferences.addons.get(__package__)
    return addon.preferences if addon is not None and addon.preferences is not None else DEFAULTS


def models_dir(context=None) -> str:
    return bpy.path.abspath(get_prefs(context).models_dir) or user_dir("models")


def site_packages_dir() -> str:
    return user_dir("site-packages")


class SHAP_E_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    models_dir: StringProperty(name="Models Folder", subtype="DIR_PATH", default="",
                               description="Where official Shap-E weights are stored (empty: the extension's "
                                           "user folder)")
    device: EnumProperty(name="Device", items=DEVICE_ITEMS, default="auto")
    precision: EnumProperty(name="Precision", items=PRECISION_ITEMS, default="auto")

    def draw(self, context):
        layout = self.layout
        col = layout.column()
        col.prop(self, "models_dir")
        if not self.models_dir:
            col.label(text=f"Using {models_dir(context)}", icon="FILE_FOLDER")
        row = col.row()
        row.prop(self, "device")
        row.prop(self, "precision")
        self.draw_models(layout.box(), context)
        self.draw_dependencies(layout.box())
        session.draw_job_status(layout, kinds=("download", "install"))

    def draw_models(self, box, context):
        from .properties import model_infos

        box.label(text="Models", icon="MESH_MONKEY")
        for name, kind, present, desc in model_infos():
            row = box.row()
            row.label(text=f"{name} ({kind})", icon="CHECKMARK" if present else "IMPORT")
            row.label(text="ready" if present else "not downloaded")
        if not bpy.app.online_access:
            box.label(text="Online access is off (Preferences > System > Network > Allow Online Access).",
                      icon="INFO")
            box.label(text="Or download the official .pt files by hand into the models folder above.")
        box.operator("shap_e.download_models", icon="IMPORT")

    def draw_dependencies(self, box):
        box.label(text="Python dependencies", icon="SCRIPT")
        status = deps.status([site_packages_dir()])
        grid = box.grid_flow(columns=3, even_columns=True)
        for d in status:
            grid.label(text=d.module, icon="CHECKMARK" if d.present else "ERROR")
        if any(not d.present for d in status):
            box.label(text=f"Missing packages install into {site_packages_dir()}")
            box.operator("shap_e.install_dependencies", icon="CONSOLE")
        else:
            box.label(text="All dependencies are installed.")


classes = (SHAP_E_AddonPreferences,)
register, unregister = bpy.utils.register_classes_factory(classes)
