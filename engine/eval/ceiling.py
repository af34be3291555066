"""The autoencoder ceiling of the eval: what the metrics would be with a perfect prior.

For each kind, ``seeds`` random instances (yaw, shade jitter) are encoded by the model's own transmitter (point
cloud + multiview renders, as in training) and decoded again through the same extraction as generation; the
meshes are scored like generated ones. A prior can at best reproduce these latents, so the gap between this row
and the generation rows is the prior's share of the error, and this row's gap to 100 % is the autoencoder's.
(For the mini model's held-out kinds the encoder never saw the (shape, colour) pair either.)
"""

from __future__ import annotations

import time

import torch

from ..training.world import ObjectSpec, kind_from_index
from .metrics import score_mesh


@torch.no_grad()
def encode_instances(transmitter, kind: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """Latents (n, d_latent) of ``n`` random instances of one kind, encoded as in training (eval mode)."""
    from ..training.encode_dataset import random_instances
    from ..training.object_bank import build_bank

    enc = transmitter.encoder.cfg
    specs = random_instances(kind, n, generator)
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
