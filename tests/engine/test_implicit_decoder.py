"""Implicit decoder: fixture parity (fixtures README §5), official key layouts (manifests), init, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.config import DecoderConfig, NeRSTFConfig, ParamsProjConfig, transmitter_from_official
from engine.models.encoder_blocks import posenc_nerf
from engine.models.implicit_decoder import (OUTPUT_SLOTS, ImplicitDecoder, decoder_to_transmitter_keys,
                                            query_field, srgb_to_linear, transmitter_to_decoder_keys)
from engine.records import EngineError
from tests.refdata import load_config, load_manifest, load_npz, load_weights

NPZ = load_npz("decoder")


def _fixture_decoder() -> ImplicitDecoder:
    _, cfg = transmitter_from_official(load_config("decoder")["transmitter_config"])
    dec = ImplicitDecoder(cfg)
    sd, encoder_rest = transmitter_to_decoder_keys(load_weights("decoder_transmitter_layout.safetensors"))
    assert encoder_rest == {}
    dec.load_state_dict(sd, strict=True)
    return dec.eval()


@pytest.fixture(scope="module")
def decoder() -> ImplicitDecoder:
    return _fixture_decoder()


def test_projection_matches_official(decoder):
    with torch.no_grad():
        params = decoder.project(torch.from_numpy(NPZ["latent"]))
    for k, p in enumerate(params):
        ref = NPZ[f"params_nerstf_mlp_{k}_weight"]
        assert p.shape == (1, *ref.shape)
        np.testing.assert_allclose(p[0].numpy(), ref, atol=1e-5)


def test_field_matches_official(decoder):
    with torch.no_grad():
        params = decoder.project(torch.from_numpy(NPZ["latent"]))
        out = query_field(params, torch.from_numpy(NPZ["query_points"])[None], decoder=decoder)
        grid = query_field(params, torch.from_numpy(NPZ["grid32_points"])[None], decoder=decoder,
                           outputs=("sdf",), chunk=5000)
    assert set(out) == {"sdf", "stf_rgb"} and set(grid) == {"sdf"}
    # The fixture field is not trivial: both signs and varied colours.
    assert (NPZ["sdf"] > 0).mean() > 0.05 and (NPZ["sdf"] < 0).mean() > 0.5 and NPZ["stf_rgb"].std() > 0.05
    np.testing.assert_allclose(out["sdf"][0].numpy(), NPZ["sdf"], atol=1e-4)
    np.testing.assert_allclose(out["stf_rgb"][0].numpy(), NPZ["stf_rgb"], atol=1e-5)
    np.testing.assert_allclose(grid["sdf"][0].reshape(32, 32, 32).numpy(), NPZ["grid32_sdf"], atol=1e-4)


def test_vector_decoder_layout_loads_strictly_and_round_trips(decoder):
    raw = load_weights("decoder_transmitter_layout.safetensors")
    renamed = {k.replace("encoder.params_proj.", "params_proj."): v for k, v in raw.items()}  # README §5 rename
    other = ImplicitDecoder(decoder.cfg)
    other.load_state_dict(renamed, strict=True)
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    back = decoder_to_transmitter_keys(decoder.state_dict())
    assert set(back) == set(raw) and all(torch.equal(back[k], raw[k]) for k in raw)


def test_transmitter_mapping_separates_encoder_keys():
    sd = {"encoder.params_proj.projections.x.proj.weight": 1, "renderer.nerstf.mlp.4.bias": 2,
          "encoder.ln_post.weight": 3, "encoder.output_tokens": 4}
    dec, enc = transmitter_to_decoder_keys(sd)
    assert dec == {"params_proj.projections.x.proj.weight": 1, "renderer.nerstf.mlp.4.bias": 2}
    assert enc == {"ln_post.weight": 3, "output_tokens": 4}
    with pytest.raises(EngineError):
        transmitter_to_decoder_keys({"wrapped.pos_emb": 0})
    with pytest.raises(EngineError):
        transmitter_to_decoder_keys({"encoder.ln_post.weight": 0})


def _layout(module: torch.nn.Module) -> dict:
    buffers = {n for n, _ in module.named_buffers()}
    return {k: (list(v.shape), "buffer" if k in buffers else "parameter") for k, v in module.state_dict().items()}


def test_full_size_layout_equals_manifests():
    dec = ImplicitDecoder(DecoderConfig(), device="meta")
    ours = _layout(dec)
    manifest = {k: (v["shape"], v["kind"]) for k, v in load_manifest("vector_decoder")["state_dict"].items()}
    assert ours == manifest
    transmitter = load_manifest("transmitter")["state_dict"]
    wanted = {k: (v["shape"], v["kind"]) for k, v in transmitter.items()
              if k.startswith("renderer.") or k.startswith("encoder.params_proj.")}
    mapped = decoder_to_transmitter_keys(ours)
    assert mapped == wanted
    assert sum(math.prod(s) for s, kind in ours.values() if kind == "parameter") == 226_076_870


def _reference_mlp(decoder, params, points):
    """Straightforward official-order MLP with the 51 zero direction columns concatenated (no folding)."""
    mlp = decoder.renderer.nerstf.mlp
    h = posenc_nerf(points)
    for i in range(7):
        if i == 4:
            h = torch.cat([h, torch.zeros(*h.shape[:-1], 51)], dim=-1)
        h = torch.einsum("bni,boi->bno", h, params[i]) + mlp[i].bias if i < 4 else mlp[i](h)
        if i < 6:
            h = h * torch.sigmoid(h)
    return h


def test_every_output_slot_and_activation(decoder):
    torch.manual_seed(0)
    pts = torch.rand(2, 300, 3) * 2 - 1
    with torch.no_grad():
        lat = torch.stack([torch.from_numpy(NPZ["latent"]), torch.tanh(torch.randn(decoder.d_latent))])
        params = decoder.project(lat)
        out = query_field(params, pts, decoder=decoder, outputs=tuple(OUTPUT_SLOTS))
        raw = _reference_mlp(decoder, params, pts)
    assert out["sdf"].shape == (2, 300) and out["stf_rgb"].shape == (2, 300, 3)
    torch.testing.assert_close(out["sdf"], torch.tanh(raw[..., 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["density_coarse"], torch.relu(raw[..., 1]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out["density_fine"], torch.relu(raw[..., 2]), atol=1e-4, rtol=1e-5)
    for name, lo in (("stf_rgb", 3), ("nerf_rgb_coarse", 6), ("nerf_rgb_fine", 9)):
        torch.testing.assert_close(out[name], torch.sigmoid(raw[..., lo:lo + 3]), atol=1e-5, rtol=0)
    # The two latents give different fields (the per-latent weights are really per latent).
    assert (out["sdf"][0] - out["sdf"][1]).abs().max() > 0.1
    with pytest.raises(ValueError):
        query_field(params, pts, decoder=decoder, outputs=("colour",))


def test_field_fn_and_bad_latent(decoder):
    fn = decoder.field_fn(torch.from_numpy(NPZ["latent"]), chunk=777)
    pts = torch.from_numpy(NPZ["query_points"]).reshape(40, 50, 3)
    out = fn(pts)
    assert out["sdf"].shape == (40, 50) and out["nerf_rgb_fine"].shape == (40, 50, 3)
    np.testing.assert_allclose(out["sdf"].reshape(-1).detach().numpy(), NPZ["sdf"], atol=1e-4)
    with pytest.raises(EngineError):
        decoder.project(torch.zeros(5))


def _small_cfg() -> DecoderConfig:
    return DecoderConfig(nerstf=NeRSTFConfig(d_hidden=16), params_proj=ParamsProjConfig(d_latent=8))


def test_init_follows_official_recipe():
    torch.manual_seed(0)
    dec = ImplicitDecoder(DecoderConfig(nerstf=NeRSTFConfig(d_hidden=64), params_proj=ParamsProjConfig(d_latent=64)))
    proj = dec.params_proj.projections["nerstf__mlp__1__weight"]
    assert torch.all(proj.norm.weight == 0.0625) and torch.all(proj.norm.bias == 0) and torch.all(proj.proj.bias == 0)
    assert abs(proj.proj.weight.std().item() - 1 / 8) < 0.01
    mlp = dec.renderer.nerstf.mlp
    assert abs(mlp[5].weight.std().item() - 0.25 / 8) < 0.003
    assert abs(mlp[4].weight.std().item() - 0.25 / math.sqrt(64 + 51)) < 0.003
    assert mlp[6].bias[0].item() == pytest.approx(-0.1) and mlp[6].bias[1].item() == pytest.approx(0.1)
    assert torch.all(mlp[6].bias[2:] == 0) and torch.all(mlp[3].bias == 0)
    assert isinstance(mlp[6].weight, torch.nn.Parameter) and not isinstance(mlp[0].weight, torch.nn.Parameter)


def test_gradients_reach_projection_and_shared_layers():
    torch.manual_seed(0)
    dec = ImplicitDecoder(_small_cfg()).double()
    lat = torch.randn(2, dec.d_latent, dtype=torch.float64)
    pts = torch.rand(2, 7, 3, dtype=torch.float64) * 2 - 1

    def loss_of(d):
        out = d(lat, pts, outputs=("sdf", "stf_rgb", "density_fine"))
        return out["sdf"].square().sum() + out["stf_rgb"].sum() + out["density_fine"].sum()

    loss_of(dec).backward()
    w = dec.params_proj.projections["nerstf__mlp__0__weight"].proj.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert dec.renderer.nerstf.mlp[5].weight.grad.abs().sum() > 0
    assert dec.renderer.nerstf.mlp[0].bias.grad.abs().sum() > 0
    # Finite-difference check of one projection weight.
    i, j, eps = 3, 5, 1e-6
    analytic = w.grad[i, j].item()
    with torch.no_grad():
        w[i, j] += eps
        up = loss_of(dec).item()
        w[i, j] -= 2 * eps
        down = loss_of(dec).item()
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-8)


def test_srgb_to_linear():
    u = torch.tensor([0.0, 0.04045, 0.5, 1.0])
    np.testing.assert_allclose(srgb_to_linear(u).numpy(), [0.0, 0.04045 / 12.92, 0.21404114, 1.0], rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_autocast_on_cuda(decoder):
    dec = _fixture_decoder().cuda()
    pts = torch.from_numpy(NPZ["query_points"])[None].cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = dec(torch.from_numpy(NPZ["latent"]).cuda(), pts)
    assert out["sdf"].dtype == torch.float32
    agree = ((out["sdf"][0].cpu().numpy() > 0) == (NPZ["sdf"] > 0)).mean()
    assert agree > 0.99
    assert np.abs(out["stf_rgb"][0].cpu().numpy() - NPZ["stf_rgb"]).mean() < 0.02
