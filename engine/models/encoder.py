"""The transmitter encoder: point cloud + multiview renders -> Shap-E latent (SHAP-E.md §2.4, §10; official
``PointCloudPerceiverChannelsEncoder`` with ``cross_attention_dataset: pcl_and_multiview_pcl``, ``fps_method:
first``, one unroll).

Pipeline (B batch, N points, V views of S×S pixels, W width):
1. per-point features: posenc_nerf of the 6 point channels (186) -> ``input_proj`` -> (B, N, W);
2. data tokens: ``point_conv`` set abstraction around the first ``data_ctx`` points -> (B, data_ctx, W);
3. h = ``ln_pre``([data tokens, ``output_tokens``]);
4. ``encoder.0``: cross-attention of h on the N per-point features;
5. ``encoder.1``: cross-attention on the multiview tokens: per pixel [posenc(rgb), posenc(ray origin),
   posenc(origin + distance·dir)] (279), ``unk_token`` where alpha < 0.999, ``mv_pcl_embed`` Conv 3×3 -> W/2,
   ``patch_emb`` Conv p×p stride p -> (B, V·(S/p)², W), no positional embedding;
6. ``processor``: layers − 1 self-attention blocks;
7. last latent_ctx tokens -> ``ln_post`` -> ``output_proj`` -> flatten token-major (B, latent_ctx·d_latent).
The bottleneck (tanh; in training, with probability ``bottleneck_diffusion_prob``, q_sample noise of an
inv_parabola schedule ᾱ = 1 − t^power at a random step of 1024) is separate: ``bottleneck``.

State-dict keys are the official ones below ``encoder.`` except ``params_proj.*`` (the latent -> MLP-weights
projection belongs to the decoder; ``Transmitter`` re-attaches it under ``encoder.params_proj``).

Differences from the official code, all without effect on the checkpoint: no random neighbour shuffle in the point
conv (see encoder_pointconv.py); the two multiview convolutions run composed into one (encoder_multiview.py);
the cross-attention keys are all given points/views when their number equals ``n_points``/``n_views`` (the
official random subset of the whole set only permutes keys, which attention ignores), and a random subset drawn
with ``generator`` when more are given.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn

from ..config import EncoderConfig
from ..records import EngineError
from .encoder_blocks import CrossAttentionStack, SelfAttentionStack, posenc_nerf, posenc_width
from .encoder_multiview import MultiviewPixelEmbedding, multiview_tokens, surface_points
from .encoder_pointconv import PointConv

XATTN_LAYERS = 1  # official default: one cross-attention block per data set; processor has layers − 1 blocks
BOTTLENECK_STEPS = 1024
ALPHA_THRESHOLD = 0.999  # pixels below this alpha are replaced by the learned unk_token


def inv_parabola_schedule(power: float, steps: int = BOTTLENECK_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt ᾱ_t, sqrt(1 − ᾱ_t)) in float64 for ᾱ(t) = 1 − t^power discretised like the official
    ``betas_for_alpha_bar`` (beta_i = min(1 − ᾱ(t_{i+1})/ᾱ(t_i), 0.999), ᾱ_t = Π(1 − beta))."""
    i = np.arange(steps, dtype=np.float64)
    a1 = 1 - (i / steps) ** power
    a2 = 1 - ((i + 1) / steps) ** power
    betas = np.minimum(1 - a2 / a1, 0.999)
    alpha_bar = np.cumprod(1.0 - betas)
    return torch.from_numpy(np.sqrt(alpha_bar)), torch.from_numpy(np.sqrt(1.0 - alpha_bar))


class PointCloudEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, *, device: torch.device | str | None = None):
        super().__init__()
        if cfg.pointconv_hidden[-1] != cfg.width:
            raise EngineError(f"encoder: pointconv_hidden[-1] ({cfg.pointconv_hidden[-1]}) must equal width "
                              f"({cfg.width})", "the point-conv tokens are concatenated with the latent tokens")
        if cfg.layers <= XATTN_LAYERS or cfg.width % cfg.heads or cfg.width % 2:
            raise EngineError("encoder: invalid size", "need layers >= 2 and width divisible by heads and 2")
        self.cfg = cfg
        with torch.device(device) if device is not None else contextlib.nullcontext():
            w = cfg.width
            self.output_tokens = nn.Parameter(torch.randn(cfg.latent_ctx, w))
            self.encoder = nn.ModuleList([CrossAttentionStack(w, cfg.heads, XATTN_LAYERS, cfg.init_scale)
                                          for _ in range(2)])  # 0: point cloud, 1: multiview
            self.processor = SelfAttentionStack(w, cfg.heads, cfg.layers - XATTN_LAYERS, cfg.init_scale)
            self.ln_pre = nn.LayerNorm(w)
            self.ln_post = nn.LayerNorm(w)
            self.output_proj = nn.Linear(w, cfg.d_latent)
            self.input_proj = nn.Linear(posenc_width(cfg.input_channels, cfg.pos_octaves), w)
            self.point_conv = PointConv(
                n_centres=cfg.data_ctx, radius=cfg.pointconv_radius, n_sample=cfg.pointconv_samples, d_input=w,
                d_hidden=tuple(cfg.pointconv_hidden), patch_size=cfg.pointconv_patch_size,
                stride=cfg.pointconv_stride)
            self.mv_pcl_embed = MultiviewPixelEmbedding(w // 2, cfg.pos_octaves)
            self.patch_emb = nn.Conv2d(w // 2, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self._schedule: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------------ inputs

    def check_inputs(self, points, views, depths, alphas, rays, camera_z) -> None:
        """Raise EngineError unless the tensors follow the contract of ``encoder_inputs.EncoderBatch``."""
        cfg = self.cfg
        hint = "build the inputs with engine.models.encoder_inputs.official_batch_from_arrays"

        def bad(name, t, expected):
            raise EngineError(f"encoder input {name}: shape {tuple(t.shape)}, expected {expected}", hint)

        if points.dim() != 3 or points.shape[1] != cfg.input_channels:
            bad("points", points, f"(B, {cfg.input_channels}, N)")
        b, _, n = points.shape
        if n < max(cfg.data_ctx, cfg.n_points):
            raise EngineError(f"encoder input points: {n} points, need at least {max(cfg.data_ctx, cfg.n_points)}",
                              "sample more points from the mesh (the first data_ctx must be an FPS subset)")
        if views.dim() != 5 or views.shape[0] != b or views.shape[2] != 3 or views.shape[3] != views.shape[4]:
            bad("views", views, "(B, V, 3, S, S)")
        v, s = views.shape[1], views.shape[3]
        if v < cfg.n_views:
            raise EngineError(f"encoder input views: {v} views, need at least {cfg.n_views}", hint)
        if s % cfg.patch_size:
            raise EngineError(f"encoder input views: size {s} not a multiple of patch_size {cfg.patch_size}", hint)
        for name, t in (("depths", depths), ("alphas", alphas)):
            if tuple(t.shape) != (b, v, 1, s, s):
                bad(name, t, (b, v, 1, s, s))
        if tuple(rays.shape) != (b, v, s, s, 2, 3):
            bad("rays", rays, (b, v, s, s, 2, 3))
        if tuple(camera_z.shape) != (b, v, 3):
            bad("camera_z", camera_z, (b, v, 3))

    # ------------------------------------------------------------------------------------------------ branches

    def point_features(self, points: torch.Tensor) -> torch.Tensor:
        """(B, C, N) -> (B, N, W): input_proj(posenc(points))."""
        return self.input_proj(posenc_nerf(points.transpose(1, 2), self.cfg.pos_octaves))

    def point_conv_tokens(self, points: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, N) -> data tokens (B, data_ctx, W) (before ln_pre)."""
        if features is None:
            features = self.point_features(points)
        return self.point_conv(points[:, :3].transpose(1, 2), features)

    def multiview_tokens(self, views, depths, alphas, rays, camera_z, *, fused: bool = True) -> torch.Tensor:
        """-> (B, V, (S/p)², W) patch tokens, row-major patches (``fused``: see encoder_multiview.py)."""
        b, v, _, s, _ = views.shape
        mask = alphas if alphas.dtype == torch.bool else alphas >= ALPHA_THRESHOLD  # (B, V, 1, S, S)
        origin, position = surface_points(depths, rays, camera_z)  # (B, V, S, S, 3) each
        tok = multiview_tokens(self.mv_pcl_embed, self.patch_emb, views.permute(0, 1, 3, 4, 2).flatten(0, 1),
                               origin.flatten(0, 1), position.flatten(0, 1), mask.reshape(b * v, s, s), fused=fused)
        return tok.view(b, v, -1, self.cfg.width)

    # ------------------------------------------------------------------------------------------------ forward

    def encode(self, points, views, depths, alphas, rays, camera_z, *,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Official ``encode_to_vector``: -> latent before the bottleneck, (B, latent_ctx·d_latent).

        points (B, 6, N) xyz in [-1, 1] then RGB in [0, 1], first data_ctx points an FPS subset; views
        (B, V, 3, S, S) in [-1, 1]; depths (B, V, 1, S, S) z-depth; alphas (B, V, 1, S, S) in [0, 1] or a bool
        mask; rays (B, V, S, S, 2, 3) per-pixel (origin, unit direction); camera_z (B, V, 3).
        ``generator`` only matters when more than n_points points / n_views views are given (random subset).
        """
        self.check_inputs(points, views, depths, alphas, rays, camera_z)
        cfg = self.cfg
        b = points.shape[0]
        feats = self.point_features(points)  # (B, N, W)
        data_tokens = self.point_conv_tokens(points, feats)  # (B, data_ctx, W)
        h = torch.cat([data_tokens, self.output_tokens[None].expand(b, -1, -1)], dim=1)
        h = self.ln_pre(h)  # (B, data_ctx + latent_ctx, W)
        mv = self.multiview_tokens(views, depths, alphas, rays, camera_z)  # (B, V, P, W)
        h = self.encoder[0](h, _subset(feats, cfg.n_points, generator))
        h = self.encoder[1](h, _subset(mv, cfg.n_views, generator).flatten(1, 2))
        h = self.processor(h)
        h = self.output_proj(self.ln_post(h[:, -cfg.latent_ctx:]))  # (B, latent_ctx, d_latent)
        return h.flatten(1)

    def bottleneck(self, x: torch.Tensor, *, training: bool,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """tanh; in training, q_sample(tanh x, t) with t ~ U{0..1023} with probability p, else t = 0."""
        x = x.tanh()
        if not training:
            return x
        if self._schedule is None:
            self._schedule = inv_parabola_schedule(self.cfg.bottleneck_power)
        gdev = generator.device if generator is not None else x.device
        b = x.shape[0]
        # Draw order as the official ClampDiffusionNoiseBottleneck: randint, rand, randn.
        t = torch.randint(0, BOTTLENECK_STEPS, (b,), generator=generator, device=gdev)
        use = torch.rand(b, generator=generator, device=gdev) < self.cfg.bottleneck_diffusion_prob
        t = torch.where(use, t, torch.zeros_like(t)).cpu()
        noise = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
        sa, sb = (c[t].float().to(x.device).view(b, *([1] * (x.dim() - 1))) for c in self._schedule)
        return sa * x + sb * noise

    def forward(self, points, views, depths, alphas, rays, camera_z, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """encode then bottleneck (noise only in training mode)."""
        x = self.encode(points, views, depths, alphas, rays, camera_z, generator=generator)
        return self.bottleneck(x, training=self.training, generator=generator)

    def encode_batch(self, batch, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``encode`` on an ``encoder_inputs.EncoderBatch``."""
        return self.encode(*batch.tensors(), generator=generator)


def _subset(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """x (B, M, ...) -> (B, k, ...): all of x when M == k, else an independent random k-subset per batch row."""
    b, m = x.shape[:2]
    if m == k:
        return x
    gdev = generator.device if generator is not None else x.device
    idx = torch.rand(b, m, generator=generator, device=gdev).argsort(dim=1)[:, :k].to(x.device)
    return x[torch.arange(b, device=x.device)[:, None], idx]


__all__ = ["PointCloudEncoder", "inv_parabola_schedule"]
