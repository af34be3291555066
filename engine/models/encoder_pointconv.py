"""PointNet++-style set abstraction that turns a point cloud into the encoder's data tokens (SHAP-E.md §10 step 2;
official ``PointSetEmbedding`` with ``fps_method: first``).

For each of the first ``n_centres`` points (the point cloud arrives farthest-point ordered, so its prefix is an FPS
subset): ball query (radius 0.5, ``n_sample`` = 64 neighbours in increasing index order, padded with the first hit)
-> features [neighbour xyz − centre xyz, neighbour feature] -> Conv2d (kernel (8, 1), stride (4, 1), circular
padding 4 along the neighbour axis) -> swish -> second such conv -> swish -> mean over the neighbour axis.

Deliberate deviation: the official ``apply_conv`` randomly permutes the neighbour axis (independently per channel)
before every conv, even at eval time (its authors left a note to revisit this). We keep neighbours in ball-query order: the shuffle only
adds noise to the latent (up to ~4e-3 on the reference fixture), makes encoding non-deterministic, and an
order-preserving conv is what the reference fixture was produced with. The official checkpoint was trained with
the shuffle, so its convs are used here on one fixed ordering of what they saw as random orderings.

Checkpoint keys: ``mlp_convs.{i}.weight`` (out, in, 8, 1) and ``.bias``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def ball_query(xyz: torch.Tensor, centres: torch.Tensor, radius: float, n_sample: int) -> torch.Tensor:
    """Indices of the first ``n_sample`` points (by index) within ``radius`` of each centre.

    xyz (B, N, 3), centres (B, S, 3) -> (B, S, n_sample) int64; short rows are padded with their first hit.
    Squared distances use the official expansion |c|² + |p|² − 2 c·p (same rounding at the radius boundary).
    """
    b, n, _ = xyz.shape
    s = centres.shape[1]
    d2 = -2 * torch.matmul(centres, xyz.transpose(1, 2))  # (B, S, N)
    d2 = d2 + (centres ** 2).sum(-1)[:, :, None]
    d2 = d2 + (xyz ** 2).sum(-1)[:, None, :]
    inside = ~(d2 > radius ** 2)
    rank = inside.cumsum(-1) - 1  # position among the hits, in index order
    slot = torch.where(inside & (rank < n_sample), rank, torch.full_like(rank, n_sample))
    idx = torch.full((b, s, n_sample + 1), n, dtype=torch.long, device=xyz.device)
    src = torch.arange(n, device=xyz.device).expand(b, s, n)
    idx.scatter_(-1, slot, src)  # slot n_sample collects every non-selected point; dropped below
    idx = idx[..., :n_sample]
    return torch.where(idx == n, idx[..., :1], idx)


def _gather_points(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """values (B, N, C), idx (B, S, K) -> (B, S, K, C)."""
    b, n, c = values.shape
    flat = (idx + torch.arange(b, device=idx.device).view(b, 1, 1) * n).reshape(-1)
    return values.reshape(b * n, c).index_select(0, flat).view(*idx.shape, c)


class PointConv(nn.Module):
    """Set abstraction around the first ``n_centres`` points; (B, N, 3) xyz + (B, N, D) features -> (B, S, D')."""

    def __init__(self, *, n_centres: int, radius: float, n_sample: int, d_input: int, d_hidden: tuple[int, ...],
                 patch_size: int = 8, stride: int = 4):
        super().__init__()
        self.n_centres = n_centres
        self.radius = radius
        self.n_sample = n_sample
        self.patch_size = patch_size
        self.stride = stride
        self.pad = patch_size // 2
        self.mlp_convs = nn.ModuleList()
        last = d_input + 3
        for out in d_hidden:
            # Stored like the official Conv2d (kernel (k, 1) over [neighbour, centre]); applied in forward.
            self.mlp_convs.append(nn.Conv2d(last, out, kernel_size=(patch_size, 1), stride=(stride, 1),
                                            padding=(self.pad, 0), padding_mode="circular"))
            last = out

    def neighbours(self, xyz: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) -> ball-query indices (B, S, n_sample) of the first S points."""
        return ball_query(xyz, xyz[:, : self.n_centres], self.radius, self.n_sample)

    def _taps(self, length: int) -> torch.Tensor:
        """(L_out, k) input positions of each conv tap: stride, circular padding folded into the indices."""
        n_out = (length + 2 * self.pad - self.patch_size) // self.stride + 1
        pos = torch.arange(n_out)[:, None] * self.stride + torch.arange(self.patch_size) - self.pad
        return pos % length

    def _tap_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """Conv weight (O, C, k, 1) -> (k·C, O), tap-major, matching windows flattened as (tap, channel)."""
        return w[..., 0].permute(2, 1, 0).reshape(-1, w.shape[0])

    def forward(self, xyz: torch.Tensor, features: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """xyz (B, N, 3), features (B, N, D) -> (B, S, D'). The convs run as window gathers + matmuls (their
        backward is matmuls too, ~2x cheaper on CPU than the strided-conv backward)."""
        if idx is None:
            idx = self.neighbours(xyz)  # (B, S, K)
        b, s, k = idx.shape
        taps = self._taps(k).to(idx.device)  # (L1, k_conv)
        win = idx[:, :, taps]  # (B, S, L1, k_conv) point index of every tap of every output position
        l1 = win.shape[2]
        rel = _gather_points(xyz, win.flatten(2)).view(b, s, l1, -1, 3) - xyz[:, :s, None, None, :]
        feat = _gather_points(features, win.flatten(2)).view(b, s, l1, -1)  # (B, S, L1, k_conv·D)
        w = self.mlp_convs[0].weight  # (O, 3 + D, k_conv, 1): input channels [relative xyz, feature]
        h = (feat @ self._tap_matrix(w[:, 3:]) + rel.flatten(3) @ self._tap_matrix(w[:, :3])
             + self.mlp_convs[0].bias)  # (B, S, L1, O)
        h = h * torch.sigmoid(h)  # swish
        for conv in self.mlp_convs[1:]:
            taps = self._taps(h.shape[2]).to(h.device)
            h = h[:, :, taps].flatten(3) @ self._tap_matrix(conv.weight) + conv.bias
            h = h * torch.sigmoid(h)
        return h.mean(dim=2)  # (B, S, D')
