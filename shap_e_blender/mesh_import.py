"""MeshRecord -> Blender object: bulk mesh build, linear colour attribute, a material that shows it, metadata.

Main thread only. Vertices/faces/colours go in with ``foreach_set`` (one call per array, no Python loop over
vertices). The record is already in Blender's frame (Z up, front -Y), so no axis conversion happens here.
Colours are linear RGB -> a POINT FLOAT_COLOR attribute (the attribute type glTF COLOR_0 maps to), read by a
Color Attribute node into the Principled BSDF Base Color, so the colours show in Material Preview and renders.
The latent goes into a Text datablock (see latent_codec for why), referenced by name from the object.
"""

from __future__ import annotations

import bpy
import numpy as np

from . import latent_codec

COLOR_ATTR = "Col"
MATERIAL_NAME = "Shap-E Vertex Color"
PREFIX = "shap_e_"  # every custom property the add-on writes starts with this


def build_mesh(name: str, record) -> bpy.types.Mesh:
    verts = np.ascontiguousarray(record.vertices, dtype=np.float32).reshape(-1, 3)  # (V, 3)
    faces = np.ascontiguousarray(record.faces, dtype=np.int32).reshape(-1, 3)  # (F, 3)
    colors = np.ascontiguousarray(record.vertex_colors, dtype=np.float32).reshape(-1, 3)  # (V, 3) linear
    if faces.size and (faces.min() < 0 or faces.max() >= len(verts)):
        raise ValueError("the mesh record has face indices outside its vertex array")
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(verts))
    mesh.vertices.foreach_set("co", verts.reshape(-1))
    mesh.loops.add(faces.size)
    mesh.loops.foreach_set("vertex_index", faces.reshape(-1))
    mesh.polygons.add(len(faces))
    mesh.polygons.foreach_set("loop_start", np.arange(0, faces.size, 3, dtype=np.int32))
    mesh.polygons.foreach_set("loop_total", np.full(len(faces), 3, dtype=np.int32))
    # Indices were checked above and marching cubes makes no degenerate polygons, so Mesh.validate() (a
    # quarter of the build time) is not needed; update() computes the edges.
    mesh.update(calc_edges=True)
    attr = mesh.color_attributes.new(COLOR_ATTR, "FLOAT_COLOR", "POINT")
    rgba = np.ones((len(verts), 4), dtype=np.float32)
    rgba[:, :3] = np.clip(colors, 0.0, 1.0)
    attr.data.foreach_set("color", rgba.reshape(-1))
    mesh.color_attributes.active_color_name = COLOR_ATTR
    mesh.color_attributes.render_color_index = mesh.color_attributes.active_color_index
    if hasattr(mesh.color_attributes, "default_color_name"):
        mesh.color_attributes.default_color_name = COLOR_ATTR
    if hasattr(mesh, "shade_smooth"):  # 4.1+: drops the sharp_face attribute in one call
        mesh.shade_smooth()
    else:
        mesh.polygons.foreach_set("use_smooth", np.ones(len(mesh.polygons), dtype=bool))
    return mesh


def vertex_color_material() -> bpy.types.Material:
    """The shared material: Color Attribute node -> Principled BSDF Base Color (created once per file)."""
    mat = bpy.data.materials.get(MATERIAL_NAME)
    if mat is not None and mat.node_tree is not None:
        return mat
    mat = mat or bpy.data.materials.new(MATERIAL_NAME)
    if bpy.app.version < (5, 0, 0):
        mat.use_nodes = True  # a no-op (and deprecated) from 5.0, where materials always have nodes
    nodes = mat.node_tree.nodes
    bsdf = next((n for n in nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None:
        bsdf = nodes.new("ShaderNodeBsdfPrincipled")
        out = next((n for n in nodes if n.type == "OUTPUT_MATERIAL"), None) or nodes.new("ShaderNodeOutputMaterial")
        mat.node_tree.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    color = nodes.new("ShaderNodeVertexColor")
    color.layer_name = COLOR_ATTR
    color.location = (bsdf.location.x - 300, bsdf.location.y)
    mat.node_tree.links.new(color.outputs["Color"], bsdf.inputs["Base Color"])
    if "Roughness" in bsdf.inputs:
        bsdf.inputs["Roughness"].default_value = 0.6
    return mat


def store_latent(obj: bpy.types.Object, latent: np.ndarray, meta: dict) -> str:
    text = bpy.data.texts.new(f".shap_e_latent_{obj.name}")  # leading dot: hidden from most ID lists
    text.from_string(latent_codec.encode(latent, meta))
    text.use_fake_user = True  # a Text with no user must still be saved
    obj[PREFIX + "latent_text"] = text.name
    return text.name


def load_latent(obj: bpy.types.Object) -> np.ndarray | None:
    name = obj.get(PREFIX + "latent_text")
    text = bpy.data.texts.get(name) if name else None
    if text is None:
        return None
    data, _meta = latent_codec.decode(text.as_string())
    return data


def write_metadata(obj: bpy.types.Object, meta: dict) -> None:
    for key, value in meta.items():
        if value is not None:
            obj[PREFIX + key] = value


def create_object(record, *, name: str, collection, location, meta: dict) -> bpy.types.Object:
    mesh = build_mesh(name, record)
    mesh.materials.append(vertex_color_material())
    obj = bpy.data.objects.new(name, mesh)
    obj.location = location
    collection.objects.link(obj)
    write_metadata(obj, meta)
    if record.latent is not None:
        store_latent(obj, record.latent, {k: str(v) for k, v in meta.items() if v is not None})
    return obj


def replace_mesh(obj: bpy.types.Object, record, grid_size: int) -> None:
    """Swap the object's mesh for a new decode (materials kept, the old mesh freed if nothing else uses it)."""
    old = obj.data
    mesh = build_mesh(old.name, record)
    for mat in old.materials:
        mesh.materials.append(mat)
    obj.data = mesh
    if old.users == 0:
        bpy.data.meshes.remove(old)
    obj[PREFIX + "grid_size"] = int(grid_size)


def select_only(view_layer, objects) -> None:
    for o in view_layer.objects:
        if o.select_get(view_layer=view_layer):
            o.select_set(False, view_layer=view_layer)
    for o in objects:
        o.select_set(True, view_layer=view_layer)
    if objects:
        view_layer.objects.active = objects[0]


def is_generated(obj) -> bool:
    return obj is not None and obj.type == "MESH" and (PREFIX + "seed") in obj


def objects_meta(obj) -> dict:
    return {k[len(PREFIX):]: obj[k] for k in obj.keys() if k.startswith(PREFIX)}
