"""What the priors actually produce for a bank's objects, paired with the object each latent should decode to.

A decoder fine-tuned on encoder latents only learns to decode the encoder's manifold; the priors' samples sit a
little off it (their x0 error is larger than the spread of one kind's latents). ``prior_bank`` samples the text or
the image prior for every object of a bank (text: a random training caption of its kind; image: a render of the
object itself from a random view), exactly as generation does (the model's default sampler, steps and guidance),
(or a faster sampler: DPM++ 2M at 8 steps scores like Heun 16 on the mini priors), and returns the latents with a copy of the bank whose yaw is the one the sample decodes to (a text prompt says
nothing about yaw; an image prior follows its input only roughly). ``finetune_decoder --prior-mix`` then trains
the decoder to decode those latents to their objects as well. Only train-split objects may be used.
"""

from __future__ import annotations

import math

import torch

from .world import YAWED_SHAPES, ObjectSpec, caption, is_held_out, signed_distance_tensors

YAW_STEP_DEG = 5.0


def _loaded(parts: dict, mode: str):
    from ..conditioning.clip import ClipConditioner
    from ..registry import LoadedModel

    bundle = parts["configs"][mode]
    clip = ClipConditioner(bundle.clip, parts["clip"], device="cpu")
    return LoadedModel("mini", mode, bundle, clip, parts[f"{mode}_prior"], parts["decoder"], 0)


@torch.no_grad()
def sample_for_specs(parts: dict, specs: list[ObjectSpec], mode: str, generator: torch.Generator, *,
                     batch: int = 32, seed: int = 0, sampler: str | None = None, steps: int | None = None
                     ) -> torch.Tensor:
    """(N, d_latent) float32: one prior sample per spec, at the mode's default guidance (sampler and steps: the
    mode's defaults unless given)."""
    from .. import device as devices
    from ..pipeline import sample_latents
    from .render_world import condition_images

    model = _loaded(parts, mode)
    cfg = model.bundle.sampler
    placement = devices.resolve("cpu", "fp32")
    out = []
    for s in range(0, len(specs), batch):
        chunk = specs[s:s + batch]
        if mode == "text":
            cond = model.clip.embed_text([caption(sp, generator) for sp in chunk])
        else:
            imgs = condition_images(chunk, generator, size=128)
            cond = model.clip.embed_image_grid((imgs.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy())
        seeds = [seed + s + i for i in range(len(chunk))]
        out.append(sample_latents(model, cond.float(), seeds=seeds, steps=steps or cfg.steps,
                                  guidance=cfg.guidance_scale, sampler=sampler or cfg.sampler, placement=placement))
    return torch.cat(out)


@torch.no_grad()
def decoded_yaws(decoder, latents: torch.Tensor, specs: list[ObjectSpec], grid: int = 32) -> list[float]:
    """Per latent, the yaw (radians, 5° steps in [0°, 90°)) at which its object best matches the decoded
    occupancy (IoU on a grid); the spec's own yaw for shapes symmetric about Z."""
    from .object_bank import _param_table

    lin = torch.linspace(-1, 1, grid)
    pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(1, -1, 3)
    yaws = torch.arange(0.0, 90.0, YAW_STEP_DEG) * math.pi / 180
    table = _param_table("cpu")
    out = []
    for z, spec in zip(latents, specs):
        if spec.shape not in YAWED_SHAPES:
            out.append(spec.yaw)
            continue
        occ = decoder(z[None], pts, outputs=("sdf",))["sdf"][0] > 0
        n = len(yaws)
        shape = torch.full((n,), spec.shape, dtype=torch.long)
        truth = signed_distance_tensors(shape, table[shape, spec.aspect], yaws, pts.expand(n, -1, -1)) < 0
        iou = (truth & occ).sum(1).float() / (truth | occ).sum(1).float().clamp(min=1)
        out.append(float(yaws[int(iou.argmax())]))
    return out


def prior_bank(parts: dict, bank, modes: tuple[str, ...], generator: torch.Generator, *, seed: int = 0,
               training: bool = True, sampler: str | None = None, steps: int | None = None):
    """(latents (N·len(modes), d), bank of the same objects with decoded yaws): the prior-sample pairs.
    ``training`` refuses held-out objects (pass False only to score held-out samples)."""
    import dataclasses

    from .object_bank import ObjectBank

    specs = bank.specs()
    if training and any(is_held_out(sp.shape, sp.color) for sp in specs):
        raise ValueError("prior targets may only be built from train-split objects")
    lat, banks = [], []
    for mode in modes:
        z = sample_for_specs(parts, specs, mode, generator, seed=seed, sampler=sampler, steps=steps)
        yaw = torch.tensor(decoded_yaws(parts["decoder"].float(), z, specs), dtype=bank.yaw.dtype)
        fields = {f.name: getattr(bank, f.name) for f in dataclasses.fields(ObjectBank)}
        if not torch.equal(yaw, bank.yaw.cpu()):
            fields["yaw"] = yaw.to(bank.device)
            fields["surface"] = _rotate_surface(bank, yaw.to(bank.device))
        lat.append(z)
        banks.append(ObjectBank(**fields))
    return torch.cat(lat), ObjectBank.concat(banks)


def _rotate_surface(bank, yaw: torch.Tensor) -> torch.Tensor:
    """The bank's exact surface samples turned from each object's yaw to ``yaw`` (a rotation about Z keeps them
    on the surface of the re-yawed object)."""
    from .world import rotate_z

    return rotate_z(bank.surface, yaw - bank.yaw)
