"""Sphere tracing of the mini world's analytic objects (Hart 1996) with the official camera conventions.

The tracer marches every ray of a batch of cameras against that batch's objects with the Lipschitz-1 bounds of
``world.signed_distance_tensors(fast=True)`` (same zero set as the exact distances, so the silhouette is exact up
to the stopping threshold). Shading is Lambert (ambient + diffuse) in linear RGB, written out in sRGB; normals are
central differences of the bound, which is parallel to the true normal on the surface. Depth is z-depth along the
camera's forward axis (what the Shap-E encoder's multiview input expects, SHAP-E.md §10).
"""

from __future__ import annotations

import math

import torch

from engine.render.cameras import Camera, look_at_cameras

from .world import ObjectSpec, linear_to_srgb, signed_distance_tensors, specs_tensors, srgb_to_linear

BOUND_RADIUS = 1.32  # every object lies within the sphere through the corners of [-0.75, 0.75]^3


def random_view_directions(n: int, generator: torch.Generator, *, elev_deg: tuple[float, float] = (-20.0, 60.0)
                           ) -> torch.Tensor:
    """(n, 3) unit vectors from the origin towards the camera: uniform azimuth, elevation uniform in elev_deg."""
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    az = u[:, 0] * 2 * math.pi
    el = torch.deg2rad(elev_deg[0] + u[:, 1] * (elev_deg[1] - elev_deg[0]))
    return torch.stack([torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], -1)


