"""Vertex colours of an extracted mesh: queried at the vertices, or interpolated from the grid corners.

Vertex colours (``vertex_colors``): ``query`` evaluates the colour at every final vertex (the official way, one more
MLP pass per vertex); ``interpolate`` takes the colour at the grid corners in the same MLP pass as the SDF (the
last layer computes 4 rows instead of 1) and interpolates it linearly along the vertex's edge, with the marching
cubes weight t. Every vertex lies on an edge whose two ends were queried, except caps on the box faces, whose
outer end is the −1 border: they take the inner end's colour. The difference is O(voxel²) of the colour field's
curvature (measured in tests and bench/bench_decode.py); ``auto`` interpolates from grid 128 up, where the voxel is
small and the vertex pass would cost ~30 % of the decode.
"""

from __future__ import annotations

import numpy as np
import torch

from ..records import EngineError

INTERPOLATE_FROM_GRID = 128  # vertex_colors="auto": query below this grid size, interpolate from it up


def _flat(ijk: np.ndarray, n: int) -> np.ndarray:
    """(M, 3) integer indices of an (n, n, n) grid -> (M,) flat indices (x major, z fastest)."""
    return (ijk[:, 0] * n + ijk[:, 1]) * n + ijk[:, 2]


def resolve_vertex_colors(mode: str, grid_size: int) -> str:
    if mode not in ("auto", "query", "interpolate"):
        raise EngineError(f"unknown vertex colour mode {mode!r}", "use 'auto', 'query' or 'interpolate'")
    if mode == "auto":
        return "interpolate" if grid_size >= INTERPOLATE_FROM_GRID else "query"
    return mode


def interpolate_corner_colors(index_verts: np.ndarray, corner_colors: list, grid_size: int
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Vertex colours from the colours queried at grid corners.

    index_verts (V, 3): marching-cubes vertices in padded-grid index units (two coordinates whole, the third at
    a + t along its edge); corner_colors: ``sdf_grid``'s list of (fine index (M, 3), colour (M, 3)). Returns
    (colours (V, 3) float32, missing (V,) bool: vertices none of whose edge ends was queried; colour 0 there)."""
    fine = torch.cat([f for f, _ in corner_colors]).cpu()
    rgb = torch.cat([c for _, c in corner_colors]).float().cpu()
    inside = ((fine >= 0) & (fine < grid_size)).all(1)  # coarse lattices may overhang the box
    fine, rgb = fine[inside], rgb[inside]
    n = grid_size + 2
    keys = _flat(fine.numpy() + 1, n)  # padded flat index of every queried point
    order = np.argsort(keys)
    keys, rgb = keys[order], rgb.numpy()[order]
    base = np.floor(index_verts)
    frac = index_verts - base
    axis = frac.argmax(1)  # the edge's direction (any axis when the vertex sits on a grid point: t = 0)
    t = frac[np.arange(len(frac)), axis][:, None]
    a = base.astype(np.int64)
    b = a.copy()
    b[np.arange(len(b)), axis] += 1
    colors, weight = np.zeros((len(a), 3), np.float64), np.zeros((len(a), 1), np.float64)
    for ends, w in ((a, 1.0 - t), (b, t)):
        key = _flat(ends, n)
        pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        found = (keys[pos] == key)[:, None] & (w > 0)
        colors += np.where(found, w * rgb[pos], 0.0)
        weight += np.where(found, w, 0.0)
    missing = weight[:, 0] <= 0
    colors = np.where(missing[:, None], 0.0, colors / np.maximum(weight, 1e-12))  # a border cap: its inner end
    return colors.astype(np.float32), missing
