"""Evaluation metrics of the mini model's world (MINI-DATASET.md "Evaluation").

* ``voxelize_mesh``: occupancy of the grid points linspace(-1, 1, res)^3 by ray parity, vectorised: every
  (triangle, grid column) pair whose column ray crosses the triangle's projection yields one crossing depth; a
  histogram + cumulative sum along the column gives the parity at every voxel. Done along X, Y and Z and combined by
  majority vote, so a hole or a non-manifold patch corrupts at most one of the three votes.
* ``shape_scores``: IoU against the 24 (shape, aspect) candidates at the canonical size (occupancy from the exact
  analytic SDF on the same grid), best over yaw in 5 degree steps for cube, pyramid and octahedron.
* ``mean_color_srgb`` / ``nearest_palette_color``: area-weighted mean vertex colour (linear, as glTF COLOR_0) ->
  sRGB -> nearest palette colour in CIELAB (D65).
* ``r_precision``: render the mesh with the mini CLIP's view and retrieve among the 288 canonical kind captions.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from engine.records import EngineError
from engine.training.captions import all_kind_captions
from engine.training.world import (
    ASPECTS, COLORS, SHAPES, YAWED_SHAPES, ObjectSpec, kind_from_index, linear_to_srgb,
    shape_params, signed_distance_tensors, srgb_to_linear,
)

YAW_STEP_DEG = 5


def _mesh_arrays(mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(vertices, faces, colours or None) from a MeshRecord-like object or a (vertices, faces[, colours]) tuple."""
    if isinstance(mesh, (tuple, list)):
        v, f = np.asarray(mesh[0], np.float64), np.asarray(mesh[1], np.int64)
        c = np.asarray(mesh[2], np.float64) if len(mesh) > 2 and mesh[2] is not None else None
    else:
        v, f = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
        c = np.asarray(mesh.vertex_colors, np.float64) if getattr(mesh, "vertex_colors", None) is not None else None
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise EngineError("a mesh needs vertices (V, 3) and faces (F, 3)", "pass a MeshRecord or (vertices, faces)")
    if len(f) and (f.min() < 0 or f.max() >= len(v)):
        raise EngineError("mesh faces index vertices that do not exist", "check the faces array")
    return v, f, c


def grid_points(res: int) -> torch.Tensor:
    """(res^3, 3) float64 grid points linspace(-1, 1, res), index order x-major (i, j, k) -> x_i, y_j, z_k."""
    lin = torch.linspace(-1, 1, res, dtype=torch.float64)
    return torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)


