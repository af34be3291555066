"""Benchmark: full-size decoder latent -> coloured mesh, ours (dense / narrowband) vs diffusers' ShapERenderer.

Usage:  python bench/bench_decode.py [--device cpu|cuda] [--grids 64 128 256]
                                     [--impls dense narrowband interp diffusers]
                                     [--model full|mini] [--q1-lattice Q --q1-generic Q] [--threads N]

Impls: ``dense`` and ``narrowband`` query the colour at every vertex (official); ``interp`` is the narrow band
with colours interpolated from the grid corners' (``vertex_colors='interpolate'``, the default from grid 128).
Every configuration runs in its own subprocess. The decoder is the full-size one (226 M parameters; ``--model
mini`` takes engine.mini_config.MINI_DECODER instead) with random weights, edited like the reference fixture so the
field is a smooth blob with ~15 % of the box inside (LayerNorm gains x16, layers 4-6 x4, posenc columns of octaves
>= 2 zeroed in the first projection, SDF bias shifted); the same weights are mapped into diffusers' ShapERenderer.
Its marching-cubes table buffers are only filled from a checkpoint, so this script derives an equivalent 256-case
table itself (iso-contour loops traced over the cube faces, ambiguous faces separating the inside corners,
fan-triangulated, wound outward). Seconds count latent -> mesh with vertex colours, after one untimed grid-24
warm-up of ours (lazy imports, BLAS start-up); the model build is not timed.
On CUDA, ours runs under fp16 autocast and diffusers' renderer in fp16 (its pipeline's torch_dtype=float16).

Columns: SDF / colour queries (field evaluations: the load-independent measure of the work), wall seconds, CPU
seconds (process time, all threads), decode RSS peak (sampled every 5 ms during the decode, above the model's RSS;
``RSS max`` is the process maximum including the model build), ``x diff`` = diffusers' seconds / ours at the same
grid in this run, and ``idle est`` = an estimate for an idle 2-core machine:

    idle est = SDF queries / (threads * q1_lattice) + colour queries / (threads * q1_generic) + non-field CPU s

q1 = single-thread queries per second of ``PackedField`` (grid points / off-grid points), measured by this script
with process time (best of 5) unless given; measure them in a quiet moment (``--calibrate`` prints them) and pass
them in. Non-field CPU s = process time outside the field calls (grid bookkeeping, marching cubes; one thread).
It assumes the field queries scale to ``threads`` workers, which they do on an idle machine (separate
single-threaded workers, no per-op barriers). For diffusers rows the idle column is the issue author's measurement
on an idle 2-core machine (grid 64: 2.4 s, 128: 16.8 s, 256: 181 s at 9.2 GB RSS), given when diffusers is not re-run
(its grid-256 run takes minutes even idle); ``x diff idle`` compares our estimate with it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import DecoderConfig  # noqa: E402
from engine.geometry.extract import decoder_field_fns, extract_mesh_from_field, grid_points  # noqa: E402
from engine.mini_config import MINI_DECODER  # noqa: E402
from engine.models.implicit_decoder import ImplicitDecoder, PackedField, query_field  # noqa: E402

SEED = 0
INSIDE_FRACTION = 0.15
# The issue author's diffusers ShapERenderer.decode_to_mesh measurements, idle 2-core CPU: grid -> (s, RSS GB).
DIFFUSERS_IDLE = {64: (2.4, None), 128: (16.8, None), 256: (181.0, 9.2)}


def build_decoder(device: str, cfg: DecoderConfig | None = None) -> tuple[ImplicitDecoder, torch.Tensor]:
    torch.manual_seed(SEED)  # benchmark script, not library code
    cfg = cfg or DecoderConfig()
    dec = ImplicitDecoder(cfg)
    with torch.no_grad():
        for proj in dec.params_proj.projections.values():
            proj.norm.weight.mul_(16.0)
        for i in (4, 5, 6):
            dec.renderer.nerstf.mlp[i].weight.mul_(4.0)
        first = dec.params_proj.projections["nerstf__mlp__0__weight"]
        cols = torch.ones(cfg.nerstf.d_posenc, dtype=torch.bool)  # [xyz(3), sin(45), cos(45)], octave-major
        for block in (3, 3 + 45):
            cols[block + 3 * 2: block + 45] = False  # octaves >= 2
        first.norm.weight[~cols] = 0
        first.norm.bias[~cols] = 0
        first.proj.bias.view(cfg.nerstf.d_hidden, -1)[:, ~cols] = 0
        latent = torch.tanh(torch.randn(cfg.d_latent))
        pts = torch.linspace(-1, 1, 24)
        grid = torch.stack(torch.meshgrid(pts, pts, pts, indexing="ij"), -1).reshape(1, -1, 3)
        params = dec.project(latent)
        h = query_field(params, grid, decoder=dec, outputs=("sdf",))["sdf"]
        raw = torch.atanh(h.clamp(-1 + 1e-7, 1 - 1e-7)).reshape(-1)  # pre-activation (saturated values are fine)
        dec.renderer.nerstf.mlp[6].bias[0] -= torch.quantile(raw.double(), 1 - INSIDE_FRACTION).float()
    return dec.to(device).eval(), latent.to(device)


# ---------------------------------------------------------------------------------------------------------------
# An equivalent marching-cubes table for diffusers (corner bit = x + 2y + 4z; edge numbering of its MeshDecoder)

EDGES = [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7)]
FACES = [(0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5)]  # corner cycles


def _corner(c: int) -> np.ndarray:
    return np.array([c & 1, (c >> 1) & 1, (c >> 2) & 1], dtype=np.float64)


def mc_table() -> tuple[torch.Tensor, torch.Tensor]:
    edge_id = {frozenset(e): i for i, e in enumerate(EDGES)}
    cases = torch.zeros(256, 5, 3, dtype=torch.long)
    masks = torch.zeros(256, 5, dtype=torch.bool)
    for case in range(256):
        inside = [(case >> c) & 1 == 1 for c in range(8)]
        nbrs: dict[int, list[int]] = {}
        for cyc in FACES:
            sides = [edge_id[frozenset((cyc[i], cyc[(i + 1) % 4]))] for i in range(4)]  # side i joins corner i, i+1
            crossing = [s for i, s in enumerate(sides) if inside[cyc[i]] != inside[cyc[(i + 1) % 4]]]
            if len(crossing) == 2:
                pairs = [tuple(crossing)]
            elif len(crossing) == 4:  # ambiguous face: cut off each inside corner
                pairs = [(sides[(i - 1) % 4], sides[i]) for i in range(4) if inside[cyc[i]]]
            else:
                pairs = []
            for a, b in pairs:
                nbrs.setdefault(a, []).append(b)
                nbrs.setdefault(b, []).append(a)
        tris, seen = [], set()
        for start in sorted(nbrs):
            if start in seen:
                continue
            loop, prev, cur = [start], None, start
            seen.add(start)
            while True:
                nxt = [n for n in nbrs[cur] if n != prev][0] if prev is not None else nbrs[cur][0]
                if nxt == start:
                    break
                loop.append(nxt)
                seen.add(nxt)
                prev, cur = cur, nxt
            tris += [(loop[0], loop[i], loop[i + 1]) for i in range(1, len(loop) - 1)]
        assert len(tris) <= 5, (case, tris)
        for j, tri in enumerate(tris):
            mids = [(_corner(EDGES[e][0]) + _corner(EDGES[e][1])) / 2 for e in tri]
            normal = np.cross(mids[1] - mids[0], mids[2] - mids[0])
            out = sum((_corner(EDGES[e][0]) - _corner(EDGES[e][1])) * (-1 if inside[EDGES[e][0]] else 1)
                      for e in tri)
            cases[case, j] = torch.tensor(tri if normal @ out > 0 else (tri[0], tri[2], tri[1]))
            masks[case, j] = True
    return cases, masks


def build_diffusers(dec: ImplicitDecoder, device: str):
    from diffusers.pipelines.shap_e.renderer import ShapERenderer

    renderer = ShapERenderer()
    sd = {}
    for k, v in dec.state_dict().items():
        if k.startswith("params_proj."):
            sd[k] = v
        elif k.startswith("renderer.nerstf."):
            sd["mlp." + k[len("renderer.nerstf."):]] = v
        elif k == "renderer.void.background":
            sd["void.background"] = v
    sd["mesh_decoder.cases"], sd["mesh_decoder.masks"] = mc_table()
    renderer.load_state_dict(sd, strict=True)
    renderer = renderer.to(device).eval()
    return renderer.half() if device == "cuda" else renderer


# ---------------------------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class _RssSampler(threading.Thread):
    """Peak resident set size while the decode runs (ru_maxrss would include the model build)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = _rss_mb(), threading.Event()

    def run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())


