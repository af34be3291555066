"""Coarse/fine NeRF volume rendering of a Shap-E field, as the official preview does (SHAP-E.md §5.3, §8).

The official ``NeRSTFRenderer.render_rays`` in mode "nerf" (``separate_shared_samples``: true), step by step:

1. Slab intersection of each ray with the box [-1, 1]^3, dividing by ``d ± 1e-6`` (sign-preserving), t0 >= 0; a
   ray hits when ``t0 + 1e-3 < t1``; misses get (t0, t1) = (0, 1) and are masked at the end.
2. Coarse pass: 64 stratified depths (one uniform draw inside each of the 64 bins whose edges are the midpoints of
   ``linspace(t0, t1, 64)``), queried with the *coarse* density/colour slots.
3. Importance sampling: pmf = (coarse weights + 1e-5) normalised; inverse CDF (``searchsorted``) picks a coarse bin
   per draw, a uniform draw places the depth inside that bin's [lower, upper]; the 128 depths are sorted.
4. Fine pass: the *fine* density/colour slots queried at the sorted union of the 64 coarse and 128 fine depths.
5. Quadrature (both passes): bin edges at the midpoints (first/last edge = t0/t1), δ = bin width,
   weight_i = (1 − exp(−σ_i δ_i)) · exp(−Σ_{j<i} σ_j δ_j); colour = Σ w c + T · background (black), distance =
   Σ w t; depth = distance · (ray direction · camera z).
6. Image = colour × 255, clamped to [0, 255] and *truncated* to uint8.

Randomness: draws come from ``generator`` (any torch.Generator) or, with ``deterministic=True``, the fixed values
the reference fixture uses (jitter 0.5 in every bin, inverse-CDF draws at the quantiles (k + 0.5)/n).
"""

from __future__ import annotations

from typing import Callable

import torch

from engine.records import EngineError
from engine.render.cameras import Camera

FieldFn = Callable[[torch.Tensor], dict]

BBOX_EPSILON = 1e-6  # safe_divide in the official slab test
MIN_T_RANGE = 1e-3  # a ray must spend at least this long inside the box to count as hitting
PMF_ALPHA = 1e-5  # added to the coarse weights before importance sampling


