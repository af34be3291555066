"""On-the-fly training batches from the mini world (MINI-DATASET.md), deterministic for a given torch.Generator.

* SDF samples for decoder losses: exact surface points, Gaussian near-surface points and uniform points in
  [-1, 1]^3 with the exact distance (Shap-E sign: positive inside) and the object's colour.
* Surface points: area-uniform samples of a cached marching-cubes mesh of each canonical (shape, aspect), yawed,
  then projected onto the exact surface by two closest-point steps p <- p - d(p) n(p) (exact distance).
* Coloured point clouds (B, 6, N) as the Shap-E encoder takes them (xyz, RGB in [0, 1]); the first k points are a
  farthest-point-sampling subset (SHAP-E.md §10, ``fps_method first``).
* Multiview RGBA + z-depth renders with the official camera conventions and image-conditioning renders
  (render_world.py), and captions. Held-out (shape, colour) pairs never appear unless split='heldout'/'all'.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from engine.render.cameras import look_at_cameras

from . import render_world
from .captions import caption
from .world import (
    ObjectSpec, rotate_z, sample_spec, shape_params, signed_distance, signed_distance_tensors,
    specs_tensors,
)


def sample_object_specs(n: int, generator: torch.Generator, *, split: str = "train", jitter: float = 0.05
                        ) -> list[ObjectSpec]:
    return [sample_spec(generator, split=split, jitter=jitter) for _ in range(n)]


def captions_for(specs: list[ObjectSpec], generator: torch.Generator, **kw) -> list[str]:
    return [caption(s, generator, **kw) for s in specs]


@lru_cache(maxsize=None)
def canonical_mesh(shape: int, aspect: int, res: int = 72) -> tuple[torch.Tensor, torch.Tensor]:
    """Marching-cubes mesh of the unyawed canonical object: vertices (V, 3) float64, faces (F, 3) int64."""
    from skimage import measure

    lim = 0.8
    lin = torch.linspace(-lim, lim, res, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(1, -1, 3)
    prm = shape_params(shape, aspect)[None]
    d = signed_distance_tensors(torch.tensor([shape]), prm, torch.zeros(1, dtype=torch.float64), grid, fast=True)
    v, f, _, _ = measure.marching_cubes(d.reshape(res, res, res).numpy(), 0.0, spacing=(2 * lim / (res - 1),) * 3)
    return torch.from_numpy(v - lim), torch.from_numpy(f.astype(np.int64))


def _area_sample(v: torch.Tensor, f: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    tri = v[f]  # (F, 3, 3)
    area = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1)
    idx = torch.multinomial(area, n, replacement=True, generator=generator)
    u = torch.rand(n, 2, generator=generator, dtype=v.dtype)
    flip = u.sum(-1) > 1
    u = torch.where(flip[:, None], 1 - u, u)
    t = tri[idx]
    return t[:, 0] + u[:, :1] * (t[:, 1] - t[:, 0]) + u[:, 1:] * (t[:, 2] - t[:, 0])


def _normals(specs: list[ObjectSpec], p: torch.Tensor, h: float = 1e-4) -> torch.Tensor:
    """Unit gradient of the fast bound: parallel to the exact normal on the surface, and cheap."""
    g = []
    for i in range(3):
        e = torch.zeros(3, dtype=p.dtype)
        e[i] = h
        g.append(signed_distance(specs, p + e, fast=True) - signed_distance(specs, p - e, fast=True))
    n = torch.stack(g, -1)
    return n / n.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def surface_points(specs: list[ObjectSpec], n: int, generator: torch.Generator, *, project_steps: int = 2
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on the exact surface, ~area-uniform: (B, n, 3) float32 and outward unit normals (B, n, 3)."""
    pts = []
    for s in specs:
        v, f = canonical_mesh(s.shape, s.aspect)
        pts.append(_area_sample(v, f, n, generator))
    p = torch.stack(pts)  # (B, n, 3) float64, unyawed
    p = rotate_z(p, torch.tensor([s.yaw for s in specs], dtype=p.dtype))
    for _ in range(project_steps):
        d = signed_distance(specs, p)
        p = p - d[..., None] * _normals(specs, p)
    return p.float(), _normals(specs, p).float()


def object_colors(specs: list[ObjectSpec], *, linear: bool = True) -> torch.Tensor:
    """(B, 3) flat colour of each object (value jitter applied), linear or sRGB."""
    return torch.stack([s.linear_rgb() if linear else s.srgb() for s in specs])


