"""Multiview branch of the transmitter encoder (SHAP-E.md §10 step 5; official MultiviewPointCloudEmbedding +
``patch_emb`` of ``encode_multiview_pcl``).

Per pixel: [posenc(rgb in [-1, 1]), posenc(ray origin), posenc(surface point)] (3 × 93 = 279 channels, NeRF
encoding with 15 octaves), the learned ``unk_token`` where alpha < 0.999, then ``mv_pcl_embed`` (Conv 3×3, pad 1,
279 -> W/2) and ``patch_emb`` (Conv p×p, stride p, W/2 -> W): (S/p)² tokens per view, row-major.

Fast path (``fused=True``, the default; same numbers up to float reassociation, ~1e-6 relative): there is no
non-linearity between the two convolutions, so they compose into one (p+2)×(p+2) stride-p convolution
279 -> W whose kernel is the full 2-D convolution of the two kernels (``conv_transpose2d(P, E)``) and whose bias is
b_P + Σ P·b_E. That is (p+2)²·W MACs per patch and input channel instead of 9·p²·W/2 (+ the patch conv) —
about 3× fewer at p = 8 — and the overlapping windows are one unfold + matmul. The unknown-token part is split
off as a rank-1 term (the mask map convolved with the kernel contracted against ``unk_token``), so the 279-channel
input needs no gradient;
when every pixel of a view shares its ray origin (pinhole cameras) the origin encoding is split off the same way.
Views are processed in chunks to bound the window buffer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoder_blocks import posenc_nerf, posenc_width

WINDOW_BUDGET = 64 * 2 ** 20  # floats per chunk of unfolded windows (256 MB)


class MultiviewPixelEmbedding(nn.Conv2d):
    """``mv_pcl_embed``: the 3×3 conv over the 279 per-pixel channels, plus ``unk_token`` (279,)."""

    def __init__(self, out_features: int, octaves: int):
        self.octaves = octaves
        in_features = 3 * posenc_width(3, octaves)
        super().__init__(in_features, out_features, kernel_size=3, padding=1)
        self.unk_token = nn.Parameter(torch.randn(in_features) * 0.01)

    def pixel_features(self, *parts: torch.Tensor) -> torch.Tensor:
        """(..., 3) each -> (..., 93·len(parts)) = [posenc(part) for part in parts], one encoding call."""
        return posenc_nerf(torch.stack(parts, dim=-2), self.octaves).flatten(-2)

    def forward(self, rgb: torch.Tensor, origin: torch.Tensor, position: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Reference path. rgb/origin/position (N, S, S, 3), mask (N, S, S, 1) bool -> (N, out, S, S)."""
        x = torch.where(mask, self.pixel_features(rgb, origin, position), self.unk_token)  # (N, S, S, 279)
        return super().forward(x.permute(0, 3, 1, 2))


def surface_points(depths: torch.Tensor, rays: torch.Tensor, camera_z: torch.Tensor):
    """z-depth (B, V, 1, S, S) + rays (B, V, S, S, 2, 3) + camera_z (B, V, 3) -> origin, point (B, V, S, S, 3).

    The z-depth is turned into a distance along the unit ray by dividing by cos(ray, optical axis).
    """
    origin, direction = rays[..., 0, :], rays[..., 1, :]
    cos = (direction * camera_z[:, :, None, None, :]).sum(-1, keepdim=True)  # (B, V, S, S, 1)
    return origin, origin + depths.permute(0, 1, 3, 4, 2) / cos * direction


def _windows(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """x (N, S, S, C) zero-padded by 1 -> (N, n, n, C·size·size) overlapping windows, channel-major."""
    x = F.pad(x, (0, 0, 1, 1, 1, 1))
    w = x.unfold(1, size, stride).unfold(2, size, stride)  # (N, n, n, C, size, size)
    return w.reshape(*w.shape[:3], -1)


def multiview_tokens(embed: MultiviewPixelEmbedding, patch_emb: nn.Conv2d, rgb: torch.Tensor, origin: torch.Tensor,
                     position: torch.Tensor, mask: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
    """rgb/origin/position (N, S, S, 3) (N = B·V), mask (N, S, S) bool -> tokens (N, (S/p)², W)."""
    n_img, s = rgb.shape[:2]
    p = patch_emb.stride[0]
    if not fused:
        y = patch_emb(embed(rgb, origin, position, mask[..., None]))  # (N, W, S/p, S/p)
        return y.flatten(2).transpose(1, 2)

    k = p + 2  # receptive field of (3×3, pad 1) followed by (p×p, stride p)
    kernel = F.conv_transpose2d(patch_emb.weight, embed.weight)  # (W, 279, k, k)
    bias = patch_emb.bias + torch.einsum("omyx,m->o", patch_emb.weight, embed.bias)
    w_unk = torch.einsum("oiyx,i->yxo", kernel, embed.unk_token).reshape(k * k, -1)  # (k·k, W)
    # Pinhole cameras give all pixels of a view one ray origin: its encoding is then a single vector per view and
    # enters as a per-view kernel on the mask map instead of as 93 of the 279 convolved channels.
    shared_origin = bool((origin == origin[:, :1, :1]).all())
    groups = kernel.unflatten(1, (3, -1))  # (W, 3, 93, k, k): rgb, origin, position
    w_feat = (groups[:, [0, 2]] if shared_origin else groups).flatten(1).t()  # (C·k·k, W), channel-major

    per_img = (s // p) ** 2 * w_feat.shape[0]
    chunk = max(1, WINDOW_BUDGET // per_img)
    out = []
    for i in range(0, n_img, chunk):
        sl = slice(i, i + chunk)
        m = mask[sl, :, :, None]
        parts = (rgb[sl], position[sl]) if shared_origin else (rgb[sl], origin[sl], position[sl])
        feats = torch.where(m, embed.pixel_features(*parts), 0.0)  # (n, S, S, C)
        tok = _windows(feats, k, p) @ w_feat  # (n, S/p, S/p, W)
        tok = tok + _windows((~m).to(tok.dtype), k, p) @ w_unk + bias
        if shared_origin:
            enc = embed.pixel_features(origin[sl, 0, 0])  # (n, 93)
            k_org = torch.einsum("oiyx,ni->nyxo", groups[:, 1], enc).flatten(1, 2)  # (n, k·k, W)
            m_win = _windows(m.to(tok.dtype), k, p)  # (n, S/p, S/p, k·k)
            tok = tok + torch.bmm(m_win.flatten(1, 2), k_org).view_as(tok)
        out.append(tok.flatten(1, 2))
    return torch.cat(out, dim=0)