def calibrate(dec: ImplicitDecoder, latent: torch.Tensor, n: int = 8192) -> tuple[float, float]:
    """Single-thread PackedField queries per second (process time, best of 5): grid points, off-grid points."""
    with torch.no_grad():
        field = PackedField(dec.project(latent.reshape(1, -1)), dec.static_weights(), threads=1,
                            lattice=torch.linspace(-1, 1, 64))
    on_grid = grid_points(64)[torch.randperm(64 ** 3, generator=torch.Generator().manual_seed(0))[:n]]
    off_grid = on_grid + 0.3 / 64  # like mesh vertices' colour queries (the generic layer-0 path)
    rates = []
    for pts in (on_grid, off_grid):
        best = float("inf")
        for _ in range(5):
            t0 = time.process_time()
            field.sdf(pts)
            best = min(best, time.process_time() - t0)
        rates.append(n / best)
    return rates[0], rates[1]


def _timed(fn, acc: dict):
    def wrapped(points):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(points)
        acc["wall"] += time.perf_counter() - w0
        acc["cpu"] += time.process_time() - c0
        return out
    return wrapped


def child(impl: str, grid: int, device: str, model: str, calib: bool) -> dict:
    dec, latent = build_decoder(device, MINI_DECODER if model == "mini" else None)
    out: dict = {"impl": impl, "grid": grid}
    if calib and impl != "diffusers":
        out["q1_lattice"], out["q1_generic"] = calibrate(dec, latent)
    if impl == "diffusers":
        renderer = build_diffusers(dec, device)
        del dec
        latent = latent.reshape(1, 1024, 1024).to(next(renderer.parameters()).dtype)
    else:  # warm-up (lazy imports such as skimage's marching cubes, BLAS/thread start-up), not timed
        with torch.no_grad():
            extract_mesh_from_field(*decoder_field_fns(dec, latent, device=device, grid_size=24)[:1], 24,
                                    device=device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out["rss_model_mb"] = _rss_mb()
    sampler = _RssSampler()
    sampler.start()
    acc = {"wall": 0.0, "cpu": 0.0}
    stats: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if impl == "diffusers":
            mesh = renderer.decode_to_mesh(latent, device, grid_size=grid)
            n_v, n_f = len(mesh.verts), len(mesh.faces)
            stats = {"queries": grid ** 3, "color_queries": n_v}
        else:  # what engine.geometry.extract.extract_mesh does, with the field calls timed
            sdf_fn, color_fn, sdf_color_fn = decoder_field_fns(dec, latent, device=device, grid_size=grid)
            mesh = extract_mesh_from_field(_timed(sdf_fn, acc), grid, color_fn=_timed(color_fn, acc),
                                           sdf_color_fn=_timed(sdf_color_fn, acc),
                                           vertex_colors="interpolate" if impl == "interp" else "query",
                                           method="narrowband" if impl == "interp" else impl,
                                           device=device, stats=stats)
            n_v, n_f = len(mesh.vertices), len(mesh.faces)
    if device == "cuda":
        torch.cuda.synchronize()
    out.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, vertices=n_v, faces=n_f,
               sdf_queries=stats["queries"], color_queries=stats["color_queries"], field_cpu=acc["cpu"],
               field_wall=acc["wall"], threads=torch.get_num_threads())
    sampler.stop.set()
    sampler.join()
    out["rss_decode_peak_mb"] = sampler.peak - out["rss_model_mb"]
    out["rss_max_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def idle_estimate(r: dict, q1_lattice: float, q1_generic: float) -> float | None:
    if r["impl"] == "diffusers":
        return DIFFUSERS_IDLE.get(r["grid"], (None, None))[0]
    non_field = max(0.0, r["cpu_seconds"] - r["field_cpu"])
    return (r["sdf_queries"] / q1_lattice + r["color_queries"] / q1_generic) / r["threads"] + non_field


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--grids", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--impls", nargs="+", default=["interp", "narrowband", "dense", "diffusers"],
                    choices=["dense", "narrowband", "interp", "diffusers"])
    ap.add_argument("--model", default="full", choices=["full", "mini"])
    ap.add_argument("--q1-lattice", type=float, help="single-thread grid-point queries/s measured when quiet")
    ap.add_argument("--q1-generic", type=float, help="single-thread off-grid queries/s measured when quiet")
    ap.add_argument("--calibrate", action="store_true", help="only measure and print q1 (run it when quiet)")
    ap.add_argument("--threads", type=int, help="torch threads in the children (default: torch's default)")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "GRID"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "mini" and "diffusers" in args.impls:
        args.impls.remove("diffusers")  # diffusers' renderer has the fixed full-size layout
    if args.child:
        calib = args.q1_lattice is None
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.device, args.model, calib)),
              flush=True)
        return
    if args.calibrate:
        dec, latent = build_decoder("cpu", MINI_DECODER if args.model == "mini" else None)
        q_l, q_g = calibrate(dec, latent)
        print(f"q1 ({args.model} decoder, one thread, process time): grid points {q_l:.0f}/s, off-grid {q_g:.0f}/s "
              f"(load average {os.getloadavg()[0]:.1f})")
        return
    rows = []
    for grid in args.grids:
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--device", args.device, "--model", args.model,
                   "--child", impl, str(grid)]
            if args.q1_lattice:
                cmd += ["--q1-lattice", str(args.q1_lattice), "--q1-generic", str(args.q1_generic)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            load = os.getloadavg()[0]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"[{impl} G={grid}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[0][7:]) | {"load": load})
            r = rows[-1]
            print(f"  done {impl:>10} G={grid:<4} {r['seconds']:8.2f} s (load average {load:.1f})", file=sys.stderr,
                  flush=True)
    # Without given values: the best (least disturbed) of the children's own measurements.
    q_l = args.q1_lattice or max((r.get("q1_lattice", 0.0) for r in rows), default=0.0)
    q_g = args.q1_generic or max((r.get("q1_generic", 0.0) for r in rows), default=0.0)
    src = "given" if args.q1_lattice else "best measured in this run"
    print(f"\nlatent -> coloured mesh, {args.model} decoder, device {args.device}, threads "
          f"{rows[0]['threads'] if rows else '?'}; q1 ({src}, one thread): grid {q_l:.0f}/s, off-grid {q_g:.0f}/s")
    head = (f"{'grid':>4} {'impl':>10} {'SDF q':>9} {'colour q':>8} {'seconds':>8} {'CPU s':>7} {'load':>5} "
            f"{'RSS dec MB':>10} {'RSS max MB':>10} {'x diff':>7} {'idle est s':>10} {'x diff idle':>11}")
    if args.device == "cuda":
        head += f" {'CUDA peak MB':>12}"
    print(head)
    for r in rows:
        ref = next((x["seconds"] for x in rows if x["grid"] == r["grid"] and x["impl"] == "diffusers"), None)
        speed = f"{ref / r['seconds']:6.1f}x" if ref else f"{'-':>7}"
        est = idle_estimate(r, q_l, q_g) if q_l and q_g else None
        ref_idle = DIFFUSERS_IDLE.get(r["grid"], (None, None))[0] if args.model == "full" else None
        speed_idle = f"{ref_idle / est:10.1f}x" if est and ref_idle else f"{'-':>11}"
        est_s = f"{est:10.2f}" if est else f"{'-':>10}"
        line = (f"{r['grid']:>4} {r['impl']:>10} {r['sdf_queries']:>9} {r['color_queries']:>8} {r['seconds']:8.2f} "
                f"{r['cpu_seconds']:7.2f} {r['load']:5.1f} {r['rss_decode_peak_mb']:10.0f} {r['rss_max_mb']:10.0f} "
                f"{speed} {est_s} {speed_idle}")
        if args.device == "cuda":
            line += f" {r['cuda_peak_mb']:>12.0f}"
        print(line)
    if any(r["impl"] == "diffusers" for r in rows) or args.model == "mini":
        return
    print("diffusers not re-run; the issue author's idle measurements: "
          + ", ".join(f"G={g}: {s} s" + (f" at {m} GB" if m else "") for g, (s, m) in DIFFUSERS_IDLE.items()))


if __name__ == "__main__":
    main()
