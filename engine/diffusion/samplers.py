"""Deterministic Karras-ODE samplers over a σ list (SHAP-E.md §4.3; Karras et al. 2022; Lu et al. 2022).

All samplers integrate dx/dσ = (x - D(x, σ)) / σ from σ_0 to σ_n = 0 and share one signature:
``sampler(denoiser, x, sigmas, *, cond, on_step=None, should_cancel=None) -> x``.

* ``sample_heun``: the official ``sample_heun`` with s_churn = 0 (Karras Algorithm 2 without churn): a Heun step
  per σ pair, an Euler step into σ = 0. 2n - 1 network calls. The official code also draws (and discards) one
  ``randn_like`` per step; nothing here consumes random numbers.
* ``sample_euler``: first-order Euler, n calls.
* ``sample_dpmpp_2m``: DPM-Solver++(2M) in data (x0) prediction with λ = -log σ, n calls; the last step into
  σ = 0 returns the denoised estimate (its exact limit).

``should_cancel()`` is checked before every network call (raises GenerationCancelled); ``on_step`` receives a
StepEvent after each step (step counts from 1; sigma = σ at the start of the step).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ..records import EngineError, GenerationCancelled, StepEvent
from .denoisers import Denoiser

StepHook = Callable[[StepEvent], None] | None
CancelHook = Callable[[], bool] | None


class _Runner:
    """Cancellation check before every call, a (B,) σ tensor per call, and the step events."""

    def __init__(self, denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond, on_step: StepHook,
                 should_cancel: CancelHook):
        if sigmas.ndim != 1 or len(sigmas) < 2 or float(sigmas[-1]) != 0.0:
            raise EngineError("the sampler needs a 1-D σ list ending in 0", "build it with karras_sigmas()")
        self.denoiser, self.cond = denoiser, cond
        self.on_step, self.should_cancel = on_step, should_cancel
        self.ones = x.new_ones(x.shape[0], dtype=torch.float32)
        self.total = len(sigmas) - 1
        self.values = [float(s) for s in sigmas.cpu()]  # step control in Python floats
        self.start = time.perf_counter()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.should_cancel is not None and self.should_cancel():
            raise GenerationCancelled("generation cancelled")
        return self.denoiser(x, sigma * self.ones, self.cond)

    def step_done(self, i: int) -> None:
        if self.on_step is not None:
            self.on_step(StepEvent(step=i + 1, total=self.total, sigma=self.values[i],
                                   elapsed_s=time.perf_counter() - self.start))


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma


def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond,
                on_step: StepHook = None, should_cancel: CancelHook = None) -> torch.Tensor:
    """Official Heun (s_churn 0): x_{i+1} = x + ½(d + d₂)Δσ; Euler when σ_{i+1} = 0."""
    run = _Runner(denoiser, x, sigmas, cond, on_step, should_cancel)
    for i in range(run.total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = _to_d(x, sigma, run(x, sigma))
        dt = sigma_next - sigma
        if run.values[i + 1] == 0.0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigma_next, run(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
        run.step_done(i)
    return x


def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond,
                 on_step: StepHook = None, should_cancel: CancelHook = None) -> torch.Tensor:
    """First-order Euler on the probability-flow ODE."""
    run = _Runner(denoiser, x, sigmas, cond, on_step, should_cancel)
    for i in range(run.total):
        sigma = sigmas[i]
        x = x + _to_d(x, sigma, run(x, sigma)) * (sigmas[i + 1] - sigma)
        run.step_done(i)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond,
                    on_step: StepHook = None, should_cancel: CancelHook = None) -> torch.Tensor:
    """DPM-Solver++(2M): x_{i+1} = (σ_{i+1}/σ_i) x - (e^{-h} - 1) D̂, D̂ a 2-step extrapolation of x0 in λ."""
    run = _Runner(denoiser, x, sigmas, cond, on_step, should_cancel)
    s = run.values
    old_denoised = None
    for i in range(run.total):
        denoised = run(x, sigmas[i])
        if s[i + 1] == 0.0:
            x = denoised  # limit of the update as σ_{i+1} -> 0
        else:
            h = math.log(s[i]) - math.log(s[i + 1])  # λ_{i+1} - λ_i, λ = -log σ
            if old_denoised is None:
                d_hat = denoised
            else:
                r = (math.log(s[i - 1]) - math.log(s[i])) / h
                d_hat = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d_hat
        old_denoised = denoised
        run.step_done(i)
    return x


_SAMPLERS = {"heun": sample_heun, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


def network_calls(name: str, steps: int) -> int:
    """Number of denoiser calls a sampler makes for ``steps`` σ intervals."""
    get_sampler(name)
    return 2 * steps - 1 if name == "heun" else steps


def get_sampler(name: str):
    try:
        return _SAMPLERS[name]
    except KeyError:
        raise EngineError(f"unknown sampler {name!r}", f"choose one of: {', '.join(_SAMPLERS)}") from None


__all__ = ["sample_heun", "sample_euler", "sample_dpmpp_2m", "get_sampler", "network_calls"]
