"""The job in flight and its main-thread side: start, drain (timer), finish (insert / replace), errors for the UI.

Flow: an operator builds a request (requests.py) and calls ``start_*``; a worker thread (jobs.py) runs the
engine; ``drain()`` runs on the main thread from a ``bpy.app.timers`` function every 0.1 s, applies progress,
updates the preview and, when the job ends, builds the Blender objects and pushes exactly one undo step.
Under ``blender -b`` or the bpy wheel no timer fires: ``sync`` jobs finish inside the operator, and tests call
``drain()`` directly. The engine functions are injectable (``set_engine_functions``) so tests can use a double.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

import bpy
import numpy as np

from . import jobs, layout, mesh_import, preview, variety
from .engine_shim import engine_submodule, get_engine

TICK_S = 0.1
runner = jobs.JobRunner()
_generate_fn = None  # None: engine.generate
_decode_fn = None  # None: engine.decode_latent


@dataclass
class UiState:
    error: str = ""
    hint: str = ""
    info: str = ""
    last_tick_ms: float = 0.0


ui = UiState()


def set_engine_functions(generate=None, decode=None) -> None:
    """Test seam: replace engine.generate / engine.decode_latent (None restores the real engine)."""
    global _generate_fn, _decode_fn
    _generate_fn, _decode_fn = generate, decode


def report_error(err: BaseException) -> None:
    """Show an error in the panel: the message and a hint that says what to do."""
    hint = getattr(err, "hint", "")
    msg = str(err).split("\n  -> ")[0] if hint else str(err)
    if isinstance(err, ModuleNotFoundError):
        msg = f"Python package '{err.name}' is missing"
        hint = "Edit > Preferences > Add-ons > Shap-E > Install Dependencies, then restart Blender"
    elif isinstance(err, MemoryError) or "out of memory" in msg.lower():
        hint = hint or "Lower the grid size or Count, or set Device to CPU in the add-on preferences"
    elif not hint:
        hint = "Unexpected error: the system console has the details; please report it"
        traceback.print_exception(err)
    ui.error, ui.hint, ui.info = msg, hint, ""


def clear_error() -> None:
    ui.error = ui.hint = ""


def _ensure_timer() -> None:
    if not bpy.app.timers.is_registered(timer_tick):
        bpy.app.timers.register(timer_tick, first_interval=TICK_S, persistent=True)


def _start(task, *, label: str, kind: str, payload: dict, sync: bool) -> jobs.Job:
    clear_error()
    ui.info = ""
    preview.clear()
    job = runner.start(task, label=label, kind=kind, payload=payload, sync=sync)
    if sync:
        drain(budget_s=float("inf"))
    else:
        _ensure_timer()
    return job


def start_generate(request, *, scene, location, spacing: float, layout_mode: str = "grid",
                   image_path: str | None = None, reference_latent=None, sync: bool = False) -> jobs.Job:
    """``reference_latent``: Variations' source object's latent, to tell the user when seeds repeat it."""
    gen = _generate_fn or get_engine().generate
    payload = dict(scene=scene.name, location=tuple(location), spacing=spacing, layout=layout_mode,
                   request=request, image_path=image_path, reference_latent=reference_latent)
    label = request.prompt or request.image_name or "image"

    def task(ctx: jobs.JobContext):
        with jobs.capture_notices(ctx):
            return gen(request, on_step=ctx.on_step, should_cancel=ctx.should_cancel)

    return _start(task, label=f"Generating '{label}'", kind="generate", payload=payload, sync=sync)


def start_redecode(obj, latent, *, grid_size: int, device: str, sync: bool = False) -> jobs.Job:
    dec = _decode_fn or get_engine().decode_latent
    model = obj.get(mesh_import.PREFIX + "model", "mini")

    def task(ctx: jobs.JobContext):
        ctx.report(0.0, f"Decoding at grid {grid_size}")
        rec = dec(latent, model=model, grid_size=grid_size, device=device)
        ctx.check_cancel()
        return rec

    return _start(task, label=f"Re-decoding '{obj.name}'", kind="redecode",
                  payload=dict(object=obj.name, grid_size=grid_size), sync=sync)


def blend_fractions(count: int) -> list[float]:
    """Where ``count`` in-betweens sit between two objects: evenly, ends excluded."""
    return [i / (count + 1) for i in range(1, count + 1)]


def start_blend(a, b, latent_a, latent_b, *, count: int, grid_size: int, device: str, spacing: float,
                sync: bool = False) -> jobs.Job:
    """Decode ``count`` latents mixed linearly from ``a``'s to ``b``'s (one model's latent space) in the worker;
    the objects appear on the line from ``a`` to ``b`` as one undo step."""
    dec = _decode_fn or get_engine().decode_latent
    model = a.get(mesh_import.PREFIX + "model", "mini")
    fractions = blend_fractions(count)
    za, zb = (np.asarray(z, np.float32).reshape(-1) for z in (latent_a, latent_b))

    def task(ctx: jobs.JobContext):
        out = []
        for i, t in enumerate(fractions):
            ctx.report(i / len(fractions), f"Decoding blend {i + 1} of {len(fractions)}")
            out.append(dec((1 - t) * za + t * zb, model=model, grid_size=grid_size, device=device))
            ctx.check_cancel()
        return out

    payload = dict(scene=bpy.context.scene.name, names=(a.name, b.name), fractions=fractions, model=model,
                   grid_size=grid_size, spacing=spacing, locations=(tuple(a.location), tuple(b.location)))
    return _start(task, label=f"Blending '{a.name}' and '{b.name}'", kind="blend", payload=payload, sync=sync)


def start_task(task, *, label: str, kind: str, sync: bool = False) -> jobs.Job:
    """Any other background work (model download, dependency install)."""
    return _start(task, label=label, kind=kind, payload={}, sync=sync)


def cancel() -> None:
    runner.cancel()


def timer_tick():
    drain()
    return TICK_S if runner.busy else None


def drain(budget_s: float = 0.010) -> str | None:
    """Main-thread pump. Returns the job's final status when it ended during this call, else None."""
    job = runner.active
    if job is None or job.finished:
        return None
    t0 = time.perf_counter()
    serial = job.preview_serial
    status = job.drain(budget_s)
    if job.preview_serial != serial:
        preview.update(job.preview)
    if status is not None:
        try:
            _finish(job)
        except Exception as err:  # noqa: BLE001 - an insert failure must reach the panel
            report_error(err)
    ui.last_tick_ms = (time.perf_counter() - t0) * 1000.0
    _redraw()
    return status


def _finish(job: jobs.Job) -> None:
    if job.status == jobs.CANCELLED:
        ui.info = "Cancelled: nothing was changed"
    elif job.status == jobs.FAILED:
        report_error(job.error)
    elif job.kind == "generate":
        _insert_generated(job)
    elif job.kind == "redecode":
        _apply_redecode(job)
    elif job.kind == "blend":
        _insert_blend(job)
    else:
        if job.kind == "download":
            from .properties import model_infos

            model_infos(refresh=True)
        ui.info = job.progress.text or f"{job.label}: done"


def _metadata(rec, req, image_path=None) -> dict:
    from . import __version__

    r = rec.request or req
    return dict(prompt=r.prompt, image=r.image_name, seed=int(rec.seed if rec.seed is not None else r.seed),
                steps=r.steps, guidance=None if r.guidance_scale is None else float(r.guidance_scale),
                model=rec.model or r.model, grid_size=int(rec.grid_size or r.grid_size), sampler=r.sampler,
                image_path=image_path, version=__version__)


def object_name(req) -> str:
    base = (req.prompt or req.image_name or "image").strip()
    return "Shap-E " + (base[:40] if len(base) <= 40 else base[:39] + "…")


def _insert_generated(job: jobs.Job) -> None:
    p = job.payload
    req = p["request"]
    records = [r for r in job.result if _has_surface(r)]
    if not records:
        raise get_engine().EngineError("The model produced no surface for this input",
                                       "Try another seed, more steps or a higher guidance scale")
    scene = bpy.data.scenes.get(p["scene"]) or bpy.context.scene
    offsets = (layout.grid_offsets(len(records), p["spacing"]) if p["layout"] == "grid"
               else layout.beside_offsets(len(records), p["spacing"]))
    objs = []
    for rec, off in zip(records, offsets):
        loc = tuple(a + b for a, b in zip(p["location"], off))
        objs.append(mesh_import.create_object(rec, name=object_name(req), collection=scene.collection,
                                              location=loc, meta=_metadata(rec, req, p.get("image_path"))))
    _select(scene, objs)
    scene.shap_e.last_seed = int(records[0].seed if records[0].seed is not None else req.seed)
    job.payload["objects"] = [o.name for o in objs]
    skipped = len(job.result) - len(records)
    engine_variety = engine_submodule("variety")
    reference = p.get("reference_latent")
    alike = engine_variety.repeats([r.latent for r in records], reference)
    ui.info = variety.message(len(objs), alike, variations=reference is not None, hint=engine_variety.HINT)
    if skipped:
        ui.info += f"; {skipped} variant(s) had no surface"
    undo_push("Shap-E: Generate")


def _has_surface(rec) -> bool:
    return not getattr(rec, "empty", False) and len(rec.faces) > 0


def _select(scene, objs) -> None:
    """Select exactly ``objs``, the first active. A timer callback may run without a window, hence without
    context.view_layer."""
    view_layer = getattr(bpy.context, "view_layer", None) if bpy.context.scene == scene else None
    mesh_import.select_only(view_layer or scene.view_layers[0], objs)


def _insert_blend(job: jobs.Job) -> None:
    from mathutils import Vector

    from . import __version__

    p = job.payload
    made = [(t, r) for t, r in zip(p["fractions"], job.result) if _has_surface(r)]
    if not made:
        raise get_engine().EngineError("None of the blends has a surface", "Try more steps between, or another grid")
    scene = bpy.data.scenes.get(p["scene"]) or bpy.context.scene
    start, end = (Vector(loc) for loc in p["locations"])
    beside = layout.beside_offsets(len(made), p["spacing"])  # when both ends stand in one place
    objs = []
    for k, (t, rec) in enumerate(made):
        loc = start.lerp(end, t) if (end - start).length > 1e-6 else end + Vector(beside[k])
        meta = dict(blend=f"{p['names'][0]} + {p['names'][1]} at {t:.2f}", seed=-1, model=p["model"],
                    grid_size=int(p["grid_size"]), version=__version__)
        objs.append(mesh_import.create_object(rec, name=f"Shap-E blend {t:.2f}", collection=scene.collection,
                                              location=loc, meta=meta))
    _select(scene, objs)
    job.payload["objects"] = [o.name for o in objs]
    ui.info = f"Added {len(objs)} blend(s) between '{p['names'][0]}' and '{p['names'][1]}'"
    undo_push("Shap-E: Blend")


def _apply_redecode(job: jobs.Job) -> None:
    obj = bpy.data.objects.get(job.payload["object"])
    if obj is None:
        raise get_engine().EngineError("The object to re-decode was deleted or renamed", "Select it and retry")
    if not _has_surface(job.result):
        raise get_engine().EngineError("The re-decode produced no surface", "Try another grid size")
    mesh_import.replace_mesh(obj, job.result, job.payload["grid_size"])
    ui.info = f"Re-decoded '{obj.name}' at grid {job.payload['grid_size']}"
    undo_push("Shap-E: Re-decode")


def undo_push(message: str) -> None:
    """One undo step for data created outside an operator. A timer callback runs without a window in its
    context; the operator's poll wants one, so the first window is supplied."""
    ctx = bpy.context
    try:
        if ctx.window is None and ctx.window_manager and ctx.window_manager.windows:
            with ctx.temp_override(window=ctx.window_manager.windows[0]):
                bpy.ops.ed.undo_push(message=message)
        else:
            bpy.ops.ed.undo_push(message=message)
    except RuntimeError as err:  # the objects exist; only the undo step is missing
        print(f"[shap-e] could not push an undo step: {err}")


def _redraw() -> None:
    wm = bpy.context.window_manager
    for win in (wm.windows if wm else []):
        for area in win.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()


def draw_job_status(layout_, kinds=None) -> None:
    """Progress bar + Cancel while a job runs; the last error (with its hint) or info otherwise."""
    job = runner.active
    if job is not None and not job.finished and (kinds is None or job.kind in kinds):
        box = layout_.box()
        box.label(text=job.label, icon="SORTTIME")
        text = job.progress.text or "Starting (loading the model)…"
        if hasattr(box, "progress"):
            box.progress(text=text, factor=job.progress.fraction, type="BAR")
        else:
            box.label(text=f"{text} ({job.progress.fraction:.0%})")
        for note in job.notices[-3:]:
            for i, line in enumerate(_wrap(note, 60)):
                box.label(text=line, icon="INFO" if i == 0 else "BLANK1")
        box.operator("shap_e.cancel", icon="CANCEL")
        return
    if ui.error:
        box = layout_.box()
        box.alert = True
        box.label(text=ui.error, icon="ERROR")
        for line in _wrap(ui.hint, 60):
            box.label(text=line, icon="BLANK1")
        box.operator("shap_e.dismiss_error", icon="X")
    elif ui.info:
        for i, line in enumerate(_wrap(ui.info, 60)):
            layout_.label(text=line, icon="INFO" if i == 0 else "BLANK1")


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


@bpy.app.handlers.persistent
def _on_load_pre(*_args) -> None:
    """Opening another file cancels the job: its result belongs to the file it was started in."""
    if runner.busy:
        runner.cancel()
        ui.info = "Cancelled: another file was opened"


def register() -> None:
    if _on_load_pre not in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.append(_on_load_pre)


def unregister() -> None:
    if _on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_on_load_pre)
    runner.cancel()
    if runner.active is not None:
        runner.active.join(5.0)
    runner.clear()
    if bpy.app.timers.is_registered(timer_tick):
        bpy.app.timers.unregister(timer_tick)
    clear_error()
    ui.info = ""


classes = ()
