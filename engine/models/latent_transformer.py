"""Shap-E latent diffusion prior (text300M / image300M), checkpoint-compatible (SHAP-E.md §3.1-3.4, §9).

Official layout: ``SplitVectorDiffusion`` wrapping ``CLIPImagePointDiffusionTransformer`` (text) or
``CLIPImageGridPointDiffusionTransformer`` (image). The state_dict keys here are exactly the official ones, with the
``wrapped.`` prefix, so the official ``text_cond.pt`` / ``image_cond.pt`` load strictly.

Sequence (§3.2): text ``[clip_token, time_token, latent tokens]``; image ``[time_token, grid tokens, latent tokens]``.
Pre-LN residual blocks; attention with ``c_qkv`` rows interleaved *per head* (q|k|v for head 0, then head 1, ...).

Speed note: the official attention scales q and k by d^-1/4 each, takes an einsum, a float32 softmax and a second
einsum. Here q/k/v are strided views of the ``c_qkv`` output handed to ``scaled_dot_product_attention`` with
scale 1/sqrt(d): the same function (softmax accumulated in float32 by every SDPA backend), equal to the official
numbers within ~1e-6 in fp32 (tests/engine/test_prior.py), but without materialising the (T, T) weights per head
on CPU and with flash kernels on CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PriorConfig
from ..records import EngineError

LN_EPS = 1e-5


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)] with f_k = exp(-ln(max_period) k / (dim/2)) (cos first, §3.2).  (B,) -> (B, dim) f32"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention; parameter names ``c_qkv`` / ``c_proj`` as the official MultiheadAttention."""

    def __init__(self, width: int, heads: int, **factory):
        super().__init__()
        if width % heads:
            raise EngineError(f"width {width} is not divisible by heads {heads}", "fix the prior config")
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width, **factory)
        self.c_proj = nn.Linear(width, width, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        d = w // self.heads
        qkv = self.c_qkv(x).view(b, n, self.heads, 3, d)  # per-head interleaved q|k|v rows
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # 3 x (B, H, T, d) strided views, no copy
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d))  # (B, H, T, d)
        return self.c_proj(out.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    """Linear(w -> 4w) -> exact GELU -> Linear(4w -> w); also the time embedding MLP (``time_embed``)."""

    def __init__(self, width: int, **factory):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width, **factory)
        self.c_proj = nn.Linear(4 * width, width, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualBlock(nn.Module):
    """x += attn(ln_1 x); x += mlp(ln_2 x)."""

    def __init__(self, width: int, heads: int, **factory):
        super().__init__()
        self.attn = Attention(width, heads, **factory)
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS, **factory)
        self.mlp = MLP(width, **factory)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        # Inference: accumulate into the residual stream in place (saves two (B, T, W) allocations per block).
        # Under autocast the branch outputs may be fp16 while x is fp32; add_ promotes into x's dtype.
        x.add_(self.attn(self.ln_1(x)))
        x.add_(self.mlp(self.ln_2(x)))
        return x


class Backbone(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, **factory):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, **factory) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class PointDiffusionTransformer(nn.Module):
    """The official ``CLIPImage[Grid]PointDiffusionTransformer`` (the ``wrapped`` module), token-major I/O."""

    def __init__(self, cfg: PriorConfig, **factory):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        # Registration order follows the official module so state_dict order matches the manifests too.
        self.time_embed = MLP(w, **factory)
        self.ln_pre = nn.LayerNorm(w, eps=LN_EPS, **factory)
        self.backbone = Backbone(w, cfg.layers, cfg.heads, **factory)
        self.ln_post = nn.LayerNorm(w, eps=LN_EPS, **factory)
        self.input_proj = nn.Linear(cfg.token_channels, w, **factory)
        self.output_proj = nn.Linear(w, cfg.output_channels, **factory)
        self.pos_emb = nn.Parameter(torch.empty(cfg.latent_ctx, w, **factory))
        if cfg.cond == "text":
            self.clip_embed = nn.Linear(cfg.clip_dim, w, **factory)
        else:
            self.clip_embed = nn.Sequential(nn.LayerNorm(cfg.clip_dim, eps=LN_EPS, **factory),
                                            nn.Linear(cfg.clip_dim, w, **factory))

    def cond_tokens(self, t: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
        """The leading condition tokens, in official order.  -> list of (B, n_i, W)"""
        t_emb = self.time_embed(timestep_embedding(t, self.cfg.width))[:, None]  # (B, 1, W)
        if self.cfg.cond == "text":
            # Unit CLIP vector rescaled to unit variance per feature; zero vector = unconditional (-> bias only).
            c = self.clip_embed(cond * math.sqrt(cond.shape[1]))[:, None]  # (B, 1, W)
            return [c, t_emb]
        grid = self.clip_embed(cond.transpose(1, 2))  # (B, C, L) channels-first -> (B, L, W)
        return [t_emb, grid]

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                out_channels: int | None = None) -> torch.Tensor:
        """tokens (B, ctx, C) -> (B, ctx, out) where out = output_channels (or the first ``out_channels``)."""
        h = self.input_proj(tokens) + self.pos_emb  # (B, ctx, W)
        prefix = self.cond_tokens(t, cond)
        n_prefix = sum(p.shape[1] for p in prefix)
        h = torch.cat([p.to(h.dtype) for p in prefix] + [h], dim=1)  # (B, n_prefix + ctx, W)
        h = self.ln_pre(h)
        h = self.backbone(h)
        h = self.ln_post(h[:, n_prefix:])  # LN is per token: dropping the prefix first is equivalent and cheaper
        if out_channels is None:
            return self.output_proj(h)
        return F.linear(h, self.output_proj.weight[:out_channels], self.output_proj.bias[:out_channels])


