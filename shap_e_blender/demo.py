"""Headless demo: generate objects with the embedded mini model through the add-on's own operators.

    python -m shap_e_blender.demo --out out

Runs Blender as a Python module (the bpy wheel), registers the add-on, and for each prompt (and one picture)
calls ``bpy.ops.shap_e.generate(sync=True)`` -- the same operator, request mapping, job runner and mesh import a
user's click goes through. Then it lays the objects out on a ground plane with a camera and lights, saves
out/demo.blend, renders out/demo.png (Cycles, CPU) and exports one out/<name>.glb per object.
The input picture (demo_assets/green_pyramid.png) was rendered with bpy by ``--make-assets``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

PROMPTS = ("a red cube", "a tall blue cylinder", "a yellow torus", "a pink cone")
ASSETS = Path(__file__).resolve().parent / "demo_assets"
INPUT_IMAGE = ASSETS / "green_pyramid.png"
SPACING = 2.2


def _bpy():
    import bpy

    return bpy


def register_addon():
    bpy = _bpy()
    if not hasattr(bpy.types.Scene, "shap_e"):
        import shap_e_blender

        shap_e_blender.register()


def _material(name, rgb, roughness=0.8):
    bpy = _bpy()
    mat = bpy.data.materials.new(name)
    if bpy.app.version < (5, 0, 0):
        mat.use_nodes = True
    bsdf = mat.node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
    bsdf.inputs["Roughness"].default_value = roughness
    return mat


def _look_at(obj, target):
    from mathutils import Vector

    direction = Vector(target) - obj.location
    obj.rotation_euler = direction.to_track_quat("-Z", "Y").to_euler()


def make_assets(path: Path = INPUT_IMAGE, size: int = 256) -> Path:
    """Render the image-conditioning example: a green pyramid (mini world sizes) on white, like its training
    renders (plain background, elevated view, soft Lambert-like light)."""
    bpy = _bpy()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    side = 1.5  # the mini world's largest side; pyramid height = base side
    bpy.ops.mesh.primitive_cone_add(vertices=4, radius1=side / math.sqrt(2), radius2=0.0, depth=side,
                                    rotation=(0, 0, math.pi / 4))
    obj = bpy.context.active_object
    obj.data.materials.append(_material("green", (0.025, 0.35, 0.025)))  # #2CA02C in linear RGB
    cam = bpy.data.objects.new("cam", bpy.data.cameras.new("cam"))
    scene.collection.objects.link(cam)
    cam.location = (1.2, -3.6, 2.1)
    _look_at(cam, (0, 0, 0))
    cam.data.lens = 50
    scene.camera = cam
    sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN"))
    sun.data.energy = 3.0
    scene.collection.objects.link(sun)
    sun.rotation_euler = (math.radians(35), math.radians(0), math.radians(-50))
    _render_settings(scene, size, size, samples=16)
    scene.world = _white_backdrop_world(ambient=0.35)
    path.parent.mkdir(parents=True, exist_ok=True)
    _render_to(scene, path)
    return path


def _white_backdrop_world(ambient: float):
    """White behind the object (camera rays) but only a dim ambient light on it, like the training renders."""
    bpy = _bpy()
    world = bpy.data.worlds.new("white")
    if bpy.app.version < (5, 0, 0):
        world.use_nodes = True
    nt = world.node_tree
    out = next(n for n in nt.nodes if n.type == "OUTPUT_WORLD")
    dim, white = nt.nodes.new("ShaderNodeBackground"), nt.nodes.new("ShaderNodeBackground")
    dim.inputs["Color"].default_value = (ambient, ambient, ambient, 1)
    white.inputs["Color"].default_value = (1, 1, 1, 1)
    mix, path = nt.nodes.new("ShaderNodeMixShader"), nt.nodes.new("ShaderNodeLightPath")
    nt.links.new(path.outputs["Is Camera Ray"], mix.inputs["Fac"])
    nt.links.new(dim.outputs["Background"], mix.inputs[1])
    nt.links.new(white.outputs["Background"], mix.inputs[2])
    nt.links.new(mix.outputs["Shader"], out.inputs["Surface"])
    return world


def _render_settings(scene, width, height, samples):
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = bpy_has_oidn()
    if scene.cycles.use_denoising:
        scene.cycles.denoiser = "OPENIMAGEDENOISE"
    scene.render.resolution_x, scene.render.resolution_y = width, height
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.view_settings.view_transform = "Standard"


def bpy_has_oidn() -> bool:
    _bpy()
    try:
        import _cycles  # Cycles' Python module, present once bpy is imported

        return bool(getattr(_cycles, "with_openimagedenoise", False))
    except ImportError:
        return False


def _render_to(scene, path: Path):
    bpy = _bpy()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    scene.render.filepath = str(tmp)
    bpy.ops.render.render(write_still=True)
    os.replace(tmp, path)


def generate_all(grid: int, seed: int) -> list[dict]:
    """Every demo object through the Generate operator; returns one row per object."""
    bpy = _bpy()
    from . import session

    scene = bpy.context.scene
    s = scene.shap_e
    s.model, s.count, s.grid_size, s.random_seed, s.seed = "mini", 1, str(grid), False, seed
    jobs = [("text", p) for p in PROMPTS] + [("image", str(INPUT_IMAGE))]
    rows = []
    for i, (mode, value) in enumerate(jobs):
        scene.cursor.location = ((i - (len(jobs) - 1) / 2) * SPACING, 0.0, 0.0)
        if mode == "text":
            s.input_mode, s.prompt = "TEXT", value
        else:
            s.input_mode, s.image_source, s.image_path = "IMAGE", "FILE", value
        before = set(bpy.data.objects)
        t0 = time.perf_counter()
        bpy.ops.shap_e.generate(sync=True)
        dt = time.perf_counter() - t0
        new = [o for o in bpy.data.objects if o not in before]
        if session.ui.error:
            print(f"[demo] {value}: {session.ui.error} -> {session.ui.hint}", file=sys.stderr)
        for obj in new:
            _stand_on_ground(obj)
            rows.append(dict(obj=obj.name, input=value if mode == "text" else f"image {Path(value).name}",
                             seed=obj["shap_e_seed"], verts=len(obj.data.vertices), faces=len(obj.data.polygons),
                             seconds=dt))
    return rows


def _stand_on_ground(obj):
    zs = [v.co.z for v in obj.data.vertices]
    if zs:
        obj.location.z -= min(zs)


def stage(scene, n_objects: int):
    """Ground, key + fill light, camera framing the row of objects."""
    bpy = _bpy()
    bpy.ops.mesh.primitive_plane_add(size=400, location=(0, 0, 0))
    ground = bpy.context.active_object
    ground.name = "Ground"
    ground.data.materials.append(_material("ground", (0.55, 0.55, 0.57), roughness=0.9))
    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN"))
    sun.data.energy = 3.5
    sun.data.angle = math.radians(8)
    sun.rotation_euler = (math.radians(50), math.radians(0), math.radians(-35))
    scene.collection.objects.link(sun)
    world = bpy.data.worlds.new("sky")
    if bpy.app.version < (5, 0, 0):
        world.use_nodes = True
    bg = world.node_tree.nodes["Background"]
    bg.inputs["Color"].default_value = (0.75, 0.82, 0.95, 1)
    bg.inputs["Strength"].default_value = 0.6
    scene.world = world
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    width = n_objects * SPACING
    cam.data.lens = 35
    dist = 0.5 * width / math.tan(math.radians(27)) + 0.5  # 35 mm lens: 54 degrees across
    cam.location = (0.0, -dist * 0.93, dist * 0.36)
    _look_at(cam, (0.0, 0.0, 0.45))
    scene.camera = cam


def export_glb(obj, path: Path):
    bpy = _bpy()
    import addon_utils

    addon_utils.enable("io_scene_gltf2", default_set=False)
    view_layer = bpy.context.view_layer
    for o in view_layer.objects:
        o.select_set(o == obj)
    view_layer.objects.active = obj
    tmp = path.with_name(path.stem + ".tmp.glb")
    bpy.ops.export_scene.gltf(filepath=str(tmp), export_format="GLB", use_selection=True,
                              export_vertex_color="ACTIVE", export_materials="EXPORT")
    os.replace(tmp, path)


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in text.lower().replace("shap-e ", ""))
    return "_".join(filter(None, keep.split("_")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Shap-E add-on demo in headless Blender")
    ap.add_argument("--out", default="out", help="output folder (default out/)")
    ap.add_argument("--grid", type=int, default=64, choices=(64, 128, 256), help="marching cubes grid size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=16, help="Cycles samples for demo.png (denoised)")
    ap.add_argument("--make-assets", action="store_true", help="re-render demo_assets/green_pyramid.png and exit")
    args = ap.parse_args(argv)
    if args.make_assets:
        print(f"[demo] wrote {make_assets()}")
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bpy = _bpy()
    bpy.ops.wm.read_factory_settings(use_empty=True)
    register_addon()
    scene = bpy.context.scene
    t0 = time.perf_counter()
    rows = generate_all(args.grid, args.seed)
    if not rows:
        print("[demo] nothing was generated (see the errors above)", file=sys.stderr)
        return 1
    stage(scene, len(rows))
    _render_settings(scene, 640, 360, args.samples)
    tmp_blend = out / "demo.tmp.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_blend), copy=True)
    os.replace(tmp_blend, out / "demo.blend")
    t_render = time.perf_counter()
    _render_to(scene, out / "demo.png")
    t_render = time.perf_counter() - t_render
    for row in rows:
        path = out / f"{_slug(row['obj'])}.glb"
        export_glb(bpy.data.objects[row["obj"]], path)
        row["glb"] = path.name
    print(f"\n{'object':28s} {'input':24s} {'seed':>6s} {'verts':>7s} {'faces':>7s} {'gen s':>6s}  file")
    for r in rows:
        print(f"{r['obj'][:28]:28s} {r['input'][:24]:24s} {r['seed']:>6d} {r['verts']:>7d} {r['faces']:>7d} "
              f"{r['seconds']:>6.2f}  {r['glb']}")
    print(f"\n[demo] {len(rows)} objects, render {t_render:.1f} s, total {time.perf_counter() - t0:.1f} s")
    print(f"[demo] scene:  {out / 'demo.blend'}")
    print(f"[demo] render: {out / 'demo.png'}")
    print(f"[demo] meshes: {out}/*.glb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
