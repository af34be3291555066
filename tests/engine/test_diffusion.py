"""Diffusion math: schedule parity, the official Heun trajectory, analytic sampler checks, guidance, cancellation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.config import prior_from_official
from engine.diffusion.denoisers import ClassifierFreeGuidance, KarrasDenoiser, PartsGuidance
from engine.diffusion.samplers import get_sampler, network_calls, sample_heun
from engine.diffusion.schedules import (
    c_in, exp_alphas_cumprod, exp_betas, exp_sigmas, inv_parabola_alphas_cumprod, karras_sigmas, q_sample,
    sigma_to_t, training_sigmas,
)
from engine.models.latent_transformer import LatentPrior
from engine.records import EngineError, GenerationCancelled, StepEvent
from tests.refdata import load_config, load_npz, load_weights

SCHED = load_npz("schedule")


def test_exp_schedule_matches_official():
    for name, ours in [("betas", exp_betas()), ("alphas_cumprod", exp_alphas_cumprod()), ("sigmas", exp_sigmas())]:
        assert ours.dtype == torch.float64
        np.testing.assert_allclose(ours.numpy(), SCHED[name], rtol=1e-12, atol=0)
    assert exp_sigmas()[0].item() == pytest.approx(0.10857, abs=1e-5)
    assert exp_sigmas()[-1].item() == pytest.approx(403.43, abs=1e-2)


@pytest.mark.parametrize("n", [64, 16, 8])
def test_karras_sigmas_and_sigma_to_t_exact(n):
    sig = karras_sigmas(n, 1e-3, 160.0, 7.0)
    assert sig.dtype == torch.float32 and len(sig) == n + 1 and sig[-1] == 0
    np.testing.assert_array_equal(sig.numpy(), SCHED[f"karras_sigmas_{n}"])
    t = sigma_to_t(torch.from_numpy(SCHED[f"heun_call_sigmas_{n}"]), exp_alphas_cumprod())
    np.testing.assert_array_equal(t.numpy(), SCHED[f"heun_call_t_{n}"])


def test_sigma_to_t_clamps_and_truncates():
    ac = exp_alphas_cumprod()
    sig = exp_sigmas()
    t = sigma_to_t(torch.tensor([1e-4, 0.05, 1e4, 2000.0]), ac)
    assert t.tolist() == [0, 0, 1023, 1023]
    mid = float(0.5 * (sig[416] + sig[417]))  # strictly between two table entries -> the lower index
    assert sigma_to_t(mid, ac).tolist() == [416]


class _RecordingPrior:
    """Stands in for the network: records (t, scaled input), returns a fixed function of its input."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, int]] = []

    def predict_x0(self, x, t, cond):
        self.calls.append((t.clone(), x.shape[0]))
        return torch.tanh(x) * 0.5 + cond[:, :1]


@pytest.mark.parametrize("n", [64, 16, 8])
def test_heun_network_calls_see_official_timesteps(n):
    prior = _RecordingPrior()
    den = ClassifierFreeGuidance(KarrasDenoiser(prior, exp_alphas_cumprod()), 3.0)
    sigmas = karras_sigmas(n, 1e-3, 160.0)
    sample_heun(den, torch.randn(1, 32) * 160, sigmas, cond=torch.ones(1, 4))
    assert len(prior.calls) == 2 * n - 1 == network_calls("heun", n)
    for t, batch in prior.calls:
        assert batch == 2 and t[0] == t[1]  # one call on [cond; uncond]
    np.testing.assert_array_equal([int(t[0]) for t, _ in prior.calls], SCHED[f"heun_call_t_{n}"])


