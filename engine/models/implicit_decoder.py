"""The implicit decoder: latent -> per-latent MLP weights (params_proj) -> NeRSTF field (SHAP-E.md §5, §9).

1. ``project`` (official ``ChannelsParamsProj`` with LayerNorm, §5.1): the flat latent is viewed as
   (B, latent_ctx, d_latent) tokens; each of the four meta layers owns R = d_hidden consecutive tokens, one per
   output row. Row r of layer k is  LN_C(W_k[r] @ x_r) + b_k[r]  with W_k[r] (C, d_latent), the LayerNorm taken over
   the C input columns of that weight row and the projection bias added *after* it (pitfall §12.7).
2. ``query_field`` (official ``MLPNeRSTFModel``, §5.2): posenc_nerf(p) (93) -> 7 Linear layers with swish between
   them; layers 0-3 use the projected weights (plus ordinary biases), 4-6 are ordinary layers. Layer 4's input has
   a 51-wide direction-encoding slot that every official use leaves all zeros, so its columns are folded away
   here; only the activations of the outputs a caller asks for are computed. ``PackedField`` is the
   inference-only fast path for many queries of one latent (one GEMM per layer, reused buffers, fused swish).
   Output slots: [0] sdf (tanh, positive inside), [1] density coarse, [2] density fine (ReLU), [3:6] STF colour,
   [6:9] NeRF coarse colour, [9:12] NeRF fine colour (sigmoid; sRGB-space values).

State-dict keys are exactly the official vector-decoder (``ChannelsDecoder``) ones: ``params_proj.projections.
nerstf__mlp__{k}__weight.{proj,norm}.{weight,bias}``, ``renderer.nerstf.mlp.{0..6}.{weight,bias}`` (weights 0-3
are persistent *buffers*, overridden at every decode) and the ``renderer.void.background`` buffer. The transmitter
checkpoint stores the projection under ``encoder.params_proj``: ``transmitter_to_decoder_keys`` renames it.
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..colors import srgb_to_linear  # noqa: F401  (extraction imports it from here)
from ..config import DecoderConfig
from ..records import EngineError
from .encoder_blocks import posenc_nerf

# Output name -> (first, last) row of the final layer.
OUTPUT_SLOTS: dict[str, tuple[int, int]] = {
    "sdf": (0, 1),
    "density_coarse": (1, 2),
    "density_fine": (2, 3),
    "stf_rgb": (3, 6),
    "nerf_rgb_coarse": (6, 9),
    "nerf_rgb_fine": (9, 12),
}
_SQUEEZED = ("sdf", "density_coarse", "density_fine")  # one-channel outputs are returned as (B, N)


def _meta_param_name(k: int) -> str:
    return f"nerstf__mlp__{k}__weight"  # official name with '.' sanitised to '__'


class ChannelsProj(nn.Module):
    """One meta layer's projection: tokens (B, R, D) -> weight rows (B, R, C)."""

    def __init__(self, rows: int, cols: int, d_latent: int, *, init_scale: float, learned_scale: float,
                 device=None):
        super().__init__()
        self.rows, self.cols, self.d_latent = rows, cols, d_latent
        self.proj = nn.Linear(d_latent, rows * cols, device=device)
        self.norm = nn.LayerNorm(cols, device=device)
        if device is None or torch.device(device).type != "meta":
            with torch.no_grad():
                nn.init.normal_(self.proj.weight, std=init_scale / math.sqrt(d_latent))
                nn.init.zeros_(self.proj.bias)
                self.norm.weight.fill_(learned_scale)
                self.norm.bias.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight.view(self.rows, self.cols, self.d_latent)  # (R, C, D)
        h = torch.einsum("brd,rcd->brc", tokens, w)  # (B, R, C): one matvec per row (the official contraction)
        h = F.layer_norm(h, (self.cols,), self.norm.weight, self.norm.bias, self.norm.eps)
        return h + self.proj.bias.view(1, self.rows, self.cols)


