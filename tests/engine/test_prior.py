"""Latent diffusion prior: official state_dict layout at full size, fixture parity, init and precision paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.config import PriorConfig, official_bundle, prior_from_official
from engine.models.latent_transformer import LatentPrior, timestep_embedding
from engine.records import EngineError
from tests.refdata import load_config, load_manifest, load_npz, load_weights


@pytest.mark.parametrize("name", ["text300M", "image300M"])
def test_full_size_state_dict_matches_official_manifest(name):
    cfg = official_bundle(name).prior
    model = LatentPrior(cfg, device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    manifest = load_manifest(name)["state_dict"]
    assert list(ours) == list(manifest)  # same keys, same order
    assert ours == {k: v["shape"] for k, v in manifest.items()}
    assert sum(math.prod(s) for s in ours.values()) == load_manifest(name)["n_state_dict_elements"]
    assert not list(model.buffers())


def _fixture_model(name: str) -> tuple[LatentPrior, dict]:
    model = LatentPrior(prior_from_official(load_config(name))).eval()
    model.load_state_dict(load_weights(f"{name}.safetensors"), strict=True)
    return model, {k: torch.from_numpy(v) for k, v in load_npz(name).items()}


@pytest.mark.parametrize("name", ["text_denoiser", "image_denoiser"])
def test_parity_with_official_denoiser(name):
    model, d = _fixture_model(name)
    assert (d["embeddings"][2] == 0).all()  # row 2 exercises the unconditional branch
    with torch.inference_mode():
        out = model(d["x"], d["t"], d["embeddings"])
        x0 = model.predict_x0(d["x"], d["t"], d["embeddings"])
    torch.testing.assert_close(out, d["output"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0, d["output"][:, : d["x"].shape[1]], rtol=1e-5, atol=1e-5)


def test_training_path_equals_inference_path_and_backprops():
    model, d = _fixture_model("text_denoiser")
    with torch.inference_mode():
        ref = model.predict_x0(d["x"], d["t"], d["embeddings"])
    out = model.predict_x0(d["x"], d["t"], d["embeddings"])  # autograd path (no in-place residual adds)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.wrapped.backbone.resblocks[0].attn.c_qkv.weight.grad.abs().sum() > 0


def test_timestep_embedding_is_cos_first():
    t = torch.tensor([0, 5, 1023])
    emb = timestep_embedding(t, 8)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    args = t.numpy()[:, None] * freqs[None]
    np.testing.assert_allclose(emb.numpy(), np.concatenate([np.cos(args), np.sin(args)], 1), rtol=0, atol=2e-5)  # float32 args up to 1023 rad


def test_unconditional_text_token_is_clip_embed_bias():
    """A zero text condition never touches clip_embed.weight (√768·0 = 0): only its bias enters (§3.3)."""
    model, d = _fixture_model("text_denoiser")
    x, t, zero = d["x"][:1], d["t"][:1], torch.zeros(1, 768)
    with torch.inference_mode():
        before = model.predict_x0(x, t, zero)
        model.wrapped.clip_embed.weight.mul_(3.0)
        after = model.predict_x0(x, t, zero)
        changed = model.predict_x0(x, t, d["embeddings"][:1])
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not torch.allclose(changed, before)


def _tiny(cond: str) -> PriorConfig:
    clip_dim = 16 if cond == "text" else 24
    return PriorConfig(cond=cond, width=32, layers=2, heads=2, latent_ctx=8, d_latent=8 * 6, clip_dim=clip_dim,
                       clip_grid_tokens=5)


def test_init_for_training_from_scratch():
    cfg = PriorConfig(cond="text", width=256, layers=2, heads=4, latent_ctx=64, d_latent=64 * 16, clip_dim=32)
    a = LatentPrior(cfg)
    a.init_weights(torch.Generator().manual_seed(1))
    b = LatentPrior(cfg)
    b.init_weights(torch.Generator().manual_seed(1))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    w = a.wrapped
    assert (w.output_proj.weight == 0).all() and (w.output_proj.bias == 0).all()
    assert w.pos_emb.std().item() == pytest.approx(0.05, rel=0.05)
    std = 0.25 / math.sqrt(256)
    assert w.backbone.resblocks[1].mlp.c_fc.weight.std().item() == pytest.approx(std, rel=0.05)
    assert w.time_embed.c_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert (w.backbone.resblocks[0].attn.c_qkv.bias == 0).all()
    assert a.cond_drop_prob == 0.1
    x = torch.randn(2, cfg.d_latent)
    out = a(x, torch.tensor([3, 900]), torch.randn(2, 32))
    assert out.shape == (2, 2 * cfg.d_latent) and (out == 0).all()  # zero output_proj


@pytest.mark.parametrize("cond", ["text", "image"])
def test_autocast_runs_and_stays_close(cond):
    """Mixed-precision path (fp16 on CUDA; bf16 autocast is what the CPU offers) matches fp32 loosely."""
    cfg = _tiny(cond)
    model = LatentPrior(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    torch.nn.init.normal_(model.wrapped.output_proj.weight, std=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.d_latent, generator=g)
    shape = (2, cfg.clip_dim) if cond == "text" else (2, cfg.clip_dim, cfg.clip_grid_tokens)
    c = torch.randn(*shape, generator=g)
    t = torch.tensor([10, 700])
    device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.bfloat16)
    model, x, c, t = model.to(device), x.to(device), c.to(device), t.to(device)
    with torch.inference_mode():
        ref = model.predict_x0(x, t, c)
        with torch.autocast(device, dtype=dtype):
            low = model.predict_x0(x, t, c)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_shapes_raise_engine_error():
    model = LatentPrior(_tiny("image")).eval()
    with pytest.raises(EngineError):
        model(torch.zeros(2, 47), torch.zeros(2, dtype=torch.long), torch.zeros(2, 24, 5))
    with pytest.raises(EngineError):  # a text embedding given to the image prior
        model(torch.zeros(2, 48), torch.zeros(2, dtype=torch.long), torch.zeros(2, 24))
