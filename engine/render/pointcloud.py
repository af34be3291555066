"""Mesh -> coloured point cloud and the transmitter encoder's inputs from any mesh (SHAP-E.md §10 "Input").

The official pipeline renders 40 RGBD views in Blender, back-projects 2^19 candidate points and keeps 16,384 by
farthest-point sampling (``PointCloud.farthest_point_sample``), so every prefix of the point array is itself an FPS
subset; it then renders 20 more views from random directions (distance 4 and fov ≈ 0.7 after the ×2 scene scale)
with the "basic" light (ambient 0.3 + diffuse 0.7·|n·l|), RGBA + z-depth, alpha composited onto black.

Here the candidates are sampled on the surface directly (area-weighted, barycentric colours) and the views come
from ``engine.render.rasterize.render_mesh``. Colour spaces: ``MeshRecord.vertex_colors`` are linear; the
official point colours and views are sRGB bytes, so shading happens in linear light and the result is converted
linear -> sRGB (and, by default, quantised to bytes) before it reaches the encoder.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.colors import linear_to_srgb, srgb_to_linear  # noqa: F401  (preview imports them from here)
from engine.records import EngineError, MeshRecord
from engine.render.cameras import Camera, look_at_cameras
from engine.render.rasterize import render_mesh

MAX_DEPTH = 9.0  # encoder max_depth; background depth is clamped here
VIEW_DISTANCE = 4.0
VIEW_FOV = 0.7


def _quantize(c: torch.Tensor) -> torch.Tensor:
    return torch.round(c * 255.0) / 255.0


def sample_surface(vertices: torch.Tensor, faces: torch.Tensor, colors: torch.Tensor, n: int, *,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n points uniformly on the surface (faces drawn ∝ area, uniform barycentrics) and their interpolated colours.

    vertices (V, 3), faces (F, 3), colors (V, C) -> points (n, 3), colors (n, C) (same colour space as given).
    """
    vertices = torch.as_tensor(vertices, dtype=torch.float32)
    faces = torch.as_tensor(faces).long()
    colors = torch.as_tensor(colors, dtype=torch.float32)
    tri = vertices[faces]  # (F, 3, 3)
    area = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1) / 2
    if faces.shape[0] == 0 or not torch.isfinite(area).all() or float(area.sum()) <= 0:
        raise EngineError("the mesh has no surface area to sample", "check that the mesh has non-degenerate faces")
    face = torch.multinomial(area.double(), n, replacement=True, generator=generator)  # (n,)
    uv = torch.rand(n, 2, generator=generator)
    flip = uv.sum(-1) > 1  # reflect into the lower triangle: uniform over the triangle
    uv = torch.where(flip[:, None], 1 - uv, uv)
    bary = torch.stack([1 - uv[:, 0] - uv[:, 1], uv[:, 0], uv[:, 1]], -1)  # (n, 3)
    pts = (tri[face] * bary[..., None]).sum(1)
    col = (colors[faces[face]] * bary[..., None]).sum(1)
    return pts, col


def _morton_order(pts: np.ndarray) -> np.ndarray:
    """Permutation sorting points (N, 3+) along a 3D Z-order curve (10 bits per axis) of their first 3 coords."""
    xyz = pts[:, :3].astype(np.float64)
    lo, hi = xyz.min(0), xyz.max(0)
    q = ((xyz - lo) / np.maximum(hi - lo, 1e-12) * 1023).astype(np.uint64)  # (N, 3)

    def spread(v: np.ndarray) -> np.ndarray:  # put 2 zero bits between the 10 bits of v
        v = (v | (v << np.uint64(16))) & np.uint64(0x030000FF)
        v = (v | (v << np.uint64(8))) & np.uint64(0x0300F00F)
        v = (v | (v << np.uint64(4))) & np.uint64(0x030C30C3)
        return (v | (v << np.uint64(2))) & np.uint64(0x09249249)

    code = spread(q[:, 0]) | (spread(q[:, 1]) << np.uint64(1)) | (spread(q[:, 2]) << np.uint64(2))
    return np.argsort(code, kind="stable")