class ParamsProj(nn.Module):
    def __init__(self, shapes: Sequence[tuple[int, int]], d_latent: int, *, init_scale: float,
                 learned_scale: float, device=None):
        super().__init__()
        self.shapes = list(shapes)
        self.projections = nn.ModuleDict({
            _meta_param_name(k): ChannelsProj(r, c, d_latent, init_scale=init_scale, learned_scale=learned_scale,
                                              device=device)
            for k, (r, c) in enumerate(self.shapes)
        })

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for k, (rows, _) in enumerate(self.shapes):
            out.append(self.projections[_meta_param_name(k)](tokens[:, start:start + rows]))  # (B, R, C)
            start += rows
        return out


class MetaLinear(nn.Module):
    """A layer whose weight comes from params_proj: the checkpoint keeps an unused default weight as a buffer."""

    def __init__(self, d_in: int, d_out: int, device=None):
        super().__init__()
        self.register_buffer("weight", torch.empty(d_out, d_in, device=device))
        self.bias = nn.Parameter(torch.empty(d_out, device=device))


class NeRSTF(nn.Module):
    def __init__(self, cfg, device=None):
        super().__init__()
        widths_in = [cfg.d_posenc] + [cfg.d_hidden] * cfg.n_hidden_layers
        widths_out = [cfg.d_hidden] * cfg.n_hidden_layers + [cfg.d_out]
        widths_in[cfg.insert_direction_at] += cfg.d_direction
        self.mlp = nn.ModuleList([
            MetaLinear(i, o, device=device) if k < cfg.n_meta_layers else nn.Linear(i, o, device=device)
            for k, (i, o) in enumerate(zip(widths_in, widths_out))
        ])
        if device is None or torch.device(device).type != "meta":
            with torch.no_grad():  # official mlp_init: N(0, (init_scale/sqrt(fan_in))^2), zero bias
                for layer in self.mlp:
                    nn.init.normal_(layer.weight, std=cfg.init_scale / math.sqrt(layer.weight.shape[1]))
                    nn.init.zeros_(layer.bias)
                self.mlp[-1].bias[0] = cfg.initial_sdf_bias
                self.mlp[-1].bias[1] = cfg.initial_density_bias


class Void(nn.Module):
    def __init__(self, background: Sequence[float], device=None):
        super().__init__()
        self.register_buffer("background", torch.tensor(background, dtype=torch.float32, device=device) / 255.0)


class Renderer(nn.Module):
    def __init__(self, cfg: DecoderConfig, device=None):
        super().__init__()
        self.nerstf = NeRSTF(cfg.nerstf, device=device)
        self.void = Void(cfg.background, device=device)


class StaticWeights(NamedTuple):
    """The per-model (not per-latent) tensors query_field needs; w4 has the direction columns folded away."""

    biases: tuple[torch.Tensor, ...]  # one per layer
    w4: torch.Tensor  # (H, H)
    w5: torch.Tensor  # (H, H)
    w6: torch.Tensor  # (12, H)


