"""How far a prior's x0 prediction is from the truth, per noise level (``python -m engine eval --prior-error``).

For each kind, ``instances`` random instances (yaw, shade) are encoded by the model's transmitter; the prior then
sees each latent noised at a few training timesteps with its condition and predicts x0 (conditional branch,
clamped like the sampler). The text prior's condition is the CLIP vector of the kind's prompt; the image prior's
is the CLIP grid of a render of that very instance from a random view, 8-bit like the eval's image prompts. Per timestep the table gives the mean squared error per latent value against
the instance itself and against the mean latent of its kind, next to the spread of the latents within a kind and
across kinds. A prior that has learnt the data reaches ~0 against the instance at small σ; one that only knows the
kind's mean sits at ``within`` there; the error against the kind mean at large σ is what the prior gets wrong
about the kind itself, the part that costs shape and colour accuracy.
"""

from __future__ import annotations

import torch

from ..records import GenerationRequest
from ..training.world import ObjectSpec
from .ceiling import encode_specs

TIMESTEPS = (0, 50, 200, 400, 800, 1023)


@torch.no_grad()
def prior_error(kinds: list[int], *, model: str = "mini", instances: int = 4, seed: int = 99,
                timesteps=TIMESTEPS, modes: tuple[str, ...] = ("text",)) -> dict:
    """One result per mode in ``modes`` (the same encoded instances and noise for each): {"n", "within_kind",
    "across_kinds", "rows": [{"t", "sigma", "mse_instance", "mse_kind_mean"}]}; with one mode, that result alone."""
    from .. import registry
    from ..training.encode_dataset import random_instances

    transmitter = registry.load_transmitter(model, "cpu")
    g = torch.Generator().manual_seed(seed)
    specs, lat = [], []
    for k in kinds:  # draws from g in the same order as before image mode existed: the text figures stay put
        specs += random_instances(k, instances, g)
        lat.append(encode_specs(transmitter, specs[-instances:], g))
    x0 = torch.cat(lat)
    mu = x0.view(len(kinds), instances, -1).mean(1, keepdim=True).expand(-1, instances, -1).reshape(x0.shape)
    noise = [torch.randn(x0.shape, generator=g) for _ in timesteps]
    views = torch.Generator().manual_seed(seed + 1)
    out = {}
    for mode in modes:
        loaded = registry.load(model, mode, "cpu")
        cond = torch.cat([_condition(loaded, spec, mode, views) for spec in specs]).float()
        rows = _x0_errors(loaded, x0, mu, cond, noise, timesteps)
        out[mode] = {"n": len(x0), "within_kind": float((x0 - mu).square().mean()),
                     "across_kinds": float((x0 - x0.mean(0)).square().mean()), "rows": rows}
    return out[modes[0]] if len(modes) == 1 else out


def _condition(loaded, spec, mode: str, views: torch.Generator) -> torch.Tensor:
    from ..pipeline import condition
    from ..training.render_world import condition_images, to_srgb8
    from .run import prompt_for

    if mode == "text":
        return condition(loaded, GenerationRequest(prompt=prompt_for(ObjectSpec(spec.shape, spec.aspect,
                                                                                spec.color)), model=loaded.name))
    image = to_srgb8(condition_images([spec], views, size=128)[0])
    return condition(loaded, GenerationRequest(image=image, model=loaded.name))


def _x0_errors(loaded, x0, mu, cond, noise, timesteps) -> list[dict]:
    from ..diffusion.schedules import c_in, exp_alphas_cumprod, sigmas_from_alphas_cumprod

    prior = loaded.prior
    pdtype = next(prior.parameters()).dtype
    sig = sigmas_from_alphas_cumprod(exp_alphas_cumprod(loaded.bundle.diffusion.timesteps)).float()
    rows = []
    for t, eps in zip(timesteps, noise):
        s = sig[t]
        tt = torch.full((len(x0),), t, dtype=torch.long)
        pred = prior.predict_x0(((x0 + s * eps) * c_in(s)).to(pdtype), tt, cond.to(pdtype)).float().clamp(-1, 1)
        rows.append({"t": t, "sigma": float(s), "mse_instance": float((pred - x0).square().mean()),
                     "mse_kind_mean": float((pred - mu).square().mean())})
    return rows


def print_prior_error(name: str, res: dict) -> None:
    print(f"{name}: {res['n']} encoded instances; latent spread per value (variance): within a kind "
          f"{res['within_kind']:.4f}, across kinds {res['across_kinds']:.4f}")
    print(f"{'t':>5s} {'sigma':>8s} {'MSE vs instance':>16s} {'MSE vs kind mean':>17s}")
    for r in res["rows"]:
        print(f"{r['t']:5d} {r['sigma']:8.3f} {r['mse_instance']:16.4f} {r['mse_kind_mean']:17.4f}")
