"""Benchmark: full-size decoder latent -> coloured mesh, ours (dense / narrowband) vs diffusers' ShapERenderer.

Usage:  python bench/bench_decode.py [--device cpu|cuda] [--grids 64 128 256] [--impls dense narrowband diffusers]

Every configuration runs in its own subprocess so its peak RSS is its own. The decoder is the full-size one
(226 M parameters) with random weights, edited like the reference fixture so the field is a smooth blob with
~15 % of the box inside (LayerNorm gains x16, layers 4-6 x4, posenc columns of octaves >= 2 zeroed in the first
projection, SDF bias shifted); the same weights are mapped into diffusers' ShapERenderer. Its marching-cubes
table buffers are only filled from a checkpoint, so this script derives an equivalent 256-case table itself
(iso-contour loops traced over the cube faces, ambiguous faces separating the inside corners, fan-triangulated,
wound outward). Seconds count latent -> mesh with vertex colours; the model build is not timed.
On CUDA, ours runs under fp16 autocast and diffusers' renderer in fp16 (its pipeline's torch_dtype=float16).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import DecoderConfig  # noqa: E402
from engine.geometry.extract import extract_mesh  # noqa: E402
from engine.models.implicit_decoder import ImplicitDecoder, query_field  # noqa: E402

SEED = 0
INSIDE_FRACTION = 0.15


def build_decoder(device: str) -> tuple[ImplicitDecoder, torch.Tensor]:
    torch.manual_seed(SEED)  # benchmark script, not library code
    cfg = DecoderConfig()
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


def child(impl: str, grid: int, device: str) -> dict:
    dec, latent = build_decoder(device)
    if impl == "diffusers":
        model = build_diffusers(dec, device)
        del dec
        latent = latent.reshape(1, 1024, 1024).to(next(model.parameters()).dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    stats: dict = {}
    with torch.no_grad():
        if impl == "diffusers":
            mesh = model.decode_to_mesh(latent, device, grid_size=grid)
            n_v, n_f = len(mesh.verts), len(mesh.faces)
        else:
            mesh = extract_mesh(dec, latent, grid_size=grid, method=impl, stats=stats)
            n_v, n_f = len(mesh.vertices), len(mesh.faces)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"impl": impl, "grid": grid, "seconds": seconds, "vertices": n_v, "faces": n_f,
           "rss_model_mb": rss_before, "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "queries": stats.get("queries", grid ** 3)}
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--grids", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--impls", nargs="+", default=["dense", "narrowband", "diffusers"],
                    choices=["dense", "narrowband", "diffusers"])
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "GRID"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.device)), flush=True)
        return
    rows = []
    for grid in args.grids:
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--device", args.device, "--child", impl, str(grid)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"[{impl} G={grid}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[0][7:]))
            r = rows[-1]
            print(f"  done {impl:>10} G={grid:<4} {r['seconds']:8.2f} s", file=sys.stderr, flush=True)
    print(f"\nlatent -> coloured mesh, full-size decoder, device {args.device}, torch threads "
          f"{torch.get_num_threads()}")
    head = f"{'grid':>5} {'impl':>10} {'seconds':>9} {'x diffusers':>11} {'queries':>10} {'verts':>8} " \
           f"{'faces':>8} {'RSS model MB':>12} {'RSS peak MB':>11}"
    if args.device == "cuda":
        head += f" {'CUDA peak MB':>12}"
    print(head)
    for r in rows:
        ref = next((x["seconds"] for x in rows if x["grid"] == r["grid"] and x["impl"] == "diffusers"), None)
        speed = f"{ref / r['seconds']:10.1f}x" if ref else f"{'-':>11}"
        line = (f"{r['grid']:>5} {r['impl']:>10} {r['seconds']:9.2f} {speed} {r['queries']:>10} {r['vertices']:>8} "
                f"{r['faces']:>8} {r['rss_model_mb']:>12.0f} {r['rss_peak_mb']:>11.0f}")
        if args.device == "cuda":
            line += f" {r['cuda_peak_mb']:>12.0f}"
        print(line)


if __name__ == "__main__":
    main()