class ImplicitDecoder(nn.Module):
    """params_proj + NeRSTF renderer with official key names. ``project`` then ``query_field``."""

    def __init__(self, cfg: DecoderConfig = DecoderConfig(), *, device: torch.device | str | None = None):
        super().__init__()
        n = cfg.nerstf
        if n.n_meta_layers != 4 or n.insert_direction_at != 4 or n.n_hidden_layers != 6 or n.d_out != 12:
            raise ValueError("ImplicitDecoder supports the official NeRSTF layout only (4 meta layers of 7, "
                             "direction slot at layer 4, 12 outputs)")
        if not cfg.params_proj.use_ln:
            raise ValueError("ImplicitDecoder supports the official params_proj with LayerNorm only")
        self.cfg = cfg
        shapes = [(n.d_hidden, n.d_posenc)] + [(n.d_hidden, n.d_hidden)] * (n.n_meta_layers - 1)
        self.params_proj = ParamsProj(shapes, cfg.params_proj.d_latent, init_scale=cfg.params_proj.init_scale,
                                      learned_scale=cfg.params_proj.learned_scale, device=device)
        self.renderer = Renderer(cfg, device=device)

    @property
    def d_latent(self) -> int:
        return self.cfg.d_latent

    def project(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """latent (B, d_latent) or (d_latent,) -> four weight matrices (B, out, in) of layers 0-3."""
        if latent.ndim == 1:
            latent = latent[None]
        if latent.ndim != 2 or latent.shape[1] != self.cfg.d_latent:
            raise EngineError(f"latent of shape {tuple(latent.shape)} does not fit this decoder "
                              f"(expects (B, {self.cfg.d_latent}))", "decode it with the model that made it")
        tokens = latent.reshape(latent.shape[0], self.cfg.latent_ctx, self.cfg.params_proj.d_latent)  # (B, T, D)
        return self.params_proj(tokens.to(self.params_proj.projections[_meta_param_name(0)].proj.weight.dtype))

    def static_weights(self) -> StaticWeights:
        mlp = self.renderer.nerstf.mlp
        h = self.cfg.nerstf.d_hidden
        return StaticWeights(biases=tuple(layer.bias for layer in mlp), w4=mlp[4].weight[:, :h],
                             w5=mlp[5].weight, w6=mlp[6].weight)

    def forward(self, latent: torch.Tensor, points: torch.Tensor,
                outputs: Sequence[str] = ("sdf", "stf_rgb")) -> dict[str, torch.Tensor]:
        return query_field(self.project(latent), points, decoder=self, outputs=outputs)

    def field_fn(self, latent: torch.Tensor, outputs: Sequence[str] = tuple(OUTPUT_SLOTS),
                 chunk: int = 65536) -> Callable[[torch.Tensor], dict]:
        """A function points (..., 3) -> dict of outputs for one latent (d_latent,), as the renderers take."""
        params = self.project(latent.reshape(1, -1))
        static = self.static_weights()

        def field(points: torch.Tensor) -> dict:
            shape = points.shape[:-1]
            out = query_field(params, points.reshape(1, -1, 3), weights=static, outputs=outputs, chunk=chunk)
            return {k: v.reshape(*shape, *v.shape[2:]) for k, v in out.items()}

        return field


def _swish(x: torch.Tensor) -> torch.Tensor:
    # x·σ(x) as two ops like the official code: F.silu rounds differently, and the steep fields (pre-activations
    # in the hundreds) amplify that last-bit difference to ~1e-4 in the SDF.
    if x.requires_grad:
        return x * torch.sigmoid(x)
    return torch.sigmoid(x).mul_(x)  # same rounding, one temporary less when no graph is recorded


def query_field(params: Sequence[torch.Tensor], points: torch.Tensor, *, decoder: ImplicitDecoder | None = None,
                weights: StaticWeights | None = None, outputs: Sequence[str] = ("sdf", "stf_rgb"),
                chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Evaluate the NeRSTF field. params: 4 tensors (B, out, in) from ``project``; points (B, N, 3).

    Give either ``decoder`` or its ``weights`` (``decoder.static_weights()``). Returns only the requested
    ``outputs`` (names in OUTPUT_SLOTS): one-channel outputs (B, N), colours (B, N, 3), in float32.
    Differentiable; runs under fp16 autocast (the position encoding stays in the points' dtype, as officially).
    """
    if weights is None:
        if decoder is None:
            raise TypeError("query_field needs decoder= or weights=")
        weights = decoder.static_weights()
    unknown = [o for o in outputs if o not in OUTPUT_SLOTS]
    if unknown or not outputs:
        raise ValueError(f"unknown outputs {unknown}; choose from {list(OUTPUT_SLOTS)}")
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be (B, N, 3), got {tuple(points.shape)}")
    if chunk is not None and points.shape[1] > chunk:
        parts = [query_field(params, points[:, i:i + chunk], weights=weights, outputs=outputs)
                 for i in range(0, points.shape[1], chunk)]
        return {k: torch.cat([p[k] for p in parts], dim=1) for k in outputs}

    h = posenc_nerf(points)  # (B, N, 93)
    for k, w in enumerate(params):  # per-latent layers 0-3: (B, N, in) @ (B, in, out) + bias
        w = w.expand(points.shape[0], -1, -1) if w.shape[0] == 1 else w
        h = _swish(torch.baddbmm(weights.biases[k].to(w.dtype), h.to(w.dtype), w.transpose(1, 2)))
    h = _swish(F.linear(h, weights.w4, weights.biases[4]))  # direction slot (zeros) folded away
    h = _swish(F.linear(h, weights.w5, weights.biases[5]))
    # All 12 rows: the last layer is ~1 % of the work, and a row subset changes the BLAS summation order, which the
    # steep fields amplify to ~5e-5 in the SDF.
    raw = F.linear(h, weights.w6, weights.biases[6]).float()  # (B, N, 12)

    out = {}
    for name in outputs:
        lo, hi = OUTPUT_SLOTS[name]
        v = raw[..., lo:hi]
        if name == "sdf":
            v = torch.tanh(v)
        elif name.startswith("density"):
            v = F.relu(v)
        else:
            v = torch.sigmoid(v)
        out[name] = v[..., 0] if name in _SQUEEZED else v
    return out


FAST_BLOCK_FLOATS = 1024 * 256  # activations per block: (1024, 256) at the official width, (8192, 32) at the mini


class PackedField:
    """Inference-only evaluation of ONE latent's field, for the many-query paths (mesh extraction).

    Same network as ``query_field`` with its per-query cost trimmed: every weight is transposed once to a
    contiguous (in, out) matrix, so each layer is one plain GEMM ``addmm(bias, h (N, in), W (in, out))`` written
    into two reused (block, H) buffers; swish is ``F.silu`` in place (one pass over the activations instead of
    sigmoid + multiply); the last layer computes only the rows asked for.

    Grid points skip the position encoding: layer 0 is linear in the encoding, whose features each depend on one
    coordinate, so W0·posenc(x, y, z) = T_x[i] + T_y[j] + T_z[k] with per-axis tables T (L, H) of the ``lattice``
    coordinates (computed once with the same ``posenc_nerf`` values). A block whose coordinates are all exactly
    lattice values takes three table rows per point (one ``embedding_bag`` sum) instead of 93 sines and a
    (93 → H) GEMM. Each of these changes the fp32 rounding, which the steep SDF pre-activations amplify to ~1e-3
    in the tanh output right at the surface: use ``query_field`` for fixture-exact values, this for meshes (whose
    fixture tolerances it meets).

    On the CPU the blocks go to ``threads`` worker threads that each run single-threaded ops: no fork/join barrier
    per op, which on a busy 2-core machine stalls every op for a scheduler slice (measured 4-8x slower than one
    thread for the 64-wide fixture field). params: 4 tensors (1, out, in) from ``project``; weights:
    ``decoder.static_weights()``; lattice: (L,) float32 coordinates, ascending and evenly spaced (the grid's
    ``linspace``); threads: default ``torch.get_num_threads()``.
    """

    def __init__(self, params: Sequence[torch.Tensor], weights: StaticWeights, *, lattice: torch.Tensor | None = None,
                 block: int | None = None, threads: int | None = None):
        if any(p.shape[0] != 1 for p in params):
            raise ValueError("PackedField evaluates one latent: params must have batch size 1")
        mats = [p[0] for p in params] + [weights.w4, weights.w5]
        self.mats = [m.detach().float().t().contiguous() for m in mats]  # (in, out) each; mats[0] (93, H)
        self.biases = [b.detach().float().contiguous() for b in weights.biases]
        self.w_out = weights.w6.detach().float()  # (12, H)
        self.width = self.mats[-1].shape[1]
        self.block = block or max(256, FAST_BLOCK_FLOATS // self.width)
        self.threads = threads or torch.get_num_threads()
        self.lattice = self.tables = None
        if lattice is not None and len(lattice) >= 2:
            self.lattice = lattice.detach().float().contiguous()  # (L,)
            octaves = (self.mats[0].shape[0] // 3 - 1) // 2
            feats = posenc_nerf(self.lattice[:, None], octaves)  # (L, 1 + 2·octaves): [x, sin_k(x), cos_k(x)]
            self.axis_mats = []  # per coordinate: (1 + 2·octaves, H) rows of W0ᵀ
            for d in range(3):  # the columns of coordinate d in the (x, y, z)-interleaved encoding
                cols = [d] + [3 + 3 * k + d for k in range(octaves)] + [3 + 3 * (octaves + k) + d
                                                                         for k in range(octaves)]
                self.axis_mats.append(self.mats[0][cols].contiguous())
            # float64 tables, summed in float64 and rounded once: layer 0 then is the correctly rounded value of
            # the encoding's dot products, no further from the official fp32 GEMM than that GEMM's own rounding.
            tables = [feats.double() @ w.double() for w in self.axis_mats]  # (L, H) each
            tables[0] += self.biases[0].double()
            self.tables = torch.cat(tables)  # (3L, H) float64

    def _layer0(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Layer 0 pre-activation of points p (m, 3) into y (m, H)."""
        if self.tables is None:
            return torch.addmm(self.biases[0], posenc_nerf(p), self.mats[0], out=y)  # posenc (m, 93)
        n = len(self.lattice)
        lo, hi = self.lattice[0], self.lattice[-1]
        idx = ((p - lo) * ((n - 1) / (hi - lo))).round_().long().clamp_(0, n - 1)  # (m, 3)
        on = self.lattice[idx] == p  # (m, 3): coordinate is exactly a lattice value
        idx += torch.arange(0, 3 * n, n, device=p.device)  # rows of the (3L, H) table
        if on.all():  # grid points: three table rows per point
            return y.copy_(F.embedding_bag(idx, self.tables, mode="sum"))
        # Mixed (e.g. mesh vertices: two coordinates on the lattice, one along an edge): the table for the
        # lattice coordinates, the encoding of that one coordinate for the others. Bias is in table 0.
        y.zero_()
        octaves = (self.mats[0].shape[0] // 3 - 1) // 2
        for d in range(3):
            rows_on, rows_off = on[:, d].nonzero()[:, 0], (~on[:, d]).nonzero()[:, 0]
            if len(rows_on):
                y.index_add_(0, rows_on, self.tables[idx[rows_on, d]].float())
            if len(rows_off):
                feats = posenc_nerf(p[rows_off, d:d + 1], octaves)  # (k, 31)
                y.index_add_(0, rows_off, feats @ self.axis_mats[d])
                if d == 0:
                    y.index_add_(0, rows_off, self.biases[0].expand(len(rows_off), -1))
        return y

    def _run_blocks(self, points: torch.Tensor, out: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
                    activation: Callable[[torch.Tensor], torch.Tensor] | None, block: int,
                    next_block: Callable[[], int], worker: bool) -> None:
        if worker:  # both settings are per thread: the caller's stay as they are
            torch.set_num_threads(1)
            # Far from the surface swish(x) of x ~ −100 underflows to subnormals, which cost a microcode assist in
            # every later op (measured 1.6x slower swish); flushing them to 0 changes no output above 1e-38.
            torch.set_flush_denormal(True)
        with torch.inference_mode():
            bufs = [torch.empty(block, self.width, device=points.device) for _ in range(2)]  # (block, H) ping-pong
            while (i := next_block() * block) < len(points):
                p = points[i:i + block].float()
                h = F.silu(self._layer0(p, bufs[0][:len(p)]), inplace=True)
                for k, (w, b) in enumerate(zip(self.mats[1:], self.biases[1:]), start=1):
                    y = bufs[k % 2][:len(p)]
                    torch.addmm(b, h, w, out=y)
                    h = F.silu(y, inplace=True)
                y = torch.addmm(b_out, h, w_out, out=out[i:i + len(p)])
                if activation is not None:
                    activation(y)  # here, not in the caller: tanh of ±hundreds also meets subnormals

    def raw(self, points: torch.Tensor, rows: tuple[int, int] = (0, 12),
            activation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """points (M, 3) -> final-layer pre-activations (M, hi − lo) of output rows [lo, hi), or their in-place
        ``activation`` (e.g. ``torch.tanh_``)."""
        lo, hi = rows
        w_out = self.w_out[lo:hi].t().contiguous()  # (H, R)
        b_out = self.biases[6][lo:hi]
        out = torch.empty(len(points), hi - lo, device=points.device)
        workers = max(1, min(self.threads, len(points) // 256))
        block = max(1, min(self.block, -(-len(points) // workers)))
        next_block = itertools.count().__next__  # atomic under the GIL: workers take blocks as they free up
        if points.device.type != "cpu":
            self._run_blocks(points, out, w_out, b_out, activation, block, next_block, False)
            return out
        caller_threads = torch.get_num_threads()
        try:
            with ThreadPoolExecutor(workers) as pool:
                args = (points, out, w_out, b_out, activation, block, next_block, True)
                jobs = [pool.submit(self._run_blocks, *args) for _ in range(workers)]
                for job in jobs:
                    job.result()
        finally:
            torch.set_num_threads(caller_threads)  # also the default that threads started later inherit
        return out

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """(M, 3) -> (M,) tanh SDF, positive inside."""
        return self.raw(points, OUTPUT_SLOTS["sdf"], torch.tanh_)[:, 0]

    def sdf_rgb(self, points: torch.Tensor) -> torch.Tensor:
        """(M, 3) -> (M, 4): tanh SDF and STF colour (sRGB-space) from one pass (rows 0-5 of the last layer)."""
        lo, hi = OUTPUT_SLOTS["stf_rgb"]

        def act(y: torch.Tensor) -> None:
            y[:, 0].tanh_()
            y[:, lo:hi].sigmoid_()

        return self.raw(points, (0, hi), act)[:, [0, *range(lo, hi)]]

    def stf_rgb(self, points: torch.Tensor) -> torch.Tensor:
        """(M, 3) -> (M, 3) STF colour after the sigmoid (sRGB-space values)."""
        return self.raw(points, OUTPUT_SLOTS["stf_rgb"], torch.sigmoid_)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint layouts

_TRANSMITTER_PROJ = "encoder.params_proj."


def transmitter_to_decoder_keys(sd: dict) -> tuple[dict, dict]:
    """Transmitter state dict -> (decoder state dict in our/vector-decoder keys, the other encoder keys).

    ``encoder.params_proj.X`` -> ``params_proj.X``; ``renderer.*`` unchanged; every other ``encoder.X`` is returned
    in the second dict as ``X`` (the keys the encoder module uses). Any other key is an EngineError.
    """
    decoder, encoder, stray = {}, {}, []
    for key, value in sd.items():
        if key.startswith(_TRANSMITTER_PROJ):
            decoder["params_proj." + key[len(_TRANSMITTER_PROJ):]] = value
        elif key.startswith("renderer."):
            decoder[key] = value
        elif key.startswith("encoder."):
            encoder[key[len("encoder."):]] = value
        else:
            stray.append(key)
    if stray or not decoder:
        raise EngineError(f"not a Shap-E transmitter checkpoint (unexpected keys: {stray[:3]})"
                          if stray else "not a Shap-E transmitter checkpoint (no renderer/params_proj keys)",
                          "use the official transmitter.pt or vector_decoder.pt")
    return decoder, encoder


def decoder_to_transmitter_keys(sd: dict) -> dict:
    """Inverse rename of the decoder part: ``params_proj.X`` -> ``encoder.params_proj.X``."""
    return {(_TRANSMITTER_PROJ + k[len("params_proj."):] if k.startswith("params_proj.") else k): v
            for k, v in sd.items()}
