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

from ..training.world import YAWED_SHAPES, ObjectSpec, kind_from_index
from .metrics import score_mesh


@torch.no_grad()
def autoencoder_ceiling(kinds: list[int], *, model: str = "mini", seeds: int = 2, grid: int = 64,
                        seed: int = 4321, tally=None):
    """Encode and decode ``seeds`` instances of every kind; returns the filled ``Tally`` (engine.eval.run)."""
    from .. import registry
    from ..geometry.extract import extract_mesh
    from ..training.object_bank import build_bank
    from .run import Tally

    tally = tally if tally is not None else Tally()
    transmitter = registry.load_transmitter(model, "cpu")
    enc = transmitter.encoder.cfg
    g = torch.Generator().manual_seed(seed)
    for k in kinds:
        s, a, c = kind_from_index(k)
        t0 = time.perf_counter()
        specs = []
        for _ in range(seeds):
            u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
            specs.append(ObjectSpec(s, a, c, yaw=u[0] * torch.pi / 2 if s in YAWED_SHAPES else 0.0,
                                    value_jitter=(2 * u[1] - 1) * 0.05))
        bank = build_bank(specs, g, n_points=enc.n_points, data_ctx=enc.data_ctx, n_surface=0,
                          n_views=enc.n_views, image_size=enc.image_size, max_depth=enc.max_depth)
        latents = transmitter.encode_batch(bank.encoder_batch(torch.arange(len(specs))), training=False)
        meshes = [extract_mesh(transmitter.decoder, z, grid_size=grid) for z in latents.float()]
        tally.seconds += time.perf_counter() - t0
        for mesh in meshes:
            sc = score_mesh(mesh, ObjectSpec(s, a, c))
            tally.shape.append(sc["shape_correct"])
            tally.iou.append(sc["iou"])
            tally.color.append(sc["color_correct"])
            tally.kinds.append(k)
            tally.meshes.append(mesh)
    return tally