def random_sphere_directions(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) unit vectors uniform on the sphere (the official encoder's random multiview cameras)."""
    v = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def _sdf(shape, prm, yaw, p):
    return signed_distance_tensors(shape, prm, yaw, p, fast=True)


def trace(shape: torch.Tensor, prm: torch.Tensor, yaw: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor, *,
          steps: int = 96, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Sphere-trace rays (B, R, 3) against object b of the batch -> (t (B, R), hit (B, R) bool).

    Only the rays still marching are evaluated (compacted to a flat list with per-ray object parameters).
    """
    B, R, _ = origins.shape
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    obj = torch.arange(B, device=o.device).repeat_interleave(R)  # (B*R,)
    # Start at the bounding sphere: |o + t d|^2 = r^2.
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - BOUND_RADIUS ** 2)
    sq = disc.clamp(min=0).sqrt()
    t = (-b - sq).clamp(min=0)
    t_far = -b + sq
    hit = torch.zeros_like(disc, dtype=torch.bool)
    idx = (disc > 0).nonzero().squeeze(1)  # active rays
    for i in range(steps + 1):
        if idx.numel() == 0:
            break
        oi = obj[idx]
        ti = t[idx]
        dist = _sdf(shape[oi], prm[oi], yaw[oi], (o[idx] + ti[:, None] * d[idx])[:, None])[:, 0]
        # The last pass only decides: rays that ran out of steps grazing a conservative bound hit when very close.
        done = dist < (eps if i < steps else 10 * eps)
        hit[idx[done]] = True
        if i == steps:
            break
        ti = ti + dist.clamp(min=eps * 0.5)
        t[idx] = torch.where(done, t[idx], ti)
        keep = ~done & (ti < t_far[idx])
        idx = idx[keep]
    return t.reshape(B, R), hit.reshape(B, R)


def normals(shape, prm, yaw, p: torch.Tensor, h: float = 1e-3) -> torch.Tensor:
    """Outward unit normals (B, N, 3) at points p (B, N, 3) by central differences."""
    g = []
    for i in range(3):
        e = torch.zeros(3, dtype=p.dtype, device=p.device)
        e[i] = h
        g.append(_sdf(shape, prm, yaw, p + e) - _sdf(shape, prm, yaw, p - e))
    n = torch.stack(g, -1)
    return n / n.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def render(specs: list[ObjectSpec], cameras: Camera, *, views_per_object: int = 1,
           background: torch.Tensor | tuple[float, float, float] = (1.0, 1.0, 1.0), ambient: float = 0.35,
           diffuse: float = 0.65, light_dirs: torch.Tensor | None = None, supersample: int = 1,
           device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Render each object from ``views_per_object`` consecutive cameras (len(cameras) = B * V).

    background: sRGB (3,) or (B, 3). light_dirs: (B*V, 3) unit vectors towards the light in world space (default:
    from the camera, raised a little). Returns rgb (B, V, H, W, 3) sRGB in [0, 1] over the background, alpha
    (B, V, H, W), depth (B, V, H, W) z-depth (inf where empty), and the normals (B, V, H, W, 3).
    """
    dev = torch.device(device) if device is not None else cameras.origin.device
    B, V = len(specs), views_per_object
    if len(cameras) != B * V:
        raise ValueError(f"need {B * V} cameras for {B} objects x {V} views, got {len(cameras)}")
    H, W = cameras.height, cameras.width
    ss = supersample
    cam = Camera(*(v.to(dev) for v in (cameras.origin, cameras.x, cameras.y, cameras.z)), W * ss, H * ss,
                 cameras.x_fov, cameras.y_fov)
    o, d = cam.rays()  # (B*V, Hs, Ws, 3)
    o, d = o.reshape(B, V * H * ss * W * ss, 3), d.reshape(B, -1, 3)
    shape, prm, yaw = specs_tensors(specs, device=dev)
    t, hit = trace(shape, prm, yaw, o, d)
    p = o + t[..., None] * d
    n = normals(shape, prm, yaw, p)
    if light_dirs is None:
        up = torch.tensor([0.0, 0.0, 0.6], device=dev)
        light_dirs = -cam.z + up
    light = light_dirs.to(dev, torch.float32)
    light = light / light.norm(dim=-1, keepdim=True)
    light = light.reshape(B, V, 1, 3).expand(B, V, H * ss * W * ss, 3).reshape(B, -1, 3)
    lam = (n * light).sum(-1).clamp(min=0)  # (B, R)
    albedo = torch.stack([s.linear_rgb() for s in specs]).to(dev)  # (B, 3)
    lin = albedo[:, None, :] * (ambient + diffuse * lam[..., None])
    bg = torch.as_tensor(background, dtype=torch.float32, device=dev).expand(B, 3)
    alpha = hit.float()
    rgb_lin = lin * alpha[..., None] + srgb_to_linear(bg)[:, None, :] * (1 - alpha[..., None])
    zdepth = t * (d * cam.z.reshape(B, V, 1, 3).expand(B, V, H * ss * W * ss, 3).reshape(B, -1, 3)).sum(-1)

    def img(x, c):
        x = x.reshape(B, V, H, ss, W, ss, c) if ss > 1 else x.reshape(B, V, H, 1, W, 1, c)
        return x

    if ss > 1:
        rgb_lin = img(rgb_lin, 3).mean(dim=(3, 5))
        alpha_out = img(alpha[..., None], 1).mean(dim=(3, 5))[..., 0]
        # Depth and normals at the centre sample of each pixel block.
        zdepth = img(torch.where(hit, zdepth, torch.inf)[..., None], 1)[:, :, :, ss // 2, :, ss // 2, 0]
        n = img(n * alpha[..., None], 3)[:, :, :, ss // 2, :, ss // 2]
    else:
        rgb_lin = rgb_lin.reshape(B, V, H, W, 3)
        alpha_out = alpha.reshape(B, V, H, W)
        zdepth = torch.where(hit, zdepth, torch.inf).reshape(B, V, H, W)
        n = (n * alpha[..., None]).reshape(B, V, H, W, 3)
    return {"rgb": linear_to_srgb(rgb_lin), "alpha": alpha_out, "depth": zdepth, "normals": n}


CONDITION_ELEV_DEG = (-10.0, 50.0)  # elevation range of image-conditioning views (training and evaluation)


def condition_images(specs: list[ObjectSpec], generator: torch.Generator, *, size: int = 64,
                     background: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
                     elev_deg: tuple[float, float] = CONDITION_ELEV_DEG, supersample: int = 2,
                     device: torch.device | str = "cpu", directions: torch.Tensor | None = None) -> torch.Tensor:
    """Image-conditioning renders: one random view per object, plain background -> (B, size, size, 3) sRGB.

    background None draws a random light plain grey per image (augmentation for encoder training);
    ``directions`` (B, 3) gives the views instead of drawing them.
    """
    B = len(specs)
    dirs = random_view_directions(B, generator, elev_deg=elev_deg) if directions is None else directions
    cams = look_at_cameras(dirs, size, fov=0.7, distance=4.0)
    if background is None:
        bg = 0.75 + 0.25 * torch.rand(B, 1, generator=generator)
        bg = bg.expand(B, 3)
    else:
        bg = torch.tensor(background, dtype=torch.float32)
    out = render(specs, cams, background=bg, supersample=supersample, device=device)
    return out["rgb"][:, 0]


def to_srgb8(images: torch.Tensor):
    """sRGB floats in [0, 1] -> uint8 numpy array, rounded as a PNG would store them (what a user's image holds)."""
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