def farthest_point_sampling(points: torch.Tensor, k: int, *, start: int = 0, block: int = 128) -> torch.Tensor:
    """Greedy farthest-point order (official ``farthest_point_sample``): k indices (int64) into points (N, D).

    Each pick maximises the squared distance to the points already picked; picked points are excluded so
    duplicates are never picked twice. Every prefix of the result is itself an FPS subset.
    Exact but block-pruned: points are grouped into spatially compact blocks (Z-order, ``block`` points each)
    with a bounding sphere and the maximum remaining distance per block; a new pick p can only lower distances
    in blocks whose sphere is nearer to p than that block's maximum, so late picks touch a few blocks instead of
    all N points. Ties are broken in block order, not by the lowest index (the official uses the lowest index).
    """
    pts = np.asarray(torch.as_tensor(points).detach().cpu(), dtype=np.float32)
    if pts.ndim != 2 or pts.shape[0] == 0:
        raise EngineError(f"points must be a non-empty (N, D) array, got {tuple(pts.shape)}", "")
    n = pts.shape[0]
    if not 0 < k <= n:
        raise EngineError(f"cannot pick {k} of {n} points", "ask for at most as many points as there are")
    if not 0 <= start < n:
        raise EngineError(f"start index {start} out of range for {n} points", "")
    order = _morton_order(pts)
    n_blocks = -(-n // block)
    perm = np.concatenate([order, np.full(n_blocks * block - n, order[-1])])  # pad with a repeated point
    grid = pts[perm].reshape(n_blocks, block, -1)  # (B, S, D)
    comps = [np.ascontiguousarray(grid[..., d]) for d in range(grid.shape[-1])]  # D × (B, S)
    # Sums over a length-D axis are slow in numpy: keep the coordinates as separate arrays.
    centre = (grid.min(1) + grid.max(1)) / 2  # (B, D) bounding spheres of the blocks
    radius = np.sqrt(((grid - centre[:, None]) ** 2).sum(-1)).max(1) * 1.0001 + 1e-6  # (B,)
    centre_aug = np.concatenate([centre, np.ones((n_blocks, 1), np.float32)], 1).astype(np.float64)
    centre_sq = (centre.astype(np.float64) ** 2).sum(1)
    vec = np.empty(grid.shape[-1] + 1)
    cur = np.full((n_blocks, block), np.inf, dtype=np.float32)  # squared distance to the nearest pick
    cur.reshape(-1)[n:] = -np.inf  # padding is never picked
    bmax = cur.max(1)  # (B,)
    where = np.empty(n, dtype=np.int64)
    where[order] = np.arange(n)
    b, j = divmod(int(where[start]), block)
    out = np.empty(k, dtype=np.int64)
    for i in range(k):
        out[i] = perm[b * block + j]
        p = grid[b, j]
        vec[:-1] = -2.0 * p
        vec[-1] = float(p @ p)
        # A block can change only if its sphere comes nearer to p than its farthest remaining point's distance.
        centre_dist = np.sqrt(np.maximum(centre_aug @ vec + centre_sq, 0.0))
        near = np.flatnonzero(centre_dist - radius < np.sqrt(np.maximum(bmax, 0.0)))
        d2 = np.zeros((near.size, block), dtype=np.float32)
        for c, p_d in zip(comps, p):
            t = c[near] - p_d
            d2 += t * t
        cur_near = np.minimum(cur[near], d2)
        cur[near] = cur_near
        bmax[near] = cur_near.max(1)
        cur[b, j] = -np.inf
        bmax[b] = cur[b].max()
        b = int(bmax.argmax())
        j = int(cur[b].argmax())
    return torch.from_numpy(out)


def random_view_cameras(n_views: int, size: int, *, generator: torch.Generator | None = None,
                        distance: float = VIEW_DISTANCE, fov: float = VIEW_FOV) -> Camera:
    """n_views cameras on a sphere of radius ``distance`` (uniform random directions) looking at the origin."""
    dirs = torch.randn(n_views, 3, generator=generator, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return look_at_cameras(dirs, size, fov=fov, distance=distance)


def normalize_to_box(vertices: torch.Tensor) -> torch.Tensor:
    """Centre the bounding box at the origin and scale its largest side to 2 (the official [-0.5, 0.5]^3 × 2)."""
    lo, hi = vertices.amin(0), vertices.amax(0)
    scale = float((hi - lo).max())
    if scale <= 0:
        raise EngineError("the mesh has zero extent", "check that the mesh has more than one distinct vertex")
    return (vertices - (lo + hi) / 2) * (2.0 / scale)


def mesh_to_encoder_inputs(mesh: MeshRecord, *, n_points: int = 16384, n_views: int = 20, image_size: int = 256,
                           generator: torch.Generator | None = None, n_candidates: int | None = None,
                           normalize: bool = True, quantize: bool = True, supersample: int = 2) -> dict:
    """Everything the transmitter encoder consumes for one mesh (batch of 1).

    Returns points (1, 6, n_points): xyz then sRGB colour in [0, 1], ordered by farthest-point sampling from
    ``n_candidates`` (default 4·n_points) area-weighted surface samples, so the first k points are an FPS subset;
    views (1, V, 3, S, S) sRGB in [-1, 1] composited onto black; depths (1, V, 1, S, S) z-depth clamped at 9;
    alphas (1, V, 1, S, S) coverage in [0, 1]; rays (1, V, S, S, 2, 3) (origin, unit direction); camera_z (1, V, 3);
    camera: the V random-direction cameras (distance 4, fov 0.7); vertices: the (normalised) vertices used.
    Colours: the mesh's linear vertex colours are shaded in linear light (views only) and converted to sRGB, then
    rounded to byte levels when ``quantize`` (the official inputs are 8-bit). ``normalize`` centres the mesh and
    scales its largest side to 2 like the official asset preparation.
    """
    if mesh.empty or len(mesh.faces) == 0:
        raise EngineError("cannot encode an empty mesh", "generate or import a mesh with at least one face")
    if n_points < 1 or n_views < 1 or image_size < 2:
        raise EngineError("n_points, n_views must be >= 1 and image_size >= 2", "")
    verts = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))
    faces = torch.from_numpy(np.asarray(mesh.faces, dtype=np.int64))
    colors = torch.from_numpy(np.asarray(mesh.vertex_colors, dtype=np.float32))
    if normalize:
        verts = normalize_to_box(verts)
    n_cand = max(n_points, n_candidates if n_candidates is not None else 4 * n_points)
    pts, col = sample_surface(verts, faces, colors, n_cand, generator=generator)
    start = int(torch.randint(n_cand, (1,), generator=generator))
    order = farthest_point_sampling(pts, n_points, start=start)
    col = linear_to_srgb(col[order])
    if quantize:
        col = _quantize(col)
    points = torch.cat([pts[order], col], dim=1).T[None].contiguous()  # (1, 6, N)

    camera = random_view_cameras(n_views, image_size, generator=generator)
    out = render_mesh(verts, faces, colors, camera, shading="lambert", supersample=supersample)
    alpha = out["alpha"]  # (V, S, S)
    # Blender composites in linear light then encodes sRGB; coverage-weighted rgb is already "on black".
    rgb = linear_to_srgb(out["rgb"])
    if quantize:
        rgb = _quantize(rgb)
        alpha = _quantize(alpha)
    origins, dirs = camera.rays()  # (V, S, S, 3)
    return {
        "points": points,
        "views": (rgb * 2 - 1).permute(0, 3, 1, 2)[None].contiguous(),
        "depths": out["depth"].clamp(max=MAX_DEPTH)[None, :, None].contiguous(),
        "alphas": alpha[None, :, None].contiguous(),
        "rays": torch.stack([origins, dirs], dim=-2)[None].contiguous(),
        "camera_z": camera.z[None].clone(),
        "camera": camera,
        "vertices": verts,
    }