def _parity_along(v: np.ndarray, f: np.ndarray, res: int, axis: int) -> np.ndarray:
    """Occupancy (res, res, res) by parity of crossings of rays along ``axis`` through every grid column."""
    others = [a for a in range(3) if a != axis]
    lin = np.linspace(-1, 1, res)
    step = 2.0 / (res - 1)
    # A tiny irrational offset keeps the column rays off shared edges and vertices (no double counting).
    off = np.array([1.234567e-7, 2.718281e-7])
    tri = v[f]  # (F, 3, 3)
    a2 = tri[:, :, others] - off  # (F, 3, 2) projected, in the offset frame
    lo = np.clip(np.ceil((a2.min(1) + 1) / step - 1e-9), 0, res - 1).astype(np.int64)  # (F, 2) first column
    hi = np.clip(np.floor((a2.max(1) + 1) / step + 1e-9), 0, res - 1).astype(np.int64)
    n0, n1 = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0), np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    valid = (a2.max(1) >= -1).all(1) & (a2.min(1) <= 1).all(1)
    n0, n1 = n0 * valid, n1 * valid
    counts = n0 * n1
    tid = np.repeat(np.arange(len(f)), counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    i0 = lo[tid, 0] + local // np.maximum(n1[tid], 1)
    i1 = lo[tid, 1] + local % np.maximum(n1[tid], 1)
    p = np.stack([lin[i0], lin[i1]], -1)  # (P, 2)
    t = a2[tid]  # (P, 3, 2)
    e0, e1 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    det = e0[:, 0] * e1[:, 1] - e0[:, 1] * e1[:, 0]
    d = p - t[:, 0]
    safe = np.where(det == 0, 1.0, det)  # degenerate (edge-on) projections never count as crossings
    u = (d[:, 0] * e1[:, 1] - d[:, 1] * e1[:, 0]) / safe
    w = (e0[:, 0] * d[:, 1] - e0[:, 1] * d[:, 0]) / safe
    ok = (det != 0) & (u >= 0) & (w >= 0) & (u + w <= 1)
    depth_v = tri[tid, :, axis]  # (P, 3)
    z = depth_v[:, 0] + u * (depth_v[:, 1] - depth_v[:, 0]) + w * (depth_v[:, 2] - depth_v[:, 0])
    i0, i1, z = i0[ok], i1[ok], z[ok]
    k = np.clip(np.searchsorted(lin, z, side="right"), 0, res)  # first grid point above the crossing
    hist = np.zeros((res, res, res + 1), np.int32)
    np.add.at(hist, (i0, i1, k), 1)
    occ = (np.cumsum(hist, axis=2)[:, :, :res] % 2) == 1  # (res, res, res) indexed [other0, other1, axis]
    order = others + [axis]
    return np.transpose(occ, np.argsort(order))


def voxelize_mesh(vertices, faces, res: int = 64) -> np.ndarray:
    """Boolean occupancy (res, res, res) of the grid points linspace(-1, 1, res)^3 ([x, y, z] indexing)."""
    v, f, _ = _mesh_arrays((vertices, faces))
    if len(f) == 0:
        return np.zeros((res,) * 3, bool)
    votes = sum(_parity_along(v, f, res, a).astype(np.int8) for a in range(3))
    return votes >= 2


@lru_cache(maxsize=4)
def candidate_occupancies(res: int = 64) -> tuple[torch.Tensor, list[tuple[int, int, float]]]:
    """Occupancy (K, res^3) bool of every (shape, aspect[, yaw]) candidate, and their (shape, aspect, yaw_deg)."""
    pts = grid_points(res)[None].float()
    occs, meta = [], []
    for s in range(len(SHAPES)):
        yaws = range(0, 90, YAW_STEP_DEG) if s in YAWED_SHAPES else (0,)
        for a in range(len(ASPECTS)):
            prm = shape_params(s, a)[None].float()
            for y in yaws:
                d = signed_distance_tensors(torch.tensor([s]), prm, torch.tensor([math.radians(y)]), pts, fast=True)
                occs.append(d[0] < 0)
                meta.append((s, a, float(y)))
    return torch.stack(occs), meta


def _ious(occ: np.ndarray, cands: torch.Tensor) -> torch.Tensor:
    m = torch.from_numpy(np.ascontiguousarray(occ.reshape(-1))).float()
    inter = cands.float() @ m  # (K,)
    union = cands.sum(1).float() + m.sum() - inter
    return inter / union.clamp(min=1)


def shape_scores(mesh, res: int = 64, occupancy: np.ndarray | None = None) -> dict:
    """Best (shape, aspect) by IoU among the 24 candidates (best over yaw for the yawed shapes).

    Returns {'shape', 'aspect' (indices), 'iou' (best), 'yaw_deg', 'ious' (24,) best IoU per (shape, aspect) in
    shape-major order}.
    """
    if occupancy is None:
        v, f, _ = _mesh_arrays(mesh)
        occupancy = voxelize_mesh(v, f, res)
    cands, meta = candidate_occupancies(res)
    ious = _ious(occupancy, cands)
    best = torch.zeros(len(SHAPES) * len(ASPECTS))
    best_yaw = torch.zeros_like(best)
    for i, (s, a, y) in enumerate(meta):
        j = s * len(ASPECTS) + a
        if ious[i] > best[j]:
            best[j], best_yaw[j] = ious[i], y
    j = int(best.argmax())
    return {"shape": j // len(ASPECTS), "aspect": j % len(ASPECTS), "iou": float(best[j]),
            "yaw_deg": float(best_yaw[j]), "ious": best.numpy()}


def iou_with_target(mesh, spec: ObjectSpec, res: int = 64, occupancy: np.ndarray | None = None) -> float:
    """Best-over-yaw IoU of the mesh with the target's (shape, aspect) at the canonical size."""
    return float(shape_scores(mesh, res, occupancy)["ious"][spec.shape * len(ASPECTS) + spec.aspect])


def mean_color_srgb(mesh) -> np.ndarray:
    """Area-weighted mean vertex colour (linear in, each vertex weighted by a third of its faces' areas) -> sRGB."""
    v, f, c = _mesh_arrays(mesh)
    if c is None or len(f) == 0:
        raise EngineError("the mesh has no vertex colours or no faces", "evaluate a coloured, non-empty mesh")
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    w = np.zeros(len(v))
    np.add.at(w, f.reshape(-1), np.repeat(area / 3, 3))
    lin = (c * w[:, None]).sum(0) / max(w.sum(), 1e-12)
    return linear_to_srgb(torch.from_numpy(lin)).numpy()


def srgb_to_lab(srgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours (..., 3) in [0, 1]."""
    c = np.asarray(srgb, np.float64)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    e = 216 / 24389
    fx = np.where(xyz > e, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * fx[..., 1] - 16, 500 * (fx[..., 0] - fx[..., 1]), 200 * (fx[..., 1] - fx[..., 2])], -1)


def nearest_palette_color(srgb) -> int:
    """Index of the palette colour nearest in CIELAB (Euclidean, CIE76) to an sRGB colour."""
    pal = srgb_to_lab(np.array([c.srgb for c in COLORS]))
    return int(np.argmin(np.linalg.norm(pal - srgb_to_lab(np.asarray(srgb))[None], axis=1)))


def score_mesh(mesh, target: ObjectSpec, res: int = 64) -> dict:
    """Shape accuracy, IoU and colour accuracy of one generated mesh against its prompt's target."""
    v, f, _ = _mesh_arrays(mesh)
    if len(f) == 0:
        return {"shape_correct": False, "iou": 0.0, "color_correct": False, "pred_shape": -1, "pred_aspect": -1,
                "pred_color": -1, "yaw_deg": None}
    occ = voxelize_mesh(v, f, res)
    sc = shape_scores(mesh, res, occ)
    col = nearest_palette_color(mean_color_srgb(mesh))
    return {"shape_correct": sc["shape"] == target.shape and sc["aspect"] == target.aspect,
            "iou": float(sc["ious"][target.shape * len(ASPECTS) + target.aspect]),
            "color_correct": col == target.color, "pred_shape": sc["shape"], "pred_aspect": sc["aspect"],
            "pred_color": col, "yaw_deg": sc["yaw_deg"]}


@torch.no_grad()
def r_precision(meshes, target_kinds, clip_model, *, size: int = 64, views: int = 2,
                background=(0.7, 0.7, 0.7), generator: torch.Generator | None = None,
                text_features: torch.Tensor | None = None) -> dict:
    """CLIP R-precision (top-1): render each mesh (Lambert, sRGB), retrieve among the 288 kind captions.

    clip_model: an open_clip CLIP (the mini CLIP); the image embedding is the mean of ``views`` random views.
    Returns {'r_precision': fraction correct, 'predicted': list of kind indices}.
    """
    from engine.render.cameras import look_at_cameras
    from engine.render.rasterize import render_mesh
    from engine.training.render_world import random_view_directions
    from engine.training.train_clip import normalize_images, tokenize

    g = generator if generator is not None else torch.Generator().manual_seed(0)
    dev = next(clip_model.parameters()).device
    if text_features is None:
        text_features = torch.nn.functional.normalize(
            clip_model.encode_text(tokenize(all_kind_captions()).to(dev)).float(), dim=-1)
    preds = []
    for mesh in meshes:
        v, f, c = _mesh_arrays(mesh)
        if len(f) == 0:
            preds.append(-1)
            continue
        col = np.full_like(v, 0.5) if c is None else c
        imgs = []
        for d in random_view_directions(views, g, elev_deg=(0.0, 40.0)):
            cam = look_at_cameras(d[None], size, fov=0.7, distance=4.0)
            light = (d.float() + torch.tensor([0.0, 0.0, 0.5])).tolist()
            bg_lin = srgb_to_linear(torch.tensor(background, dtype=torch.float32)).tolist()
            out = render_mesh(torch.from_numpy(v).float(), torch.from_numpy(f), torch.from_numpy(col).float(), cam,
                              background=bg_lin, shading="lambert", light_direction=light, ambient=0.35,
                              diffuse=0.65, supersample=2)
            imgs.append(linear_to_srgb(out["rgb"][0]))
        x = normalize_images(torch.stack(imgs).to(dev))
        emb = torch.nn.functional.normalize(clip_model.encode_image(x).float(), dim=-1).mean(0)
        preds.append(int((text_features @ emb).argmax()))
    correct = [p == int(k) for p, k in zip(preds, target_kinds)]
    return {"r_precision": float(np.mean(correct)) if correct else 0.0, "predicted": preds}


def kind_name(k: int) -> str:
    s, a, c = kind_from_index(k)
    return f"{ASPECTS[a]} {COLORS[c].name} {SHAPES[s]}"
