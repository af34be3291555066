"""Add-on latency: "click Generate" -> object in the scene, and the main-thread cost of each timer tick.

    python bench/bench_addon.py [--runs 3] [--grid 64] [--prompt "a red cube"] [--engine-double]

Goes through the operator path in headless bpy (the wheel): bpy.ops.shap_e.generate(sync=False) starts the
worker thread, and this script plays Blender's timer, calling session.drain() every session.TICK_S seconds
(the interval the add-on registers). It reports per run: click -> object (async, as a user sees it), the same
request in sync mode, and the drain time per tick (median / max while sampling; the final tick builds the
object and pushes the undo step). Target: progress ticks <= 20 ms. The model is warmed up first.
``--engine-double`` swaps in a stand-in engine (no weights needed) to measure the add-on's own overhead only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _double(eng, steps=16, step_s=0.03):
    import numpy as np

    def generate(req, *, on_step=None, should_cancel=None):
        g = np.linspace(-1, 1, req.grid_size)
        x, y, z = np.meshgrid(g, g, g, indexing="ij")
        from skimage import measure

        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            time.sleep(step_s)
            on_step(eng.StepEvent(i, steps, 1.0, elapsed_s=time.perf_counter() - t0))
        v, f, _, _ = measure.marching_cubes(0.6 - np.sqrt(x**2 + y**2 + z**2), 0.0)
        v = v / (req.grid_size - 1) * 2 - 1
        return [eng.MeshRecord(v, f, np.full((len(v), 3), 0.5), latent=np.zeros(4096, np.float32), request=req,
                               seed=req.seed, model=req.model, grid_size=req.grid_size)]

    return generate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--grid", type=int, default=64, choices=(64, 128, 256))
    ap.add_argument("--prompt", default="a red cube")
    ap.add_argument("--engine-double", action="store_true", help="stand-in engine: add-on overhead only")
    args = ap.parse_args(argv)

    import bpy

    import shap_e_blender
    from shap_e_blender import session
    from shap_e_blender.engine_shim import get_engine

    bpy.ops.wm.read_factory_settings(use_empty=True)
    shap_e_blender.register()
    if args.engine_double:
        from shap_e_blender import properties

        session.set_engine_functions(generate=_double(get_engine()))
        properties._infos_cache = [("mini", "both", True, "engine double")]
    s = bpy.context.scene.shap_e
    s.prompt, s.model, s.grid_size, s.count, s.random_seed, s.seed = args.prompt, "mini", str(args.grid), 1, False, 0

    def clear():
        for o in list(bpy.data.objects):
            bpy.data.objects.remove(o)

    t0 = time.perf_counter()
    try:
        bpy.ops.shap_e.generate(sync=True)  # warm-up: loads the model once per process
    except RuntimeError:
        pass  # reported below from the panel state
    if session.ui.error:
        print(f"generate failed: {session.ui.error} -> {session.ui.hint}", file=sys.stderr)
        return 1
    print(f"warm-up (model load + first generate): {time.perf_counter() - t0:.2f} s")
    clear()

    rows = []
    for run in range(args.runs):
        t_sync = time.perf_counter()
        bpy.ops.shap_e.generate(sync=True)
        t_sync = time.perf_counter() - t_sync
        clear()

        before = len(bpy.data.objects)
        t_click = time.perf_counter()
        bpy.ops.shap_e.generate(sync=False)
        job = session.runner.active
        ticks, final_ms = [], None
        while True:
            time.sleep(session.TICK_S)
            t = time.perf_counter()
            status = session.drain()
            ms = (time.perf_counter() - t) * 1000
            if status is not None:
                final_ms = ms
                break
            ticks.append(ms)
        t_obj = time.perf_counter() - t_click
        assert len(bpy.data.objects) == before + 1, session.ui.error
        rows.append((run + 1, t_obj, t_sync, len(ticks) + 1, statistics.median(ticks) if ticks else 0.0,
                     max(ticks) if ticks else 0.0, final_ms, job.progress.total,
                     len(bpy.data.objects[-1].data.vertices)))
        clear()

    engine_name = "engine double" if args.engine_double else "mini, real engine"
    print(f"\nShap-E add-on latency ({engine_name}, grid {args.grid}, prompt {args.prompt!r}, "
          f"timer tick {session.TICK_S * 1000:.0f} ms)")
    hdr = ("run", "click->object s", "sync s", "ticks", "drain med ms", "drain max ms", "final tick ms",
           "steps", "verts")
    print(" | ".join(hdr))
    print(" | ".join("-" * len(h) for h in hdr))
    for r in rows:
        print(f"{r[0]:>3d} | {r[1]:>15.2f} | {r[2]:>6.2f} | {r[3]:>5d} | {r[4]:>12.3f} | {r[5]:>12.3f} | "
              f"{r[6]:>13.1f} | {r[7]:>5d} | {r[8]:>5d}")
    worst = max(r[5] for r in rows)
    print(f"\nprogress ticks: worst {worst:.3f} ms (target <= 20 ms): {'OK' if worst <= 20 else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