def sdf_samples(specs: list[ObjectSpec], generator: torch.Generator, *, n_surface: int = 1024, n_near: int = 2048,
                n_uniform: int = 1024, near_sigmas: tuple[float, ...] = (0.005, 0.02, 0.08)) -> dict[str, torch.Tensor]:
    """Points with exact SDF (positive inside) and colours for decoder losses.

    Returns points (B, N, 3), sdf (B, N), colors_linear / colors_srgb (B, N, 3) (the object's colour everywhere),
    and kind (B,) (N = n_surface + n_near + n_uniform; surface points come first and have sdf ~ 0).
    """
    B = len(specs)
    surf, _ = surface_points(specs, n_surface + n_near, generator)
    near = surf[:, n_surface:]
    sig = torch.tensor(near_sigmas)[torch.randint(len(near_sigmas), (B, n_near, 1), generator=generator)]
    near = near + torch.randn(B, n_near, 3, generator=generator) * sig
    uni = torch.rand(B, n_uniform, 3, generator=generator) * 2 - 1
    p = torch.cat([surf[:, :n_surface], near, uni], 1)
    sdf = -signed_distance(specs, p.double()).float()
    sdf[:, :n_surface] = 0.0  # projected onto the exact surface; residual is float round-off
    lin, srgb = object_colors(specs), object_colors(specs, linear=False)
    N = p.shape[1]
    return {"points": p, "sdf": sdf, "colors_linear": lin[:, None].expand(B, N, 3).contiguous(),
            "colors_srgb": srgb[:, None].expand(B, N, 3).contiguous(),
            "kind": torch.tensor([s.kind for s in specs])}


def farthest_point_sampling(points: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched FPS: points (B, N, 3) -> indices (B, k); the start point is random (generator) or index 0.

    The training variant: a whole batch of clouds at once, on the training device. Inference (one user mesh of
    up to ~10^5 points, official tie rule) uses ``engine.render.pointcloud.farthest_point_sampling`` instead, a
    block-pruned numpy search that would be slower per batch on a GPU; both give greedy farthest-point orders."""
    B, N, _ = points.shape
    idx = torch.empty(B, k, dtype=torch.long, device=points.device)
    if generator is None:
        cur = torch.zeros(B, dtype=torch.long, device=points.device)
    else:
        cur = torch.randint(N, (B,), generator=generator).to(points.device)
    best = torch.full((B, N), torch.inf, device=points.device, dtype=points.dtype)
    ar = torch.arange(B, device=points.device)
    for i in range(k):
        idx[:, i] = cur
        d = (points - points[ar, cur][:, None]).square().sum(-1)  # (B, N)
        best = torch.minimum(best, d)
        cur = best.argmax(dim=1)
    return idx


def point_clouds(specs: list[ObjectSpec], n: int, generator: torch.Generator, *, fps_k: int = 1024,
                 srgb: bool = True) -> torch.Tensor:
    """Coloured surface point clouds (B, 6, n): xyz then RGB in [0, 1]; the first fps_k points are an FPS subset."""
    p, _ = surface_points(specs, n, generator)
    k = min(fps_k, n)
    first = farthest_point_sampling(p, k, generator)  # (B, k)
    B = len(specs)
    rest_mask = torch.ones(B, n, dtype=torch.bool)
    rest_mask[torch.arange(B)[:, None], first] = False
    rest = torch.stack([torch.nonzero(m).squeeze(1) for m in rest_mask])  # (B, n - k)
    order = torch.cat([first, rest], 1)
    p = torch.gather(p, 1, order[..., None].expand(B, n, 3))
    col = object_colors(specs, linear=not srgb)[:, None].expand(B, n, 3)
    return torch.cat([p, col], -1).permute(0, 2, 1).contiguous()


def multiview(specs: list[ObjectSpec], generator: torch.Generator, *, n_views: int = 4, size: int = 64,
              distance: float = 4.0, fov: float = 0.7, background: tuple[float, float, float] = (0.0, 0.0, 0.0),
              supersample: int = 1, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random-direction views (uniform on the sphere) at ``distance``, official camera conventions.

    Returns rgba (B, V, H, W, 4) sRGB (colour over ``background``), depth (B, V, H, W) z-depth (inf on empty
    pixels), and the cameras origin/x/y/z (B, V, 3).
    """
    B = len(specs)
    dirs = render_world.random_sphere_directions(B * n_views, generator)
    cams = look_at_cameras(dirs, size, fov=fov, distance=distance)
    out = render_world.render(specs, cams, views_per_object=n_views, background=background, supersample=supersample,
                              device=device)
    rgba = torch.cat([out["rgb"], out["alpha"][..., None]], -1)
    cam = {k: getattr(cams, k).reshape(B, n_views, 3) for k in ("origin", "x", "y", "z")}
    return {"rgba": rgba, "depth": out["depth"], **cam}


def condition_images(specs: list[ObjectSpec], generator: torch.Generator, **kw) -> torch.Tensor:
    """(B, H, W, 3) sRGB renders: random view, plain background, Lambert lighting (see render_world)."""
    return render_world.condition_images(specs, generator, **kw)


def object_tensors(specs: list[ObjectSpec], device=None):
    """Shape index, parameters and yaw tensors for GPU-side SDF queries (``world.signed_distance_tensors``)."""
    return specs_tensors(specs, device=device)
