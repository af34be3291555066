"""Shared pieces of the bpy-wheel scenarios (scenarios.py, one fresh process each): installing the built zip,
the FACTS dict every scenario fills, scene snapshots, a stand-in engine, the timer drain loop, a UILayout
recorder and random-weight mini models for the real engine path.
"""

from __future__ import annotations

import importlib
import time

import bpy
import numpy as np

FACTS: dict = {}
PKG = "bl_ext.user_default.shap_e_generator"


def install(zip_path: str):
    bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
    import addon_utils

    FACTS["enabled"] = PKG in {m.__name__ for m in addon_utils.modules()} and PKG in bpy.context.preferences.addons
    return importlib.import_module(PKG)


def sub(name: str):
    return importlib.import_module(f"{PKG}.{name}")


def snapshot() -> dict:
    return {k: sorted(x.name for x in getattr(bpy.data, k))
            for k in ("objects", "meshes", "materials", "texts", "images", "collections")}


def mesh_facts(obj) -> dict:
    mesh = obj.data
    attr = mesh.color_attributes.get("Col")
    colors = np.empty(len(mesh.vertices) * 4, np.float32)
    if attr is not None:
        attr.data.foreach_get("color", colors)
    mat = mesh.materials[0] if mesh.materials else None
    links = []
    if mat is not None and mat.node_tree is not None:
        links = [(lk.from_node.bl_idname, getattr(lk.from_node, "layer_name", ""), lk.to_node.bl_idname,
                  lk.to_socket.name) for lk in mat.node_tree.links]
    co = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    return dict(
        name=obj.name, verts=len(mesh.vertices), faces=len(mesh.polygons),
        attr=None if attr is None else [attr.domain, attr.data_type],
        active_color=mesh.color_attributes.active_color_name,
        color_mean=colors.reshape(-1, 4)[:, :3].mean(0).tolist() if len(mesh.vertices) else None,
        links=links, props={k: obj[k] for k in obj.keys() if isinstance(obj[k], (int, float, str))},
        location=list(obj.location), selected=obj.select_get(), active=bpy.context.view_layer.objects.active == obj,
        bbox_min=co.reshape(-1, 3).min(0).tolist() if len(co) else None,
        bbox_max=co.reshape(-1, 3).max(0).tolist() if len(co) else None,
        mesh_name=mesh.name,
    )


def fake_engine(session, eng, *, steps: int = 8, delay: float = 0.0):
    """A test double with the engine's signatures: a coloured box per seed, honouring should_cancel."""
    calls = {"generate": 0, "decode": 0}
    # The double stands in for the mini model, so the add-on must see it as installed.
    sub("properties")._infos_cache = [("mini", "both", True, "test double"),
                                      ("text300M", "text", False, "official"), ("image300M", "image", False, "")]

    def box(size, color, latent):
        v = np.array([[x, y, z] for x in (-size, size) for y in (-size, size) for z in (-size, size)], np.float32)
        f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6],
                      [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
        return eng.MeshRecord(v, f, np.tile([color], (8, 1)), latent=latent)

    def generate(req, *, on_step=None, should_cancel=None):
        calls["generate"] += 1
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            if should_cancel is not None and should_cancel():
                raise eng.GenerationCancelled()
            time.sleep(delay)
            on_step(eng.StepEvent(i, steps, 1.0, elapsed_s=time.perf_counter() - t0 + 1e-3,
                                  preview=np.full((16, 16, 3), 128, np.uint8)))
        out = []
        for k in range(req.batch_size):
            # a latent per seed, as a model whose answer varies with the seed gives
            latent = np.random.default_rng(req.seed + k).normal(size=4096).astype(np.float32)
            rec = box(0.5, (0.8, 0.1, 0.1), latent)
            rec.seed, rec.model, rec.grid_size = req.seed + k, req.model, req.grid_size
            out.append(rec)
        return out

    def decode(latent, *, model, grid_size, device="auto"):
        calls["decode"] += 1
        rec = box(0.25 + grid_size / 1024, (0.1, 0.1, 0.8), np.asarray(latent))
        rec.vertices = np.concatenate([rec.vertices, rec.vertices[:1] * 0.5])  # a different vertex count
        rec.vertex_colors = np.concatenate([rec.vertex_colors, rec.vertex_colors[:1]])
        return rec

    session.set_engine_functions(generate=generate, decode=decode)
    return calls


def drain_until(session, pred, timeout=60.0):
    t_end = time.perf_counter() + timeout
    while time.perf_counter() < t_end:
        session.drain()
        if pred():
            return True
        time.sleep(0.002)
    return False


def _generate(session, s, *, sync=True, **kw):
    bpy.ops.ed.undo_push(message="before")  # the user's previous action
    ret = bpy.ops.shap_e.generate(sync=sync, **kw)
    return sorted(ret)


class Recorder:
    """A stand-in UILayout: records every call and checks the property / operator names it is given."""

    def __init__(self, log):
        self.log = log

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if name in ("prop", "template_ID") and len(args) >= 2:
                data, prop = args[0], args[1]
                ok = prop in data.bl_rna.properties
                self.log.append(("prop", prop, ok))
            elif name == "operator":
                mod, op = args[0].split(".")
                ok = hasattr(bpy.types, f"{mod.upper()}_OT_{op}")
                self.log.append(("operator", args[0], ok))
            else:
                self.log.append((name, kwargs.get("text", ""), True))
            return Recorder(self.log)

        return call

    def __setattr__(self, key, value):
        object.__setattr__(self, key, value)


def _random_mini_models():
    """Random-weight mini-sized models in the vendored engine's model cache (the engine's own test recipe):
    the real pipeline runs (conditioning, guided sampling, previews, cancel, decode) without trained weights."""
    import torch

    registry = sub("engine.registry")
    mini_bundle = sub("engine.mini_config").mini_bundle
    ClipConditioner = sub("engine.conditioning.clip").ClipConditioner
    ImplicitDecoder = sub("engine.models.implicit_decoder").ImplicitDecoder
    LatentPrior = sub("engine.models.latent_transformer").LatentPrior
    torch.manual_seed(0)
    decoder = ImplicitDecoder(mini_bundle("text").decoder).eval()
    for mode in ("text", "image"):
        bundle = mini_bundle(mode)
        prior = LatentPrior(bundle.prior).eval()
        with torch.no_grad():
            prior.wrapped.output_proj.weight.normal_(0, 0.02)
        registry._cache[("mini", mode, "cpu")] = registry.LoadedModel(
            "mini", mode, bundle, ClipConditioner.from_config(bundle.clip), prior, decoder, 1 << 20)
    sub("properties")._infos_cache = [("mini", "both", True, "random weights"),
                                      ("text300M", "text", False, ""), ("image300M", "image", False, "")]
