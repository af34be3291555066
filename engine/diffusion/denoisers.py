"""Karras denoisers around the x0-predicting prior (SHAP-E.md §3.3, §4.3; official GaussianToKarrasDenoiser).

Every denoiser here has one signature: ``(x (B, D), sigma (scalar or (B,)), cond) -> x0 (B, D)`` in x's dtype.

* ``KarrasDenoiser``: integer timestep from σ by the official interpolation + truncation, network input x·c_in(σ)
  with the continuous σ, x0 half of the output, optionally clamped to [-1, 1].
* ``ClassifierFreeGuidance``: ``[cond; zeros]`` in one network call, each branch clamped *before* mixing,
  x0 = x0_u + s (x0_c - x0_u). s == 1 is a single conditional call, s == 0 a single unconditional call (both equal
  the formula). Note: the official ``sample_latents`` treats s == 0 as "no guidance" and runs the *conditional* model;
  here s == 0 means what the formula says (purely unconditional).

Precision: under fp16 autocast the prior returns fp16; x0 is cast back to x's dtype (fp32) before guidance, so the
guided mix and the sampler's ODE updates run in fp32 (the official code mixes in fp16).
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedules import c_in, sigma_to_t

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _per_item(sigma: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Scalar or (B,) -> (B,) float32 on ``device``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    return sigma.expand(batch) if sigma.ndim == 0 else sigma


class KarrasDenoiser:
    """D(x, σ) of an x0-predicting prior with an ᾱ table (official GaussianToKarrasDenoiser + p_mean_variance)."""

    def __init__(self, prior, alphas_cumprod: torch.Tensor, clip_denoised: bool = True):
        self.prior = prior
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.clip_denoised = clip_denoised

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor) -> torch.Tensor:
        sigma = _per_item(sigma, x.shape[0], x.device)  # (B,)
        t = sigma_to_t(sigma, self.alphas_cumprod).to(x.device)  # (B,) long
        x0 = self.prior.predict_x0(x * c_in(sigma)[:, None], t, cond).to(x.dtype)
        return x0.clamp(-1.0, 1.0) if self.clip_denoised else x0


class ClassifierFreeGuidance:
    """Guided x0 = x0_u + scale (x0_c - x0_u), both branches from one batched call of ``denoiser``."""

    def __init__(self, denoiser: Denoiser, scale: float):
        self.denoiser = denoiser
        self.scale = float(scale)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, cond)
        if self.scale == 0.0:
            return self.denoiser(x, sigma, torch.zeros_like(cond))
        sigma = _per_item(sigma, x.shape[0], x.device)
        x0 = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, torch.zeros_like(cond)]))
        x0_c, x0_u = x0.chunk(2)
        return x0_u + self.scale * (x0_c - x0_u)


class PartsGuidance:
    """Composed guidance over the parts of a prompt (Liu et al. 2022, composable diffusion):

        x0 = x0_u + s ((1 - w) (x0_c - x0_u) + w Σ_i (x0_i - x0_u))

    with x0_c the whole prompt's answer, x0_i each part's (``parts``: (P, D) conditions shared by the batch, e.g.
    "a tall cube" and "a pink object" for "a tall pink cube") and x0_u the unconditional one. w = 0 is
    classifier-free guidance; w = 1 adds up the parts alone. For a prior that learnt each part's mean latent
    (``train_prior --partial-frac``) and a latent space where parts add up, the sum is the pair's latent even for a
    pair the prior never saw. All branches go through one batched call of ``denoiser``."""

    def __init__(self, denoiser: Denoiser, scale: float, parts: torch.Tensor, weight: float):
        self.denoiser = denoiser
        self.scale, self.weight = float(scale), float(weight)
        self.parts = parts

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor) -> torch.Tensor:
        b, p = x.shape[0], self.parts.shape[0]
        sigma = _per_item(sigma, b, x.device)
        parts = self.parts.to(cond.device, cond.dtype)[:, None].expand(p, b, *cond.shape[1:]).flatten(0, 1)
        x0 = self.denoiser(x.repeat(p + 2, *([1] * (x.dim() - 1))), sigma.repeat(p + 2),
                           torch.cat([cond, parts, torch.zeros_like(cond)]))
        x0_c, x0_u = x0[:b], x0[-b:]
        x0_parts = x0[b:-b].view(p, b, *x0.shape[1:])
        return x0_u + self.scale * ((1 - self.weight) * (x0_c - x0_u) + self.weight * (x0_parts - x0_u).sum(0))


__all__ = ["Denoiser", "KarrasDenoiser", "ClassifierFreeGuidance", "PartsGuidance"]
