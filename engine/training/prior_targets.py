"""What the priors actually produce for a bank's objects, paired with the object each latent should decode to.

A decoder fine-tuned on encoder latents only learns to decode the encoder's manifold; the priors' samples sit a
little off it (their x0 error is larger than the spread of one kind's latents). ``prior_bank`` samples the text or
the image prior for every object of a bank (text: a random training caption of its kind; image: a render of the
object itself from a random view) as generation does (the model's default guidance; its default sampler and
steps, or a faster choice: DPM++ 2M at 8 steps scores like Heun 16 on the mini priors), and returns the latents
with a copy of the bank whose yaw is the one each sample decodes to (a text prompt says nothing about yaw; an
image prior follows its input only roughly). ``finetune_decoder --prior-mix`` then trains the decoder to decode
those latents to their objects as well. Only train-split objects may be used.
"""

from __future__ import annotations

import math

import torch

from .captions import caption
from .world import YAWED_SHAPES, ObjectSpec, is_held_out, rotate_z, signed_distance_tensors

YAW_STEP_DEG = 5.0


@torch.no_grad()
def sample_for_specs(parts: dict, specs: list[ObjectSpec], mode: str, generator: torch.Generator, *,
                     batch: int = 32, seed: int = 0, sampler: str | None = None, steps: int | None = None,
                     guidance: float | None = None) -> torch.Tensor:
    """(N, d_latent) float32: one prior sample per spec (guidance, sampler and steps: the mode's defaults unless
    given)."""
    from .. import device as devices
    from ..pipeline import sample_latents
    from ..registry import mini_model
    from .render_world import condition_images, to_srgb8

    model = mini_model(parts, mode, "cpu")
    cfg = model.bundle.sampler
    placement = devices.resolve("cpu", "fp32")
    out = []
    for s in range(0, len(specs), batch):
        chunk = specs[s:s + batch]
        if mode == "text":
            cond = model.clip.embed_text([caption(sp, generator) for sp in chunk])
        else:
            imgs = condition_images(chunk, generator, size=128)
            cond = model.clip.embed_image_grid(to_srgb8(imgs))
        seeds = [seed + s + i for i in range(len(chunk))]
        out.append(sample_latents(model, cond.float(), seeds=seeds, steps=steps or cfg.steps,
                                  guidance=cfg.guidance_scale if guidance is None else guidance,
                                  sampler=sampler or cfg.sampler, placement=placement))
    return torch.cat(out)


@torch.no_grad()
def decoded_yaws(decoder, latents: torch.Tensor, specs: list[ObjectSpec], grid: int = 32) -> list[float]:
    """Per latent, the yaw (radians, 5° steps in [0°, 90°)) at which its object best matches the decoded
    occupancy (IoU on a grid); the spec's own yaw for shapes symmetric about Z."""
    from .object_bank import _param_table
    from .train_transmitter import grid_points

    pts = grid_points(grid, "cpu")
    yaws = torch.arange(0.0, 90.0, YAW_STEP_DEG) * math.pi / 180
    table = _param_table("cpu")
    truth = {}  # (shape, aspect) -> occupancy of the object at every candidate yaw (len(yaws), grid³)
    out = []
    for z, spec in zip(latents, specs):
        if spec.shape not in YAWED_SHAPES:
            out.append(spec.yaw)
            continue
        key = (spec.shape, spec.aspect)
        if key not in truth:
            shape = torch.full((len(yaws),), spec.shape, dtype=torch.long)
            prm = table[shape, spec.aspect]
            truth[key] = signed_distance_tensors(shape, prm, yaws, pts.expand(len(yaws), -1, -1)) < 0
        occ = decoder(z[None], pts, outputs=("sdf",))["sdf"][0] > 0
        iou = (truth[key] & occ).sum(1).float() / (truth[key] | occ).sum(1).float().clamp(min=1)
        out.append(float(yaws[int(iou.argmax())]))
    return out


def prior_bank(parts: dict, bank, modes: tuple[str, ...], generator: torch.Generator, *, seed: int = 0,
               training: bool = True, sampler: str | None = None, steps: int | None = None,
               guidance: dict[str, float] | None = None):
    """(latents (N·len(modes), d), bank of the same objects with decoded yaws): the prior-sample pairs.
    ``training`` refuses held-out objects (pass False only to score held-out samples); ``guidance`` maps a mode
    to the guidance its samples use instead of the model's default."""
    import dataclasses

    from .object_bank import ObjectBank

    specs = bank.specs()
    if training and any(is_held_out(sp.shape, sp.color) for sp in specs):
        raise ValueError("prior targets may only be built from train-split objects")
    lat, banks = [], []
    for mode in modes:
        z = sample_for_specs(parts, specs, mode, generator, seed=seed, sampler=sampler, steps=steps,
                             guidance=(guidance or {}).get(mode))
        yaw = torch.tensor(decoded_yaws(parts["decoder"], z, specs), dtype=bank.yaw.dtype, device=bank.device)
        lat.append(z)
        # turning the exact surface samples about Z by the change of yaw keeps them on the re-yawed surface
        banks.append(dataclasses.replace(bank, yaw=yaw, surface=rotate_z(bank.surface, yaw - bank.yaw)))
    return torch.cat(lat), ObjectBank.concat(banks)