def intersect_box(origins: torch.Tensor, directions: torch.Tensor, *, lo: float = -1.0, hi: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official BoundingBoxVolume.intersect. origins/directions (R, 3) -> t0, t1 (R,) and hit (R,) bool."""
    safe = torch.where(directions < 0, directions - BBOX_EPSILON, directions + BBOX_EPSILON)  # (R, 3)
    bounds = torch.tensor([lo, hi], dtype=origins.dtype, device=origins.device).view(1, 2, 1)
    ts = (bounds - origins[:, None, :]) / safe[:, None, :]  # (R, 2, 3)
    t0 = ts.min(dim=1).values.max(dim=-1).values.clamp(min=0.0)  # (R,)
    t1 = ts.max(dim=1).values.min(dim=-1).values  # (R,)
    hit = t0 + MIN_T_RANGE < t1
    t0 = torch.where(hit, t0, torch.zeros_like(t0))
    t1 = torch.where(hit, t1, torch.ones_like(t1))
    return t0, t1, hit


def _bins(ts: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower/upper bin edges around sorted depths ts (R, n): midpoints, with t0/t1 closing the ends."""
    mids = (ts[:, 1:] + ts[:, :-1]) * 0.5  # (R, n-1)
    lower = torch.cat([t0[:, None], mids], dim=1)
    upper = torch.cat([mids, t1[:, None]], dim=1)
    return lower, upper


def stratified_depths(t0: torch.Tensor, t1: torch.Tensor, n: int, jitter: torch.Tensor) -> torch.Tensor:
    """n depths per ray (R, n), one inside each bin around linspace(t0, t1, n); jitter (R, n) in [0, 1)."""
    s = torch.linspace(0, 1, n, dtype=t0.dtype, device=t0.device)[None, :]  # (1, n)
    grid = t0[:, None] * (1.0 - s) + t1[:, None] * s  # (R, n)
    mids = 0.5 * (grid[:, 1:] + grid[:, :-1])
    upper = torch.cat([mids, t1[:, None]], dim=1)
    lower = torch.cat([t0[:, None], mids], dim=1)
    return lower + (upper - lower) * jitter


def importance_depths(t0: torch.Tensor, t1: torch.Tensor, ts: torch.Tensor, weights: torch.Tensor,
                      u_pmf: torch.Tensor, u_bin: torch.Tensor) -> torch.Tensor:
    """Sorted depths (R, m) drawn from the bins of ts (R, n) with probability ∝ weights + 1e-5.

    u_pmf (R, m): uniform draws for the inverse CDF; u_bin (R, m): position inside the chosen bin.
    """
    lower, upper = _bins(ts, t0, t1)  # (R, n)
    w = weights + PMF_ALPHA
    pmf = w / w.sum(dim=1, keepdim=True)
    cdf = torch.cumsum(pmf, dim=1)  # (R, n)
    idx = torch.searchsorted(cdf.contiguous(), u_pmf.contiguous()).clamp(0, ts.shape[1] - 1)  # (R, m)
    lo_ = torch.gather(lower, 1, idx)
    hi_ = torch.gather(upper, 1, idx)
    return torch.sort(lo_ + (hi_ - lo_) * u_bin, dim=1).values


def integrate(ts: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, density: torch.Tensor, rgb: torch.Tensor
              ) -> dict[str, torch.Tensor]:
    """Quadrature along each ray. ts/density (R, n), rgb (R, n, 3) -> rgb (R, 3), transmittance, distance, weights."""
    lower, upper = _bins(ts, t0, t1)
    dd = density * (upper - lower)  # (R, n)
    mass = torch.cumsum(dd, dim=1)
    transmittance = torch.exp(-mass[:, -1])  # (R,)
    alphas = 1.0 - torch.exp(-dd)
    before = torch.exp(torch.cat([torch.zeros_like(mass[:, :1]), -mass[:, :-1]], dim=1))
    weights = alphas * before  # (R, n)
    return {
        "rgb": (rgb * weights[..., None]).sum(dim=1),
        "transmittance": transmittance,
        "distance": (ts * weights).sum(dim=1),
        "weights": weights,
    }


def _query(field_fn: FieldFn, origins: torch.Tensor, directions: torch.Tensor, ts: torch.Tensor, level: str
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Density (R, n) and colour (R, n, 3) of the ``level`` ('coarse' | 'fine') NeRF slots at o + t·d."""
    r, n = ts.shape
    pts = origins[:, None, :] + ts[..., None] * directions[:, None, :]  # (R, n, 3)
    out = field_fn(pts.reshape(1, r * n, 3))
    try:
        density = out[f"density_{level}"]
        rgb = out[f"nerf_rgb_{level}"]
    except KeyError as err:
        raise EngineError(f"the field did not return {err.args[0]!r}",
                          "field_fn must return density_coarse/fine and nerf_rgb_coarse/fine") from None
    return density.reshape(r, n), rgb.reshape(r, n, 3)


def _draws(shape: tuple[int, int], kind: str, generator: torch.Generator | None, deterministic: bool,
           device: torch.device) -> torch.Tensor:
    if deterministic:
        if kind == "quantile":
            q = (torch.arange(shape[1], dtype=torch.float32, device=device) + 0.5) / shape[1]
            return q.expand(shape).clone()
        return torch.full(shape, 0.5, device=device)
    return torch.rand(shape, generator=generator, device=device)


def render_rays(field_fn: FieldFn, origins: torch.Tensor, directions: torch.Tensor, *, n_coarse: int = 64,
                n_fine: int = 128, ray_chunk: int = 4096, generator: torch.Generator | None = None,
                deterministic: bool = False, keep_samples: bool = False) -> dict[str, torch.Tensor]:
    """Render rays (R, 3) (unit directions) through ``field_fn``; see the module docstring.

    field_fn(points (1, M, 3)) -> dict with 'density_coarse'/'density_fine' (1, M[, 1]) after ReLU and
    'nerf_rgb_coarse'/'nerf_rgb_fine' (1, M, 3) after sigmoid, in [0, 1].
    Returns per ray: channels (R, 3) fine colour × 255, transmittance (R,), distance (R,), t0, t1, hit, and the
    coarse pass (channels_coarse, transmittance_coarse, distance_coarse). keep_samples adds coarse_ts (R, 64),
    fine_ts (R, 128), merged_ts (R, 192), density_fine (R, 192).
    """
    if origins.ndim != 2 or origins.shape != directions.shape or origins.shape[-1] != 3:
        raise EngineError(f"rays must be two (R, 3) tensors, got {tuple(origins.shape)} and "
                          f"{tuple(directions.shape)}", "flatten the image dimensions first")
    if n_coarse < 2 or n_fine < 1 or ray_chunk < 1:
        raise EngineError("n_coarse must be >= 2, n_fine and ray_chunk >= 1", "use the defaults 64 / 128 / 4096")
    dev = origins.device
    parts: dict[str, list[torch.Tensor]] = {}
    for s in range(0, origins.shape[0], ray_chunk):
        o, d = origins[s:s + ray_chunk], directions[s:s + ray_chunk]
        r = o.shape[0]
        t0, t1, hit = intersect_box(o, d)

        coarse_ts = stratified_depths(t0, t1, n_coarse, _draws((r, n_coarse), "jitter", generator, deterministic,
                                                                dev))
        dens_c, rgb_c = _query(field_fn, o, d, coarse_ts, "coarse")
        coarse = integrate(coarse_ts, t0, t1, dens_c, rgb_c)

        fine_ts = importance_depths(t0, t1, coarse_ts, coarse["weights"],
                                    _draws((r, n_fine), "quantile", generator, deterministic, dev),
                                    _draws((r, n_fine), "jitter", generator, deterministic, dev))
        merged_ts = torch.sort(torch.cat([fine_ts, coarse_ts], dim=1), dim=1).values  # (r, n_coarse + n_fine)
        dens_f, rgb_f = _query(field_fn, o, d, merged_ts, "fine")
        fine = integrate(merged_ts, t0, t1, dens_f, rgb_f)

        zero = torch.zeros((), dtype=o.dtype, device=dev)
        out = {
            # Black background: colour + T·0; misses are zeroed and fully transmissive like the official masking.
            "channels": torch.where(hit[:, None], fine["rgb"], zero) * 255.0,
            "transmittance": torch.where(hit, fine["transmittance"], torch.ones_like(t0)),
            "distance": torch.where(hit, fine["distance"], zero),
            "channels_coarse": torch.where(hit[:, None], coarse["rgb"], zero) * 255.0,
            "transmittance_coarse": torch.where(hit, coarse["transmittance"], torch.ones_like(t0)),
            "distance_coarse": torch.where(hit, coarse["distance"], zero),
            "t0": t0, "t1": t1, "hit": hit,
        }
        if keep_samples:
            out.update(coarse_ts=coarse_ts, fine_ts=fine_ts, merged_ts=merged_ts, density_fine=dens_f)
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v, dim=0) for k, v in parts.items()}


@torch.no_grad()
def render_nerf(field_fn: FieldFn, camera: Camera, *, n_coarse: int = 64, n_fine: int = 128, ray_chunk: int = 4096,
                generator: torch.Generator | None = None, deterministic: bool = False,
                keep_samples: bool = False) -> dict[str, torch.Tensor]:
    """Render every view of ``camera`` (N views, H×W) with the official coarse/fine NeRF procedure.

    Returns image_u8 (N, H, W, 3) uint8, channels (N, H, W, 3) float ×255 before the clamp, transmittance and
    depth (N, H, W) (depth = z-depth along the camera axis), distance (N, H, W) along the ray, the coarse pass
    (channels_coarse, transmittance_coarse) and t0/t1/hit; keep_samples adds the per-ray depth samples
    (N, H, W, n). ``generator`` drives the stratified/importance draws; ``deterministic`` uses the fixture's
    fixed draws instead.
    """
    origins, dirs = camera.rays()  # (N, H, W, 3)
    n, h, w, _ = origins.shape
    flat = render_rays(field_fn, origins.reshape(-1, 3), dirs.reshape(-1, 3), n_coarse=n_coarse, n_fine=n_fine,
                       ray_chunk=ray_chunk, generator=generator, deterministic=deterministic,
                       keep_samples=keep_samples)
    out = {k: v.reshape(n, h, w, *v.shape[1:]) for k, v in flat.items()}
    cam_z = camera.z / camera.z.norm(dim=-1, keepdim=True)  # (N, 3)
    out["depth"] = out["distance"] * (dirs * cam_z[:, None, None, :]).sum(-1)
    out["image_u8"] = out["channels"].clamp(0, 255).to(torch.uint8)  # truncation, as decode_latent_images does
    return out