class LatentPrior(nn.Module):
    """``SplitVectorDiffusion``: flat token-major latents in, ``[x0 flat | variance flat]`` out (§3.1).

    ``cond``: text -> (B, clip_dim) unit CLIP text embeddings; image -> (B, clip_dim, grid_tokens) CLIP grid,
    channels first. An all-zero row is the unconditional branch. Conditioning dropout for training is done by the
    training loop (probability ``cond_drop_prob``), not here.
    """

    def __init__(self, cfg: PriorConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if cfg.d_latent % cfg.latent_ctx:
            raise EngineError(f"d_latent {cfg.d_latent} is not a multiple of latent_ctx {cfg.latent_ctx}",
                              "fix the prior config")
        self.cfg = cfg
        self.cond_drop_prob = cfg.cond_drop_prob
        self.wrapped = PointDiffusionTransformer(cfg, device=device, dtype=dtype)
        if self.wrapped.pos_emb.device.type != "meta":
            self.init_weights()

    @property
    def d_latent(self) -> int:
        return self.cfg.d_latent

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Official init for training from scratch (§3.4): block and time-MLP linears ~ N(0, (0.25/sqrt(W))^2) with
        zero bias, ``output_proj`` zero, ``pos_emb`` ~ pos_emb_init_scale * N(0, 1); input_proj / clip_embed keep
        PyTorch's default Linear init (the official code does not re-initialise them)."""
        m, cfg = self.wrapped, self.cfg
        std = cfg.init_scale / math.sqrt(cfg.width)
        linears = [m.time_embed.c_fc, m.time_embed.c_proj]
        for blk in m.backbone.resblocks:
            linears += [blk.attn.c_qkv, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj]
        for lin in linears:
            lin.weight.normal_(0.0, std, generator=generator)
            lin.bias.zero_()
        for lin in [m.input_proj, m.clip_embed if cfg.cond == "text" else m.clip_embed[1]]:
            bound = 1.0 / math.sqrt(lin.in_features)  # nn.Linear default: U(-1/sqrt(fan_in), +) for W and b
            lin.weight.uniform_(-bound, bound, generator=generator)
            lin.bias.uniform_(-bound, bound, generator=generator)
        for ln in [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]:
            ln.weight.fill_(1.0)
            ln.bias.zero_()
        m.output_proj.weight.zero_()
        m.output_proj.bias.zero_()
        m.pos_emb.normal_(0.0, 1.0, generator=generator).mul_(cfg.pos_emb_init_scale)

    def _check(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> None:
        cfg = self.cfg
        if x.ndim != 2 or x.shape[1] != cfg.d_latent:
            raise EngineError(f"prior input has shape {tuple(x.shape)}, expected (B, {cfg.d_latent})",
                              "pass flat token-major latents")
        want = (cfg.clip_dim,) if cfg.cond == "text" else (cfg.clip_dim, cfg.clip_grid_tokens)
        if tuple(cond.shape[1:]) != want or cond.shape[0] != x.shape[0] or t.shape != (x.shape[0],):
            raise EngineError(f"prior condition {tuple(cond.shape)} / timesteps {tuple(t.shape)} do not match a "
                              f"batch of {x.shape[0]} ({cfg.cond} prior expects (B, {', '.join(map(str, want))}))",
                              "use the conditioner that belongs to this model")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, d_latent), t (B,) long, cond -> (B, 2 d_latent) = [x0 prediction | variance values]."""
        self._check(x, t, cond)
        b, c = x.shape[0], self.cfg.token_channels
        h = self.wrapped(x.reshape(b, self.cfg.latent_ctx, c), t, cond)  # (B, ctx, 2C)
        if h.shape[-1] == c:
            return h.reshape(b, -1)
        return torch.cat([h[..., :c].reshape(b, -1), h[..., c:].reshape(b, -1)], dim=1)

    def predict_x0(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Only the x0 half: (B, d_latent). Skips the variance half of ``output_proj``."""
        self._check(x, t, cond)
        b, c = x.shape[0], self.cfg.token_channels
        return self.wrapped(x.reshape(b, self.cfg.latent_ctx, c), t, cond, out_channels=c).reshape(b, -1)


__all__ = ["LatentPrior", "PointDiffusionTransformer", "timestep_embedding"]
