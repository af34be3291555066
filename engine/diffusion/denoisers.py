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


__all__ = ["Denoiser", "KarrasDenoiser", "ClassifierFreeGuidance"]
