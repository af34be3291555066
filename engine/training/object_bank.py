"""A device-resident bank of procedural objects and their encoder inputs (MINI-DATASET.md; SHAP-E.md §10 inputs).

Training the transmitter needs, per object, a coloured point cloud whose first ``data_ctx`` points are a
farthest-point subset, a few RGB-D views with their cameras, and surface samples for the SDF/colour losses.
Rendering and FPS are the expensive parts, so they run once, batched on the training device, for a bank of
objects; each training step then draws bank rows and computes fresh near-surface/uniform SDF samples on the device
(exact analytic distances from ``world.signed_distance_tensors``), with no Python loop per object.

Surface samples: area-uniform points of the cached marching-cubes mesh of each canonical (shape, aspect), yawed,
then projected onto the exact surface by closest-point steps p <- p - d(p) n(p) (n from the Lipschitz bound,
parallel to the exact normal on the surface). Point-cloud colours are sRGB in [0, 1] (the official point clouds
carry RGB/255 of the renders); views are composited onto black, depth is z-depth clamped at ``max_depth``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from engine.models.encoder_inputs import EncoderBatch
from engine.render.cameras import Camera

from . import data as world_data
from .world import ASPECTS, SHAPES, ObjectSpec, rotate_z, sample_spec, shape_params, signed_distance_tensors

FOV = 0.7
CAMERA_DISTANCE = 4.0


def _param_table(device) -> torch.Tensor:
    """(8 shapes, 3 aspects, 4) canonical shape parameters."""
    return torch.stack([torch.stack([shape_params(s, a) for a in range(len(ASPECTS))])
                        for s in range(len(SHAPES))]).to(device=device, dtype=torch.float32)


def _fast_normals(shape, prm, yaw, p: torch.Tensor, h: float = 1e-4) -> torch.Tensor:
    g = []
    for i in range(3):
        e = torch.zeros(3, dtype=p.dtype, device=p.device)
        e[i] = h
        g.append(signed_distance_tensors(shape, prm, yaw, p + e, fast=True)
                 - signed_distance_tensors(shape, prm, yaw, p - e, fast=True))
    n = torch.stack(g, -1)
    return n / n.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def surface_points(shape: torch.Tensor, aspect: torch.Tensor, yaw: torch.Tensor, n: int,
                   generator: torch.Generator, *, project_steps: int = 2) -> torch.Tensor:
    """(B, n, 3) points on the exact surfaces of objects given as index tensors on one device.

    ``generator`` must live on that device. One inverse-CDF draw per (shape, aspect) group, not per object.
    """
    dev = shape.device
    B = shape.shape[0]
    out = torch.empty(B, n, 3, device=dev)
    for key in torch.unique(shape * len(ASPECTS) + aspect).tolist():
        s, a = divmod(int(key), len(ASPECTS))
        rows = ((shape == s) & (aspect == a)).nonzero().squeeze(1)
        v, f = world_data.canonical_mesh(s, a)
        tri = v[f].to(device=dev, dtype=torch.float32)  # (F, 3, 3)
        area = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1)
        cdf = area.cumsum(0) / area.sum()
        m = rows.numel() * n
        idx = torch.searchsorted(cdf, torch.rand(m, generator=generator, device=dev)).clamp(max=len(cdf) - 1)
        u = torch.rand(m, 2, generator=generator, device=dev)
        u = torch.where((u.sum(-1) > 1)[:, None], 1 - u, u)
        t = tri[idx]
        p = t[:, 0] + u[:, :1] * (t[:, 1] - t[:, 0]) + u[:, 1:] * (t[:, 2] - t[:, 0])
        out[rows] = p.view(rows.numel(), n, 3)
    out = rotate_z(out, yaw)
    prm = _param_table(dev)[shape, aspect]
    for _ in range(project_steps):
        d = signed_distance_tensors(shape, prm, yaw, out)
        out = out - d[..., None] * _fast_normals(shape, prm, yaw, out)
    return out


def fps_order(points: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Permutation (B, N): the k farthest-point picks in selection order, then the other points in input order."""
    B, N, _ = points.shape
    first = world_data.farthest_point_sampling(points, k, generator)  # (B, k)
    rank = torch.arange(N, device=points.device).expand(B, N) + k
    rank = rank.scatter(1, first, torch.arange(k, device=points.device).expand(B, k).contiguous())
    return rank.argsort(dim=1)


