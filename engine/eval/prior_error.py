"""How far the text prior's x0 prediction is from the truth, per noise level (``python -m engine eval --prior-error``).

For each kind, ``instances`` random instances (yaw, shade) are encoded by the model's transmitter; the prior then
sees each latent noised at a few training timesteps, with its prompt's CLIP vector, and predicts x0 (conditional
branch, clamped like the sampler). Per timestep the table gives the mean squared error per latent value against
the instance itself and against the mean latent of its kind, next to the spread of the latents within a kind and
across kinds. A prior that has learnt the data reaches ~0 against the instance at small σ; one that only knows the
kind's mean sits at ``within`` there; the error against the kind mean at large σ is what the prior gets wrong
about the kind itself, the part that costs shape and colour accuracy.
"""

from __future__ import annotations

import torch

from ..records import GenerationRequest
from ..training.world import ObjectSpec, kind_from_index
from .ceiling import encode_instances

TIMESTEPS = (0, 50, 200, 400, 800, 1023)


@torch.no_grad()
def prior_error(kinds: list[int], *, model: str = "mini", instances: int = 4, seed: int = 99,
                timesteps=TIMESTEPS) -> dict:
    from .. import registry
    from ..diffusion.schedules import c_in, exp_alphas_cumprod, sigmas_from_alphas_cumprod
    from ..pipeline import condition
    from .run import prompt_for

    loaded = registry.load(model, "text", "cpu")
    transmitter = registry.load_transmitter(model, "cpu")
    prior = loaded.prior
    g = torch.Generator().manual_seed(seed)
    lat, mean, cond = [], [], []
    for k in kinds:
        z = encode_instances(transmitter, k, instances, g)
        lat.append(z)
        mean.append(z.mean(0, keepdim=True).expand_as(z))
        prompt = prompt_for(ObjectSpec(*kind_from_index(k)))
        c = condition(loaded, GenerationRequest(prompt=prompt, model=model))
        cond.append(c.float().expand(instances, -1))
    x0, mu, cond = torch.cat(lat), torch.cat(mean), torch.cat(cond)
    pdtype = next(prior.parameters()).dtype
    sig = sigmas_from_alphas_cumprod(exp_alphas_cumprod(loaded.bundle.diffusion.timesteps)).float()
    rows = []
    for t in timesteps:
        s = sig[t]
        x = x0 + s * torch.randn(x0.shape, generator=g)
        tt = torch.full((len(x0),), t, dtype=torch.long)
        pred = prior.predict_x0((x * c_in(s)).to(pdtype), tt, cond.to(pdtype)).float().clamp(-1, 1)
        rows.append({"t": t, "sigma": float(s), "mse_instance": float((pred - x0).square().mean()),
                     "mse_kind_mean": float((pred - mu).square().mean())})
    return {"n": len(x0), "within_kind": float((x0 - mu).square().mean()),
            "across_kinds": float((x0 - x0.mean(0)).square().mean()), "rows": rows}


def print_prior_error(name: str, res: dict) -> None:
    print(f"{name}: {res['n']} encoded instances; latent spread per value (variance): within a kind "
          f"{res['within_kind']:.4f}, across kinds {res['across_kinds']:.4f}")
    print(f"{'t':>5s} {'sigma':>8s} {'MSE vs instance':>16s} {'MSE vs kind mean':>17s}")
    for r in res["rows"]:
        print(f"{r['t']:5d} {r['sigma']:8.3f} {r['mse_instance']:16.4f} {r['mse_kind_mean']:17.4f}")
