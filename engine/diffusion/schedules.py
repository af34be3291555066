"""Noise schedules of Shap-E and the sigma <-> timestep mapping of its Karras sampler (SHAP-E.md §4.1, §4.3).

* ``exp`` schedule: ᾱ(t) = exp(-12 t) discretised by the official ``betas_for_alpha_bar`` (float64).
* ``inv_parabola``: ᾱ(t) = 1 - t^power, the encoder's training-time noisy bottleneck (§2.4).
* Karras sigmas (rho = 7, float32, trailing 0) and the official ``GaussianToKarrasDenoiser.sigma_to_t``.

Training parametrisation (what an x0-predicting prior compatible with the sampler is trained on): draw an integer
t uniformly in [0, T), take σ = σ_t = sqrt(1/ᾱ_t - 1), x_σ = x0 + σ ε (``q_sample``) and feed the network
``(c_in(σ) x_σ, t)``. Since c_in(σ_t) = sqrt(ᾱ_t) this is exactly the DDPM x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε at the
same integer t the sampler's ``sigma_to_t`` produces for σ_t; the loss is MSE between ``predict_x0`` and x0. Use the
drawn t directly: re-deriving it with ``sigma_to_t`` from the float32 σ may truncate to t - 1.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..records import EngineError


def betas_for_alpha_bar(steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta), float64 (official discretisation)."""
    return np.array([min(1.0 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
                    dtype=np.float64)


def exp_betas(steps: int = 1024, coefficient: float = -12.0) -> torch.Tensor:
    """(T,) float64: constant 1 - exp(-12/T) for the official schedule."""
    return torch.from_numpy(betas_for_alpha_bar(steps, lambda t: math.exp(t * coefficient)))


def alphas_cumprod_from_betas(betas: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))


def exp_alphas_cumprod(steps: int = 1024, coefficient: float = -12.0) -> torch.Tensor:
    """(T,) float64 ᾱ_i = Π_{j<=i} (1 - β_j) ≈ exp(-12 (i+1)/T)."""
    return alphas_cumprod_from_betas(exp_betas(steps, coefficient))


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_i = sqrt(1/ᾱ_i - 1) (float64)."""
    return torch.sqrt(1.0 / alphas_cumprod.double() - 1.0)


def exp_sigmas(steps: int = 1024) -> torch.Tensor:
    return sigmas_from_alphas_cumprod(exp_alphas_cumprod(steps))


def inv_parabola_alphas_cumprod(steps: int = 1024, power: float = 5.0) -> torch.Tensor:
    """(T,) float64 ᾱ for ᾱ(t) = 1 - t^power (the encoder bottleneck's noise schedule)."""
    return alphas_cumprod_from_betas(betas_for_alpha_bar(steps, lambda t: 1.0 - t ** power))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """(n+1,) float32: (σmax^(1/ρ) + i/(n-1) (σmin^(1/ρ) - σmax^(1/ρ)))^ρ for i < n, then 0 (§4.3 step 1).

    Computed with the same float32 torch ops as the official ``get_sigmas_karras`` so the values (and hence the
    integer timesteps the network sees) are bit-identical."""
    if n < 1:
        raise EngineError(f"the sampler needs at least 1 step (got {n})", "use steps >= 1")
    if not 0 < sigma_min < sigma_max:
        raise EngineError(f"need 0 < sigma_min < sigma_max (got {sigma_min}, {sigma_max})", "fix the sampler config")
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigma_to_t(sigma: torch.Tensor | float, alphas_cumprod: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Official σ -> integer timestep: ᾱ* = 1/(σ²+1) (float64 from the float32 σ), linear interpolation of the index
    over the ᾱ table (scipy ``interp1d`` formula), truncated toward zero; 0 above ᾱ_0, T-1 at or below ᾱ_{T-1}.
    ``sigma``: scalar or (B,) -> (B,) long on the CPU (callers move it)."""
    ac = np.asarray(alphas_cumprod.cpu() if isinstance(alphas_cumprod, torch.Tensor) else alphas_cumprod,
                    dtype=np.float64)
    s = sigma.detach().float().cpu().numpy() if isinstance(sigma, torch.Tensor) else np.float32(sigma)
    a = 1.0 / (np.atleast_1d(s).astype(np.float64) ** 2 + 1.0)  # (B,)
    # ᾱ is decreasing; interp1d sorts it ascending. Interval [lo, hi] with asc[lo] < a <= asc[hi].
    asc, idx = ac[::-1], np.arange(len(ac) - 1, -1, -1, dtype=np.float64)
    hi = np.clip(np.searchsorted(asc, a, side="left"), 1, len(asc) - 1)
    lo = hi - 1
    slope = (idx[hi] - idx[lo]) / (asc[hi] - asc[lo])
    frac = slope * (a - asc[lo]) + idx[lo]
    t = np.where(a > ac[0], 0.0, np.where(a <= ac[-1], float(len(ac) - 1), frac))
    return torch.from_numpy(np.trunc(t).astype(np.int64))


def c_in(sigma: torch.Tensor) -> torch.Tensor:
    """Network input scale 1/sqrt(σ²+1) using the continuous σ (same op order as the official code)."""
    return 1.0 / (sigma ** 2 + 1) ** 0.5


def q_sample(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_σ = x0 + σ ε (Karras/EDM form). sigma: scalar or (B,). Network input is ``c_in(σ) * x_σ``."""
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    return x0 + sigma.reshape(-1, *([1] * (x0.ndim - 1))) * noise


def training_sigmas(batch: int, generator: torch.Generator | None = None,
                    alphas_cumprod: torch.Tensor | None = None,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ U{0..T-1} (long, (B,)) and σ_t (float32, (B,)) of the exp schedule (or the given ᾱ table)."""
    ac = exp_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    t = torch.randint(0, len(ac), (batch,), generator=generator)
    sigma = sigmas_from_alphas_cumprod(ac.cpu())[t].float()
    return t.to(device), sigma.to(device)


__all__ = [
    "betas_for_alpha_bar", "exp_betas", "exp_alphas_cumprod", "exp_sigmas", "sigmas_from_alphas_cumprod",
    "alphas_cumprod_from_betas", "inv_parabola_alphas_cumprod", "karras_sigmas", "sigma_to_t", "c_in", "q_sample",
    "training_sigmas",
]
