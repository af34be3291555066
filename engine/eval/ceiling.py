"""Ceilings of the eval: what the metrics would be with a perfect prior, a compositional one, or perfect meshes.

For each kind, ``seeds`` random instances (yaw, shade jitter) are encoded by the model's own transmitter (point
cloud + multiview renders, as in training) and decoded again through the same extraction as generation; the
meshes are scored like generated ones. A prior can at best reproduce these latents, so the gap between this row
and the generation rows is the prior's share of the error, and this row's gap to 100 % is the autoencoder's.
(For the mini model's held-out kinds the encoder never saw the (shape, colour) pair either.)
``additive_ceiling`` decodes latents composed from trained kinds only; ``ground_truth_meshes`` scores the targets.
"""

from __future__ import annotations

import functools
import time

import torch

from ..training.world import ObjectSpec, kind_from_index
from .metrics import score_mesh


@torch.no_grad()
def encode_instances(transmitter, kind: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """Latents (n, d_latent) of ``n`` random instances of one kind, encoded as in training (eval mode)."""
    from ..training.encode_dataset import random_instances

    return encode_specs(transmitter, random_instances(kind, n, generator), generator)


def encode_specs(transmitter, specs: list, generator: torch.Generator) -> torch.Tensor:
    """Latents (len(specs), d_latent) of these objects, encoded as in training (eval mode)."""
    from ..training.object_bank import build_bank

    enc = transmitter.encoder.cfg
    bank = build_bank(specs, generator, n_points=enc.n_points, data_ctx=enc.data_ctx, n_surface=0,
                      n_views=enc.n_views, image_size=enc.image_size, max_depth=enc.max_depth)
    return transmitter.encode_batch(bank.encoder_batch(torch.arange(len(specs))), training=False).float()


@torch.no_grad()
def autoencoder_ceiling(kinds: list[int], *, model: str = "mini", seeds: int = 2, grid: int = 64,
                        seed: int = 4321, tally=None):
    """Encode and decode ``seeds`` instances of every kind; returns the filled ``Tally`` (engine.eval.run)."""
    from .. import registry
    from ..geometry.extract import extract_mesh
    from .run import Tally

    tally = tally if tally is not None else Tally()
    transmitter = registry.load_transmitter(model, "cpu")
    g = torch.Generator().manual_seed(seed)
    for k in kinds:
        t0 = time.perf_counter()
        latents = encode_instances(transmitter, k, seeds, g)
        meshes = [extract_mesh(transmitter.decoder, z, grid_size=grid) for z in latents]
        tally.seconds += time.perf_counter() - t0
        target = ObjectSpec(*kind_from_index(k))
        for mesh in meshes:
            tally.add(k, mesh, score_mesh(mesh, target))
    return tally


def _design(kinds) -> torch.Tensor:
    """One-hot rows: (shape, aspect) among the first 24 columns, colour among the last 12."""
    from ..training.world import ASPECTS, COLORS, SHAPES

    n_sa = len(SHAPES) * len(ASPECTS)
    x = torch.zeros(len(kinds), n_sa + len(COLORS), dtype=torch.float64)
    for i, k in enumerate(kinds):
        s, a, c = kind_from_index(k)
        x[i, s * len(ASPECTS) + a] = 1.0
        x[i, n_sa + c] = 1.0
    return x


@functools.lru_cache(maxsize=4)
@torch.no_grad()
def _additive_fit(model: str, source: str, instances: int, seed: int, fit_kinds: tuple[int, ...]
                  ) -> tuple[torch.Tensor, float]:
    """Least-squares coefficients (36, d_latent) of the trained kinds' mean latents, and the fit's MSE
    (``source``: the weights folder, part of the cache key)."""
    from .. import registry

    transmitter = registry.load_transmitter(model, "cpu")
    g = torch.Generator().manual_seed(seed)
    means = torch.stack([encode_instances(transmitter, k, instances, g).mean(0) for k in fit_kinds]).double()
    x = _design(fit_kinds)
    coef = torch.linalg.lstsq(x, means).solution
    return coef, float((x @ coef - means).square().mean())


@torch.no_grad()
def additive_ceiling(kinds: list[int], *, model: str = "mini", instances: int = 2, grid: int = 64,
                     seed: int = 8765, fit_kinds: list[int] | None = None, tally=None):
    """Score what a prior that composes shape and colour additively in latent space would give.

    Every TRAIN kind is encoded (``instances`` each) and its mean latent fitted by least squares as
    ``G[shape, aspect] + C[colour]``; for each of ``kinds`` the fitted sum is decoded and scored. A held-out kind's
    latent is thus built only from trained kinds that share its shape or its colour, never from its own data: the
    row says how compositional the transmitter's latent space is, i.e. what the prior could reach on held-out pairs
    by composing what it learnt. ``fit_kinds`` (default: every train kind) must be train kinds and cover the
    (shape, aspect) and colour of every kind scored; the fit is cached across calls. Returns (tally, mse of the fit
    on the trained means)."""
    from .. import registry
    from ..geometry.extract import extract_mesh
    from ..records import EngineError
    from ..training.world import allowed_kinds
    from .run import Tally

    train = tuple(allowed_kinds("train") if fit_kinds is None else fit_kinds)
    if set(train) - set(allowed_kinds("train")):
        raise EngineError("the additive fit may only use train kinds", "leave fit_kinds at its default")
    if not bool((_design(train).sum(0) > 0)[_design(kinds).sum(0) > 0].all()):
        raise EngineError("a scored kind's (shape, aspect) or colour has no trained kind in the fit",
                          "add fit kinds that share it")
    coef, fit_mse = _additive_fit(model, str(registry.MINI_DIR) if model == "mini" else "", instances, seed, train)
    tally = tally if tally is not None else Tally()
    decoder = registry.load_transmitter(model, "cpu").decoder
    for k, z in zip(kinds, (_design(kinds) @ coef).float()):
        t0 = time.perf_counter()
        mesh = extract_mesh(decoder, z, grid_size=grid)
        tally.seconds += time.perf_counter() - t0
        tally.add(k, mesh, score_mesh(mesh, ObjectSpec(*kind_from_index(k))))
    return tally, fit_mse


def ground_truth_meshes(kinds: list[int], tally=None):
    """The target objects themselves (marching cubes of the analytic SDF, flat palette colour), scored like
    generated meshes: 100 % shape and colour accuracy by construction, and the R-precision the mini CLIP gives
    perfect meshes (what that metric can reach with this CLIP)."""
    import numpy as np

    from ..training.data import canonical_mesh
    from ..training.world import COLORS
    from .run import Tally

    tally = tally if tally is not None else Tally()
    for k in kinds:
        s, a, c = kind_from_index(k)
        v, f = canonical_mesh(s, a)
        mesh = (v.numpy(), f.numpy(), np.tile(np.asarray(COLORS[c].linear), (len(v), 1)))
        tally.add(k, mesh, score_mesh(mesh, ObjectSpec(s, a, c)))
    return tally
