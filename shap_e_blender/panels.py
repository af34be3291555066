"""3D Viewport > Sidebar > Shap-E: the generate panel, its collapsed Advanced and Refine sub-panels.

Drawing never imports torch: the model list comes from a cached engine.available_models() (registry reads only
file presence), progress and errors from session.py.
"""

from __future__ import annotations

import bpy

from . import mesh_import, preview, session


class _ShapEPanel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Shap-E"


class SHAP_E_PT_generate(_ShapEPanel, bpy.types.Panel):
    bl_label = "Shap-E"
    bl_idname = "SHAP_E_PT_generate"

    def draw(self, context):
        s = context.scene.shap_e
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        layout.row().prop(s, "input_mode", expand=True)
        if s.input_mode == "TEXT":
            layout.prop(s, "prompt", text="")
        else:
            layout.prop(s, "image_source")
            if s.image_source == "DATABLOCK":
                layout.template_ID(s, "image", open="image.open")
            elif s.image_source == "FILE":
                layout.prop(s, "image_path")
        layout.prop(s, "model")
        row = layout.row(heading="Seed")
        row.prop(s, "random_seed", text="Random")
        sub = row.row()
        sub.enabled = not s.random_seed
        sub.prop(s, "seed", text="")
        if s.last_seed >= 0:
            row = layout.row()
            row.label(text=f"Last seed: {s.last_seed}")
            row.operator("shap_e.use_last_seed", text="Reuse", icon="RECOVER_LAST")
        layout.prop(s, "grid_size")
        layout.prop(s, "count")
        busy = session.runner.busy
        row = layout.row()
        row.scale_y = 1.4
        row.enabled = not busy
        row.operator("shap_e.generate", icon="SHADERFX")
        session.draw_job_status(layout, kinds=("generate", "redecode"))
        if busy and s.show_preview and preview.icon_id():
            layout.template_icon(icon_value=preview.icon_id(), scale=6.0)


class SHAP_E_PT_advanced(_ShapEPanel, bpy.types.Panel):
    bl_label = "Advanced"
    bl_parent_id = "SHAP_E_PT_generate"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        s = context.scene.shap_e
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        layout.prop(s, "use_model_defaults")
        col = layout.column()
        col.enabled = not s.use_model_defaults
        col.prop(s, "steps")
        col.prop(s, "guidance_scale")
        layout.prop(s, "sampler")
        layout.prop(s, "spacing")
        layout.prop(s, "show_preview")


class SHAP_E_PT_refine(_ShapEPanel, bpy.types.Panel):
    bl_label = "Refine Selected"
    bl_parent_id = "SHAP_E_PT_generate"

    @classmethod
    def poll(cls, context):
        return mesh_import.is_generated(context.active_object)

    def draw(self, context):
        obj = context.active_object
        meta = mesh_import.objects_meta(obj)
        layout = self.layout
        col = layout.column(align=True)
        source = meta.get("prompt") or (f"blend of {meta['blend']}" if meta.get("blend") else
                                         f"image {meta.get('image', '?')}")
        col.label(text=f"{source}", icon="TEXT")
        col.label(text=f"{meta.get('model')}  seed {meta.get('seed')}  grid {meta.get('grid_size')}  "
                       f"steps {meta.get('steps')}")
        row = layout.row(align=True)
        row.enabled = not session.runner.busy
        row.prop(context.scene.shap_e, "redecode_grid_size", text="")
        row.operator("shap_e.redecode", icon="FILE_REFRESH")
        row = layout.row(align=True)
        row.enabled = not session.runner.busy
        row.operator("shap_e.variations", icon="DUPLICATE")
        row.operator("shap_e.use_last_seed", text="Use Seed", icon="RECOVER_LAST").from_object = True
        row = layout.row(align=True)
        row.enabled = not session.runner.busy
        row.operator("shap_e.blend", icon="MOD_MESHDEFORM")


classes = (SHAP_E_PT_generate, SHAP_E_PT_advanced, SHAP_E_PT_refine)
register, unregister = bpy.utils.register_classes_factory(classes)
