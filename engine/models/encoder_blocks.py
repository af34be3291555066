"""Building blocks of the transmitter encoder (SHAP-E.md §10, §12.2): NeRF positional encoding and the
pre-LayerNorm perceiver blocks (self-attention ``processor`` blocks and cross-attention ``encoder`` blocks).

Checkpoint layout facts reproduced here:
* ``c_qkv`` / ``c_kv`` rows are grouped per head: the output of ``c_qkv`` viewed as (T, heads, 3·C) splits into
  [q | k | v] of C channels *inside* each head (not three contiguous W-blocks); ``c_kv`` likewise [k | v].
* Attention scale 1/sqrt(C) (the official code multiplies q and k by C^-1/4 each; same result), softmax over keys.
* MLP: Linear(W, 4W) -> exact (erf) GELU -> Linear(4W, W).
* Init: every perceiver/transformer Linear ~ N(0, (init_scale/sqrt(W))^2), zero bias (only matters for training).
Attention runs through ``scaled_dot_product_attention`` so long key sets (16k points, 20k patches) never
materialise the full weight matrix on backends with fused kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def posenc_nerf(x: torch.Tensor, octaves: int = 15) -> torch.Tensor:
    """[x, sin(2^k x), cos(2^k x)] with k = 0..octaves-1; (..., D) -> (..., D·(1 + 2·octaves)).

    Feature order (what the checkpoint's first layers expect): x, then the sines ordered octave-major
    (index = k·D + d), then the cosines in the same order. The cosine is computed as sin(a + π/2) in the input
    dtype, like the official code: for a = 2^14·x the fp32 rounding of a + π/2 differs from cos(a) by up to ~1e-3.
    """
    scales = 2.0 ** torch.arange(octaves, device=x.device, dtype=x.dtype)  # (L,)
    *shape, dim = x.shape
    xb = (x[..., None, :] * scales[:, None]).reshape(*shape, octaves * dim)  # (..., L·D)
    emb = torch.cat([xb, xb + math.pi / 2.0], dim=-1).sin()
    return torch.cat([x, emb], dim=-1)


def posenc_width(dim: int, octaves: int = 15) -> int:
    return dim * (1 + 2 * octaves)


def _init_linear(layer: nn.Linear, std: float) -> None:
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, T, H, C), k/v (B, S, H, C) -> (B, T, H·C)."""
    b, t, h, c = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, T, C)
    return out.transpose(1, 2).reshape(b, t, h * c)


class MLP(nn.Module):
    def __init__(self, width: int, init_std: float):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)
        self.gelu = nn.GELU()
        _init_linear(self.c_fc, init_std)
        _init_linear(self.c_proj, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, init_std: float):
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        _init_linear(self.c_qkv, init_std)
        _init_linear(self.c_proj, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        qkv = self.c_qkv(x).view(b, t, self.heads, 3 * (w // self.heads))  # per-head [q|k|v]
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, T, H, C)
        return self.c_proj(_attend(q, k, v))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int, init_std: float, data_width: int | None = None):
        super().__init__()
        self.heads = heads
        self.c_q = nn.Linear(width, width)
        self.c_kv = nn.Linear(width if data_width is None else data_width, 2 * width)
        self.c_proj = nn.Linear(width, width)
        for layer in (self.c_q, self.c_kv, self.c_proj):
            _init_linear(layer, init_std)

    def forward(self, x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        s = data.shape[1]
        c = w // self.heads
        q = self.c_q(x).view(b, t, self.heads, c)
        kv = self.c_kv(data).view(b, s, self.heads, 2 * c)  # per-head [k|v]
        k, v = kv.chunk(2, dim=-1)
        return self.c_proj(_attend(q, k, v))


class SelfAttentionBlock(nn.Module):
    """x += attn(ln_1(x)); x += mlp(ln_2(x)) (official ResidualAttentionBlock)."""

    def __init__(self, width: int, heads: int, init_std: float):
        super().__init__()
        self.attn = SelfAttention(width, heads, init_std)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = MLP(width, init_std)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CrossAttentionBlock(nn.Module):
    """x += attn(ln_1(x), ln_2(data)); x += mlp(ln_3(x)) (official ResidualCrossAttentionBlock)."""

    def __init__(self, width: int, heads: int, init_std: float):
        super().__init__()
        self.attn = CrossAttention(width, heads, init_std)
        self.ln_1 = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, init_std)
        self.ln_3 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), self.ln_2(data))
        return x + self.mlp(self.ln_3(x))


class CrossAttentionStack(nn.Module):
    """Official SimplePerceiver: ``resblocks`` of cross-attention blocks against one data set."""

    def __init__(self, width: int, heads: int, layers: int, init_scale: float):
        super().__init__()
        std = init_scale / math.sqrt(width)
        self.resblocks = nn.ModuleList([CrossAttentionBlock(width, heads, std) for _ in range(layers)])

    def forward(self, x: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, data)
        return x


class SelfAttentionStack(nn.Module):
    """Official Transformer: ``resblocks`` of self-attention blocks."""

    def __init__(self, width: int, heads: int, layers: int, init_scale: float):
        super().__init__()
        std = init_scale / math.sqrt(width)
        self.resblocks = nn.ModuleList([SelfAttentionBlock(width, heads, std) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x