def test_karras_text_trajectory_matches_official():
    d = {k: torch.from_numpy(v) for k, v in load_npz("karras_text").items()}
    model = LatentPrior(prior_from_official(load_config("text_denoiser"))).eval()
    model.load_state_dict(load_weights("text_denoiser.safetensors"), strict=True)
    cfg = load_config("karras_text")
    sigmas = karras_sigmas(cfg["steps"], cfg["sigma_min"], cfg["sigma_max"], cfg["rho"])
    np.testing.assert_array_equal(sigmas[:-1].numpy(), d["sigma_per_step"][:-1].numpy())
    den = ClassifierFreeGuidance(KarrasDenoiser(model, exp_alphas_cumprod(), clip_denoised=True),
                                 float(d["guidance_scale"]))
    seen_x, seen_den, seen_t = [], [], []
    orig = model.predict_x0

    def spy(x, t, cond):
        seen_t.append(t.clone())
        return orig(x, t, cond)

    model.predict_x0 = spy

    def recording(x, sigma, cond):
        out = den(x, sigma, cond)
        if len(seen_t) % 2 == 1:  # the first call of each step (Heun's second call comes at an even count)
            seen_x.append(x.clone())
            seen_den.append(out.clone())
        return out

    with torch.inference_mode():
        sample = sample_heun(recording, d["x_T"].clone(), sigmas, cond=d["cond"])
    np.testing.assert_array_equal(torch.stack(seen_t).numpy(), d["t_seen"].numpy())
    scale = float(d["x_T"].abs().max())  # ~160 * 4: errors are relative to the value scale
    torch.testing.assert_close(seen_den[0], d["denoised_per_step"][0], rtol=1e-5, atol=1e-5)
    for i in range(cfg["steps"]):
        torch.testing.assert_close(seen_x[i], d["x_per_step"][i], rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(seen_den[i], d["denoised_per_step"][i], rtol=1e-4, atol=1e-4)
    rel = (sample - d["sample"]).abs().max() / d["sample"].abs().max()
    assert rel < 1e-4


# --- analytic checks: Gaussian data N(mu, s^2) has the exact denoiser and a closed-form ODE solution -----------

MU, S = 0.3, 0.5


def _gaussian_denoiser(x, sigma, cond):
    sig = sigma.double()[:, None]
    return MU + S**2 / (S**2 + sig**2) * (x - MU)


def _gaussian_error(name: str, n: int) -> float:
    sig = karras_sigmas(n, 1e-3, 160.0)
    x_t = torch.randn(3, 50, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 160
    exact = MU + (x_t - MU) * S / math.sqrt(S**2 + float(sig[0]) ** 2)  # (x - mu)/sqrt(s^2+σ^2) is invariant
    out = get_sampler(name)(_gaussian_denoiser, x_t, sig, cond=None)
    return float((out - exact).abs().max() / (exact - MU).abs().max())


@pytest.mark.parametrize("name,order", [("heun", 2), ("dpmpp_2m", 2), ("euler", 1)])
def test_samplers_converge_to_closed_form_at_their_order(name, order):
    errs = [_gaussian_error(name, n) for n in (16, 32, 64)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    lo, hi = (3.3, 6.0) if order == 2 else (1.7, 2.5)
    assert all(lo < r < hi for r in ratios), (errs, ratios)
    assert errs[2] < (0.01 if order == 2 else 0.1)


@pytest.mark.parametrize("name", ["heun", "euler", "dpmpp_2m"])
def test_point_mass_data_is_solved_exactly(name):
    """D(x, σ) = c: the ODE solution x(σ) = c + (x_T - c) σ/σ_max is linear in σ, exact for all three."""
    c = torch.full((2, 10), 0.25, dtype=torch.float64)
    x_t = torch.randn(2, 10, dtype=torch.float64) * 80
    out = get_sampler(name)(lambda x, s, cond: c, x_t, karras_sigmas(7, 1e-3, 80.0), cond=None)
    torch.testing.assert_close(out, c, rtol=0, atol=1e-9)


# --- guidance --------------------------------------------------------------------------------------------------


class _CountingPrior:
    def __init__(self):
        self.batches: list[int] = []

    def predict_x0(self, x, t, cond):
        self.batches.append(x.shape[0])
        return 3.0 * torch.sin(x + cond.sum(1, keepdim=True)) + 0.01 * t[:, None]  # exceeds [-1, 1] often


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0, 15.0])
def test_guidance_equals_formula_with_clamped_branches(scale):
    prior = _CountingPrior()
    den = KarrasDenoiser(prior, exp_alphas_cumprod(), clip_denoised=True)
    x, cond = torch.randn(3, 20), torch.randn(3, 5)
    sigma = torch.tensor(2.5)
    cond_x0 = den(x, sigma, cond)
    uncond_x0 = den(x, sigma, torch.zeros_like(cond))
    assert cond_x0.abs().max() <= 1 and uncond_x0.abs().max() <= 1
    prior.batches.clear()
    guided = ClassifierFreeGuidance(den, scale)(x, sigma, cond)
    torch.testing.assert_close(guided, uncond_x0 + scale * (cond_x0 - uncond_x0), rtol=1e-6, atol=1e-6)
    assert prior.batches == ([3] if scale in (0.0, 1.0) else [6])  # always one network call
    if scale == 1.0:
        assert torch.equal(guided, cond_x0)


@pytest.mark.parametrize("scale,weight", [(1.0, 0.0), (1.0, 1.0), (1.0, 0.5), (2.0, 0.75)])
def test_parts_guidance_equals_formula_in_one_call(scale, weight):
    """x0 = x0_u + s ((1 - w)(x0_c - x0_u) + w Σ (x0_i - x0_u)), each branch clamped, per batch item, one call;
    w = 0 is classifier-free guidance."""
    prior = _CountingPrior()
    den = KarrasDenoiser(prior, exp_alphas_cumprod(), clip_denoised=True)
    x, cond, parts = torch.randn(3, 20), torch.randn(3, 5), torch.randn(2, 5)
    sigma = torch.tensor([2.5, 0.7, 9.0])
    branch = {name: den(x, sigma, c) for name, c in
              (("c", cond), ("u", torch.zeros_like(cond)), ("p0", parts[0].expand(3, 5)), ("p1", parts[1].expand(3, 5)))}
    prior.batches.clear()
    got = PartsGuidance(den, scale, parts, weight)(x, sigma, cond)
    u = branch["u"]
    want = u + scale * ((1 - weight) * (branch["c"] - u) + weight * (branch["p0"] - u + branch["p1"] - u))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert prior.batches == [12]
    if weight == 0.0:
        torch.testing.assert_close(got, ClassifierFreeGuidance(den, scale)(x, sigma, cond), rtol=1e-6, atol=1e-6)


def test_denoiser_input_scaling_and_clamp_switch():
    prior = _CountingPrior()
    seen = {}

    def predict(x, t, cond):
        seen["x"], seen["t"] = x, t
        return 5 * x

    prior.predict_x0 = predict
    x = torch.randn(2, 8)
    out = KarrasDenoiser(prior, exp_alphas_cumprod(), clip_denoised=False)(x, torch.tensor([4.0, 4.0]), None)
    torch.testing.assert_close(seen["x"], x / math.sqrt(17.0))
    assert seen["t"].dtype == torch.long and seen["t"].tolist() == sigma_to_t(torch.tensor([4.0, 4.0]),
                                                                             exp_alphas_cumprod()).tolist()
    torch.testing.assert_close(out, 5 * x / math.sqrt(17.0))


# --- control: cancellation and progress ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["heun", "euler", "dpmpp_2m"])
def test_on_step_counts_steps_and_cancel_stops_between_calls(name):
    calls, events = [], []

    def den(x, sigma, cond):
        calls.append(float(sigma[0]))
        return x * 0.5

    sig = karras_sigmas(6, 1e-3, 160.0)
    get_sampler(name)(den, torch.randn(1, 4), sig, cond=None, on_step=events.append)
    assert [e.step for e in events] == list(range(1, 7)) and all(e.total == 6 for e in events)
    assert all(isinstance(e, StepEvent) for e in events)
    np.testing.assert_allclose([e.sigma for e in events], sig[:-1].numpy(), rtol=1e-7)
    assert all(b.elapsed_s >= a.elapsed_s >= 0 for a, b in zip(events, events[1:]))
    assert len(calls) == network_calls(name, 6)

    for limit in (0, 3):
        calls.clear()
        with pytest.raises(GenerationCancelled):
            get_sampler(name)(den, torch.randn(1, 4), sig, cond=None, should_cancel=lambda: len(calls) >= limit)
        assert len(calls) == limit  # checked before every network call, nothing after


def test_unknown_sampler_and_bad_sigmas():
    with pytest.raises(EngineError):
        get_sampler("ddim")
    with pytest.raises(EngineError):
        sample_heun(lambda x, s, c: x, torch.zeros(1, 2), torch.tensor([2.0, 1.0]), cond=None)
    with pytest.raises(EngineError):
        karras_sigmas(0, 1e-3, 160.0)


# --- schedules used by training --------------------------------------------------------------------------------


def test_inv_parabola_schedule_telescopes():
    ac = inv_parabola_alphas_cumprod(1024, 5.0).numpy()
    i = np.arange(1023)
    np.testing.assert_allclose(ac[:-1], 1 - ((i + 1) / 1024) ** 5, rtol=1e-10)
    assert ac[-1] == pytest.approx(ac[-2] * 0.001, rel=1e-12)  # last beta clipped at 0.999
    from engine.models.encoder import inv_parabola_schedule  # the encoder's bottleneck uses the same table

    np.testing.assert_allclose(inv_parabola_schedule(5.0)[0].numpy() ** 2, ac, rtol=1e-12)


def test_training_sample_is_ddpm_q_sample_at_integer_t():
    g = torch.Generator().manual_seed(3)
    t, sigma = training_sigmas(4096, g)
    assert t.dtype == torch.long and 0 <= t.min() and t.max() <= 1023 and len(set(t.tolist())) > 900
    t2, _ = training_sigmas(4096, torch.Generator().manual_seed(3))
    assert torch.equal(t, t2)
    ac = exp_alphas_cumprod()
    x0, eps = torch.rand(4096, 6) * 2 - 1, torch.randn(4096, 6)
    net_in = c_in(sigma)[:, None] * q_sample(x0, sigma, eps)
    a = ac[t].float()[:, None]
    torch.testing.assert_close(net_in, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-5, atol=1e-5)
    # sigma_to_t of the float32 sigma gives t or (by truncation) t - 1, never anything else.
    assert ((t - sigma_to_t(sigma, ac)) <= 1).all() and ((t - sigma_to_t(sigma, ac)) >= 0).all()