@dataclass
class ObjectBank:
    """M objects with encoder inputs; every tensor has the object axis first and lives on one device."""

    shape: torch.Tensor  # (M,) long
    aspect: torch.Tensor  # (M,) long
    color: torch.Tensor  # (M,) long
    yaw: torch.Tensor  # (M,) float
    jitter: torch.Tensor  # (M,) float sRGB value jitter (factor - 1)
    srgb: torch.Tensor  # (M, 3) object colour with value jitter, sRGB
    points: torch.Tensor  # (M, 6, N) xyz then sRGB, first data_ctx points FPS-ordered
    surface: torch.Tensor  # (M, S, 3) exact surface samples for the losses
    views: torch.Tensor  # (M, V, H, W, 3) uint8 sRGB over black
    alphas: torch.Tensor  # (M, V, H, W) bool
    depths: torch.Tensor  # (M, V, H, W) float16 z-depth clamped at max_depth
    cameras: torch.Tensor  # (M, V, 4, 3) origin, x, y, z

    def __len__(self) -> int:
        return self.shape.shape[0]

    @property
    def device(self) -> torch.device:
        return self.shape.device

    def kind(self) -> torch.Tensor:
        return (self.shape * len(ASPECTS) + self.aspect) * 12 + self.color

    def params(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(shape, prm (B, 4), yaw) of rows ``idx`` for ``world.signed_distance_tensors``."""
        return self.shape[idx], _param_table(self.device)[self.shape[idx], self.aspect[idx]], self.yaw[idx]

    def encoder_batch(self, idx: torch.Tensor) -> EncoderBatch:
        """The encoder's tensor contract (engine.models.encoder_inputs) for rows ``idx``."""
        views = self.views[idx]
        B, V, H, W, _ = views.shape
        cam = self.cameras[idx].reshape(B * V, 4, 3)
        origin, direction = Camera(cam[:, 0], cam[:, 1], cam[:, 2], cam[:, 3], W, H, FOV, FOV).rays()
        return EncoderBatch(
            points=self.points[idx].float(),
            views=(views.float() / 127.5 - 1).permute(0, 1, 4, 2, 3),
            depths=self.depths[idx].float()[:, :, None],
            alphas=self.alphas[idx].float()[:, :, None],
            rays=torch.stack([origin, direction], dim=-2).view(B, V, H, W, 2, 3),
            camera_z=cam[:, 3].reshape(B, V, 3),
        )

    def select(self, idx: torch.Tensor | slice) -> "ObjectBank":
        """The bank of rows ``idx`` (an index tensor or a slice)."""
        return ObjectBank(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def specs(self, idx: torch.Tensor | None = None) -> list[ObjectSpec]:
        idx = torch.arange(len(self)) if idx is None else idx.cpu()
        return [ObjectSpec(int(self.shape[i]), int(self.aspect[i]), int(self.color[i]), float(self.yaw[i]),
                           float(self.jitter[i])) for i in idx.tolist()]

    def state(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).cpu() for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device=None) -> "ObjectBank":
        return cls(**{f.name: state[f.name].to(device) for f in fields(cls)})

    @classmethod
    def concat(cls, banks: list["ObjectBank"]) -> "ObjectBank":
        return cls(**{f.name: torch.cat([getattr(b, f.name) for b in banks]) for f in fields(cls)})


def sample_specs(n: int, generator: torch.Generator, *, split: str = "train", jitter: float = 0.05
                 ) -> list[ObjectSpec]:
    return [sample_spec(generator, split=split, jitter=jitter) for _ in range(n)]


def build_bank(specs: list[ObjectSpec], generator: torch.Generator, *, n_points: int, data_ctx: int,
               n_surface: int, n_views: int, image_size: int, max_depth: float = 9.0,
               device: torch.device | str = "cpu", chunk: int = 256) -> ObjectBank:
    """Encoder inputs and surface samples for ``specs``, computed on ``device`` in chunks of ``chunk`` objects.

    ``generator`` is a CPU generator (camera directions, FPS starts); a device generator seeded from it draws the
    surface samples, so a bank is a deterministic function of the specs and the generator state.
    """
    dev = torch.device(device)
    dgen = torch.Generator(device=dev)
    dgen.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    parts = []
    for start in range(0, len(specs), chunk):
        sp = specs[start:start + chunk]
        shape = torch.tensor([s.shape for s in sp], device=dev)
        aspect = torch.tensor([s.aspect for s in sp], device=dev)
        yaw = torch.tensor([s.yaw for s in sp], device=dev, dtype=torch.float32)
        srgb = torch.stack([s.srgb() for s in sp]).to(dev, torch.float32)
        surf = surface_points(shape, aspect, yaw, n_points + n_surface, dgen)
        cloud = surf[:, :n_points]
        order = fps_order(cloud, min(data_ctx, n_points), generator)
        cloud = torch.gather(cloud, 1, order[..., None].expand(-1, -1, 3))
        cloud = torch.cat([cloud, srgb[:, None].expand(-1, n_points, 3)], -1).transpose(1, 2)
        mv = world_data.multiview(sp, generator, n_views=n_views, size=image_size, distance=CAMERA_DISTANCE,
                                  fov=FOV, device=dev)
        cams = torch.stack([mv[k] for k in ("origin", "x", "y", "z")], 2).to(dev, torch.float32)
        parts.append(ObjectBank(
            shape=shape, aspect=aspect, color=torch.tensor([s.color for s in sp], device=dev), yaw=yaw,
            jitter=torch.tensor([s.value_jitter for s in sp], device=dev, dtype=torch.float32), srgb=srgb,
            points=cloud.contiguous(), surface=surf[:, n_points:].contiguous(),
            views=(mv["rgba"][..., :3] * 255).round().clamp(0, 255).to(torch.uint8),
            alphas=mv["rgba"][..., 3] >= 0.5,
            depths=mv["depth"].clamp(max=max_depth).to(torch.float16), cameras=cams,
        ))
    return ObjectBank.concat(parts)
