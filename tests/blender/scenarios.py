"""Scenarios run by the bpy-wheel tests, one fresh process each (bpy state is global and cannot be reset).

    python scenarios.py <name> <zip> <out.json> [options]

Each scenario installs the built extension zip with ``bpy.ops.extensions.package_install_files`` (the same path a
user takes), drives the add-on through its operators, and writes the facts it observed to a JSON file; the pytest
modules assert on those facts. No timers fire in the wheel: scenarios call ``session.drain()`` directly. Shared
helpers live in scenario_kit.py (next to this file, so importable when this runs as a script).
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback

import bpy
import numpy as np

from scenario_kit import (FACTS, PKG, Recorder, _generate, _random_mini_models, drain_until, fake_engine, install,
                          mesh_facts, snapshot, sub)

# ------------------------------------------------------------------------------------------------ scenarios


def sc_install(zip_path, opts):
    had_torch = "torch" in sys.modules
    install(zip_path)
    FACTS["torch_after_enable"] = (not had_torch) and "torch" in sys.modules
    FACTS["engine_loaded_at_register"] = any(m.startswith(PKG + ".engine.pipeline") for m in sys.modules)
    FACTS["scene_prop"] = hasattr(bpy.types.Scene, "shap_e")
    FACTS["operators"] = sorted(n for n in dir(bpy.types) if n.startswith("SHAP_E_"))
    FACTS["prefs_idname"] = type(bpy.context.preferences.addons[PKG].preferences).bl_idname
    prefs = sub("preferences")
    FACTS["models_dir"] = prefs.models_dir()
    FACTS["models_dir_is_extension_user"] = "extensions" in prefs.models_dir()
    FACTS["vendored"] = sub("engine_shim").is_vendored()
    FACTS["models"] = [m[0] for m in sub("properties").model_infos()]
    # Every vendored engine module imports from inside the extension (relative imports only).
    import pkgutil

    import importlib.util

    eng = importlib.import_module(PKG + ".engine")
    errors = {}
    FACTS["engine_deps_installed"] = all(importlib.util.find_spec(m) for m in ("torch", "open_clip", "skimage"))
    for info in pkgutil.walk_packages(eng.__path__, eng.__name__ + ".") if FACTS["engine_deps_installed"] else []:
        if info.name.endswith(("__main__", ".cli")):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as err:  # noqa: BLE001 - reported to the test
            errors[info.name] = f"{type(err).__name__}: {err}"
    FACTS["engine_import_errors"] = errors
    FACTS["engine_modules_from_repo"] = sorted(m for m in sys.modules if m == "engine" or m.startswith("engine."))
    before = snapshot()
    import addon_utils

    addon_utils.disable(PKG, default_set=True)
    FACTS["after_disable"] = dict(
        scene_prop=hasattr(bpy.types.Scene, "shap_e"),
        classes=sorted(n for n in dir(bpy.types) if n.startswith("SHAP_E_")),
        timers=bpy.app.timers.is_registered(sub("session").timer_tick),
        handlers=[h.__module__ for h in bpy.app.handlers.load_pre if h.__module__.startswith(PKG)],
        data_changed=snapshot() != before,
        sys_path=[p for p in sys.path if "shap_e_generator" in p],
        enabled=PKG in bpy.context.preferences.addons,
    )


def sc_bad_inputs(zip_path, opts):
    install(zip_path)
    session = sub("session")
    s = bpy.context.scene.shap_e
    results = {}

    def attempt(label, **op_kwargs):
        before = snapshot()
        session.clear_error()
        try:
            ret = sorted(bpy.ops.shap_e.generate(sync=True, **op_kwargs))
        except RuntimeError as err:  # bpy turns an ERROR report into RuntimeError in background mode
            ret = ["RuntimeError", str(err)[:200]]
        results[label] = dict(ret=ret, error=session.ui.error, hint=session.ui.hint,
                              unchanged=snapshot() == before)

    s.input_mode, s.prompt = "TEXT", "   "
    attempt("empty_prompt")
    s.input_mode, s.image_source, s.image = "IMAGE", "DATABLOCK", None
    attempt("no_image")
    s.image_source = "EDITOR"
    attempt("no_editor_image")
    s.image_source, s.image_path = "FILE", opts["bad_file"]
    attempt("non_image_file")
    s.input_mode, s.prompt = "TEXT", "a red cube"
    attempt("unknown_model", model="nonexistent_model")
    FACTS["results"] = results

    # Network features with Blender's "Allow Online Access" off (the wheel's default): a message, no job.
    FACTS["online_access"] = bpy.app.online_access
    for op in ("download_models", "install_dependencies"):
        session.clear_error()
        try:
            ret = sorted(getattr(bpy.ops.shap_e, op)("INVOKE_DEFAULT"))
        except RuntimeError as err:
            ret = ["RuntimeError", str(err)[:200]]
        FACTS[op] = dict(ret=ret, error=session.ui.error, hint=session.ui.hint, busy=session.runner.busy)


def sc_generate(zip_path, opts):
    install(zip_path)
    session = sub("session")
    eng = sub("engine_shim").get_engine()
    calls = fake_engine(session, eng) if opts.get("fake") else None
    s = bpy.context.scene.shap_e
    s.input_mode, s.prompt, s.count, s.grid_size = "TEXT", opts.get("prompt", "a red cube"), 1, "64"
    bpy.context.scene.cursor.location = (1.0, 2.0, 0.0)
    before = snapshot()
    t0 = time.perf_counter()
    FACTS["ret"] = _generate(session, s)
    FACTS["generate_s"] = time.perf_counter() - t0
    FACTS["error"] = [session.ui.error, session.ui.hint]
    new = [o for o in bpy.data.objects if o.name not in before["objects"]]
    FACTS["new_objects"] = [mesh_facts(o) for o in new]
    FACTS["last_seed"] = s.last_seed
    FACTS["texts"] = [t.name for t in bpy.data.texts]
    if not new:
        return
    obj = new[0]
    mesh_import = sub("mesh_import")
    latent = mesh_import.load_latent(obj)
    FACTS["latent_size"] = None if latent is None else int(latent.size)

    # Re-decode at another grid size: the mesh data changes, one undo step.
    bpy.context.view_layer.objects.active = obj
    old = mesh_facts(obj)
    FACTS["redecode_ret"] = sorted(bpy.ops.shap_e.redecode(grid_size=int(opts.get("redecode_grid", 32)),
                                                            sync=True))
    FACTS["redecode_error"] = session.ui.error
    FACTS["redecoded"] = mesh_facts(obj)
    FACTS["redecode_changed"] = (FACTS["redecoded"]["verts"], FACTS["redecoded"]["faces"]) != (old["verts"],
                                                                                              old["faces"])
    bpy.ops.ed.undo()
    obj = bpy.data.objects.get(old["name"])
    FACTS["after_redecode_undo"] = None if obj is None else mesh_facts(obj)

    # Save, reopen: the latent is still there and decodes.
    path = opts["blend"]
    bpy.ops.wm.save_as_mainfile(filepath=path)
    bpy.ops.wm.open_mainfile(filepath=path)
    obj = bpy.data.objects.get(old["name"])
    lat2 = mesh_import.load_latent(obj) if obj is not None else None
    FACTS["latent_after_reopen_equal"] = lat2 is not None and latent is not None and bool(np.array_equal(lat2, latent))

    # Variations: same prompt, new seeds, beside the object.
    bpy.context.view_layer.objects.active = obj
    bpy.ops.ed.undo_push(message="reopened")  # the wheel starts an empty undo stack after open_mainfile
    names = {o.name for o in bpy.data.objects}
    FACTS["variations_ret"] = sorted(bpy.ops.shap_e.variations(count=2, sync=True))
    var = [o for o in bpy.data.objects if o.name not in names]
    FACTS["variations"] = [mesh_facts(o) for o in var]
    FACTS["variations_info"] = session.ui.info
    FACTS["source_after_reopen"] = mesh_facts(obj)

    # Undo: exactly one step removes all the variations.
    bpy.ops.ed.undo()
    FACTS["after_variations_undo"] = sorted(o.name for o in bpy.data.objects if o.name not in names)
    FACTS["calls"] = calls


def sc_undo(zip_path, opts):
    install(zip_path)
    session = sub("session")
    eng = sub("engine_shim").get_engine()
    if opts.get("fake"):
        fake_engine(session, eng)
    s = bpy.context.scene.shap_e
    s.input_mode, s.prompt, s.count = "TEXT", opts.get("prompt", "a red cube"), int(opts.get("count", 2))
    before = snapshot()
    FACTS["ret"] = _generate(session, s)
    FACTS["error"] = session.ui.error
    FACTS["added"] = sorted(set(snapshot()["objects"]) - set(before["objects"]))
    bpy.ops.ed.undo()
    FACTS["after_one_undo_equal"] = snapshot() == before
    FACTS["after_one_undo"] = snapshot()
    FACTS["before"] = before


def sc_cancel(zip_path, opts):
    install(zip_path)
    session = sub("session")
    eng = sub("engine_shim").get_engine()
    if opts.get("fake"):
        fake_engine(session, eng, steps=50, delay=0.02)
    s = bpy.context.scene.shap_e
    s.input_mode, s.prompt, s.count = "TEXT", opts.get("prompt", "a red cube"), 1
    if not opts.get("fake"):  # slow the real engine down enough to cancel mid-run
        s.use_model_defaults, s.steps, s.guidance_scale = False, 64, 3.0
    before = snapshot()
    ret = bpy.ops.shap_e.generate(sync=False)
    FACTS["ret"] = sorted(ret)
    job = session.runner.active
    reached = drain_until(session, lambda: job.progress.step >= 2 or job.finished, timeout=120)
    FACTS["step_at_cancel"] = job.progress.step
    FACTS["progress_text"] = job.progress.text
    FACTS["had_preview"] = job.preview is not None
    FACTS["reached_step2"] = reached and job.progress.step >= 2
    FACTS["main_thread_worker"] = job.thread is not None and job.thread is not threading.current_thread()
    bpy.ops.shap_e.cancel()
    job.join(120)
    drain_until(session, lambda: job.finished, timeout=30)
    FACTS["status"] = job.status
    FACTS["info"] = session.ui.info
    FACTS["unchanged"] = snapshot() == before
    FACTS["busy_after"] = session.runner.busy


def sc_ui(zip_path, opts):
    """Run every panel's and the preferences' draw() against a recording layout, in several states."""
    install(zip_path)
    session = sub("session")
    eng = sub("engine_shim").get_engine()
    fake_engine(session, eng, steps=50, delay=0.01)
    panels = [getattr(bpy.types, n) for n in dir(bpy.types) if n.startswith("SHAP_E_PT_")]
    prefs = bpy.context.preferences.addons[PKG].preferences
    log: list = []
    states = {}

    def draw_all(state):
        log.clear()
        for cls in panels:
            if not hasattr(cls, "poll") or cls.poll(bpy.context):
                fake = type("P", (), {"layout": Recorder(log)})()
                cls.draw(fake, bpy.context)
        class PrefsProxy:  # the real preferences, with a recording layout
            layout = Recorder(log)

            def __getattr__(self, name):
                return getattr(prefs, name)

        type(prefs).draw(PrefsProxy(), bpy.context)
        states[state] = dict(bad=[e for e in log if not e[2]], calls=len(log),
                             labels=[e[1] for e in log if e[0] == "label"],
                             progress=[e for e in log if e[0] == "progress"],
                             operators=sorted({e[1] for e in log if e[0] == "operator"}))

    s = bpy.context.scene.shap_e
    draw_all("idle_text")
    s.input_mode = "IMAGE"
    for src in ("EDITOR", "DATABLOCK", "FILE"):
        s.image_source = src
        draw_all(f"image_{src}")
    s.input_mode, s.prompt = "TEXT", ""
    try:
        bpy.ops.shap_e.generate(sync=True)
    except RuntimeError:
        pass
    draw_all("error")
    s.prompt = "a red cube"
    bpy.ops.shap_e.generate(sync=True)
    draw_all("selected_generated")
    bpy.ops.shap_e.generate(sync=False)
    job = session.runner.active
    drain_until(session, lambda: job.progress.step >= 2)
    draw_all("running")
    bpy.ops.shap_e.cancel()
    job.join(30)
    drain_until(session, lambda: job.finished)
    FACTS["states"] = states


def sc_image_input(zip_path, opts):
    """Image conditioning inputs reach the engine as top-down sRGB uint8, from each source."""
    install(zip_path)
    session = sub("session")
    eng = sub("engine_shim").get_engine()
    fake_engine(session, eng)
    seen = []
    gen = session._generate_fn

    def recording(req, **kw):
        seen.append(dict(shape=list(req.image.shape), dtype=str(req.image.dtype), top=req.image[0, 0].tolist(),
                         bottom=req.image[-1, 0].tolist(), prompt=req.prompt, name=req.image_name))
        return gen(req, **kw)

    session.set_engine_functions(generate=recording, decode=session._decode_fn)
    w, h = 16, 8
    px = np.zeros((h, w, 4), np.float32)
    px[: h // 2] = (0.0, 0.0, 1.0, 1.0)  # Blender rows are bottom-up: the lower half is blue
    px[h // 2:] = (1.0, 0.0, 0.0, 1.0)  # the upper half red
    img = bpy.data.images.new("probe", w, h, alpha=True)
    img.pixels.foreach_set(px.reshape(-1))
    lin = bpy.data.images.new("linear_probe", w, h, alpha=True, float_buffer=True)
    lin.pixels.foreach_set(np.tile(np.array([0.214, 0.214, 0.214, 1.0], np.float32), w * h))
    s = bpy.context.scene.shap_e
    s.input_mode, s.image_source = "IMAGE", "DATABLOCK"
    for im in (img, lin):
        s.image = im
        bpy.ops.shap_e.generate(sync=True)
    path = opts["png"]
    img.filepath_raw, img.file_format = path, "PNG"
    img.save()
    s.image_source, s.image_path = "FILE", path
    before = snapshot()
    bpy.ops.shap_e.generate(sync=True)
    after = snapshot()
    FACTS["file_images_unchanged"] = after["images"] == before["images"]
    # Variations of the file-made object reload the picture from the stored path.
    src = next(o for o in bpy.data.objects if o.get("shap_e_image") == "probe.png")
    FACTS["file_obj_path"] = src.get("shap_e_image_path")
    bpy.context.view_layer.objects.active = src
    names = {o.name for o in bpy.data.objects}
    bpy.ops.shap_e.variations(count=1, sync=True)
    FACTS["file_variation"] = [o.get("shap_e_image") for o in bpy.data.objects if o.name not in names]
    FACTS["images_after_variation_unchanged"] = snapshot()["images"] == before["images"]
    FACTS["seen"] = seen
    FACTS["error"] = session.ui.error
    FACTS["image_prop"] = [o.get("shap_e_image") for o in bpy.data.objects if "shap_e_image" in o]


def sc_random_engine(zip_path, opts):
    """The real engine code path (vendored in the zip) with random weights, through the operators."""
    install(zip_path)
    session = sub("session")
    _random_mini_models()
    s = bpy.context.scene.shap_e
    s.prompt, s.count, s.grid_size, s.use_model_defaults, s.steps, s.guidance_scale = "a red cube", 1, "64", False, 4, 3.0
    bpy.context.preferences.addons[PKG].preferences.device = "cpu"
    before = snapshot()
    bpy.ops.ed.undo_push(message="before")
    try:
        FACTS["ret"] = sorted(bpy.ops.shap_e.generate(sync=True))
    except RuntimeError as err:
        FACTS["ret"] = ["RuntimeError", str(err)]
    job = session.runner.active
    FACTS["status"] = job.status
    FACTS["steps_seen"] = [job.progress.step, job.progress.total]
    FACTS["preview"] = None if job.preview is None else list(job.preview.shape)
    FACTS["error"] = [session.ui.error, session.ui.hint]
    new = [o for o in bpy.data.objects if o.name not in before["objects"]]
    FACTS["new_objects"] = [mesh_facts(o) for o in new]
    if new:
        lat = sub("mesh_import").load_latent(new[0])
        FACTS["latent_size"] = int(lat.size)
        bpy.context.view_layer.objects.active = new[0]
        FACTS["redecode_ret"] = sorted(bpy.ops.shap_e.redecode(grid_size=32, sync=True))
        FACTS["redecoded"] = mesh_facts(new[0])
    # Cancel mid-run in the real sampler (worker thread, drained here like the timer would).
    s.steps = 64
    snap = snapshot()
    bpy.ops.shap_e.generate(sync=False)
    job = session.runner.active
    FACTS["reached_step2"] = drain_until(session, lambda: job.progress.step >= 2 or job.finished, timeout=120)
    FACTS["cancel_step"] = job.progress.step
    bpy.ops.shap_e.cancel()
    job.join(120)
    drain_until(session, lambda: job.finished, timeout=30)
    FACTS["cancel_status"] = job.status
    FACTS["cancel_unchanged"] = snapshot() == snap


def sc_blend(zip_path, opts):
    """Blend between two generated objects: in-betweens decoded from the mixed latents, on the line between them,
    one undo step; refused for objects of different models; Variations refused on a blend."""
    install(zip_path)
    session = sub("session")
    mesh_import = sub("mesh_import")
    s = bpy.context.scene.shap_e
    if opts.get("fake"):
        fake_engine(session, sub("engine_shim").get_engine())
        s.input_mode, s.prompt, s.count = "TEXT", "a red cube", 2
        _generate(session, s)
    else:  # two prompts, side by side
        s.input_mode, s.count = "TEXT", 1
        for prompt, x in (("a red cube", -1.0), ("a blue sphere", 1.0)):
            bpy.context.scene.cursor.location = (x, 0.0, 0.0)
            s.prompt = prompt
            _generate(session, s)
    a, b = sorted((o for o in bpy.data.objects if mesh_import.is_generated(o)), key=lambda o: o.location.x)
    view_layer = bpy.context.view_layer
    mesh_import.select_only(view_layer, [b])
    FACTS["poll_one_selected"] = bpy.ops.shap_e.blend.poll()
    mesh_import.select_only(view_layer, [a, b])  # a active
    names = (a.name, b.name)
    FACTS["ends"] = [list(a.location), list(b.location)]
    za, zb = mesh_import.load_latent(a), mesh_import.load_latent(b)
    bpy.ops.ed.undo_push(message="before blend")
    before = snapshot()
    FACTS["ret"] = sorted(bpy.ops.shap_e.blend(count=int(opts.get("count", 3)), sync=True))
    FACTS["info"], FACTS["error"] = session.ui.info, session.ui.error
    new = sorted((o for o in bpy.data.objects if o.name not in before["objects"]), key=lambda o: o.location.x)
    FACTS["blends"] = [mesh_facts(o) for o in new]
    FACTS["latent_err"] = [float(np.abs(mesh_import.load_latent(o) - ((1 - t) * za + t * zb)).max())
                           for o, t in zip(new, session.blend_fractions(len(new)))]
    FACTS["selected"] = sorted(o.name for o in bpy.context.selected_objects)
    FACTS["new_names"] = sorted(o.name for o in new)
    if new:
        view_layer.objects.active = new[0]
        FACTS["variations_poll_on_blend"] = bpy.ops.shap_e.variations.poll()
    FACTS["end_colors"] = [mesh_facts(o)["color_mean"] for o in (a, b)]
    bpy.ops.ed.undo()
    FACTS["after_undo_equal"] = snapshot() == before
    # two models' latents do not mix: a reported error and nothing changed
    a, b = (bpy.data.objects[n] for n in names)  # undo rebuilt every datablock
    mesh_import.select_only(bpy.context.view_layer, [a, b])
    b[mesh_import.PREFIX + "model"] = "text300M"
    before = snapshot()
    try:
        FACTS["mixed_ret"] = sorted(bpy.ops.shap_e.blend(count=2, sync=True))
    except RuntimeError as err:  # an operator's ERROR report raises under the wheel
        FACTS["mixed_ret"] = ["CANCELLED", str(err)]
    FACTS["mixed_error"] = [session.ui.error, session.ui.hint]
    FACTS["mixed_unchanged"] = snapshot() == before


SCENARIOS = {"blend": sc_blend, "ui": sc_ui, "image_input": sc_image_input, "random_engine": sc_random_engine, "install": sc_install, "bad_inputs": sc_bad_inputs, "generate": sc_generate, "undo": sc_undo,
             "cancel": sc_cancel}


def main() -> int:
    name, zip_path, out = sys.argv[1:4]
    opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    try:
        SCENARIOS[name](zip_path, opts)
        FACTS["ok"] = True
    except Exception:
        FACTS["ok"] = False
        FACTS["traceback"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(FACTS, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
