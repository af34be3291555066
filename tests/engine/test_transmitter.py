"""Transmitter wrapper: official key layout (full-size manifest on meta), fixture params through the decoder's
projection, shared parameters between the transmitter and its decoder."""

from __future__ import annotations

import pytest
import torch

from tests.refdata import load_config, load_manifest, load_npz, load_weights
from engine.config import OFFICIAL_CONFIG_DIR, DecoderConfig, EncoderConfig, NeRSTFConfig, ParamsProjConfig
from engine.models.encoder_inputs import official_batch_from_arrays
from engine.models.transmitter import Transmitter
from engine.records import EngineError
from engine.render.cameras import Camera


def test_full_size_meta_build_matches_manifest():
    t = Transmitter.from_official_config(OFFICIAL_CONFIG_DIR / "transmitter_config.yaml", device="meta")
    manifest = load_manifest("transmitter")
    expected = {k: tuple(v["shape"]) for k, v in manifest["state_dict"].items()}
    sd = t.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert len(sd) == manifest["n_keys"] == 213
    assert sum(v.numel() for v in sd.values()) == manifest["n_state_dict_elements"]
    buffers = {k for k, v in manifest["state_dict"].items() if v["kind"] == "buffer"}
    assert {k for k, _ in t.named_buffers()} == buffers
    assert sum(p.numel() for p in t.parameters()) == manifest["n_parameters"]


@pytest.fixture(scope="module")
def fixture_transmitter():
    t = Transmitter.from_official_config(load_config("encoder")).eval()
    missing, unexpected = t.load_state_dict(load_weights("encoder.safetensors"), strict=False)
    assert not unexpected
    assert missing and all(k.startswith("renderer.") for k in missing)  # the encoder fixture has no renderer
    return t


def test_fixture_latent_and_params(fixture_transmitter):
    ref = {k: torch.from_numpy(v) for k, v in load_npz("encoder").items()}
    f = lambda k: ref[k].reshape(-1, 3)  # noqa: E731
    s, fov = int(ref["camera_size"]), float(ref["camera_fov"])
    cam = Camera(f("camera_origin"), f("camera_x"), f("camera_y"), f("camera_z"), s, s, fov, fov)
    batch = official_batch_from_arrays(ref["points"].transpose(1, 2), ref["views_u8"], ref["view_alphas_u8"],
                                       ref["depths"], cam)
    with torch.no_grad():
        latent = fixture_transmitter.encode_batch(batch)
        params = fixture_transmitter.latent_to_params(ref["latent"])
    torch.testing.assert_close(latent, ref["latent"], rtol=1e-4, atol=1e-4)
    assert len(params) == 4
    for k, p in enumerate(params):
        torch.testing.assert_close(p, ref[f"params_nerstf_mlp_{k}_weight"], rtol=1e-4, atol=1e-4)


def test_training_mode_adds_bottleneck_noise(fixture_transmitter):
    ref = {k: torch.from_numpy(v) for k, v in load_npz("encoder").items()}
    args = (ref["points"], ref["views_tensor"], ref["depths_tensor"], ref["view_alphas_tensor"], ref["rays"],
            ref["camera_z"])
    x = torch.randn(64, ref["latent"].shape[1])
    enc = fixture_transmitter.encoder
    assert torch.equal(enc.bottleneck(x, training=False), x.tanh())
    noisy = enc.bottleneck(x, training=True, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy, x.tanh(), atol=1e-3)  # p = 0.1 of 64 rows noised (seeded)
    with torch.no_grad():
        ev = fixture_transmitter.encode_to_latent(*args)
        ev2 = fixture_transmitter.encode_to_latent(*args, training=False)
    assert torch.equal(ev, ev2)


def test_decoder_shares_parameters():
    cfg_e = EncoderConfig(width=32, layers=2, heads=2, data_ctx=16, latent_ctx=32, d_latent=8, n_points=64,
                          n_views=1, pointconv_hidden=(32,), image_size=16)
    cfg_d = DecoderConfig(nerstf=NeRSTFConfig(d_hidden=8), params_proj=ParamsProjConfig(d_latent=8))
    t = Transmitter(cfg_e, cfg_d)
    dec_sd = t.decoder.state_dict()
    tr_sd = t.state_dict()
    for k, v in dec_sd.items():
        tk = "encoder." + k if k.startswith("params_proj.") else k
        assert tr_sd[tk].data_ptr() == v.data_ptr(), k
    with torch.no_grad():
        t.encoder.params_proj.projections["nerstf__mlp__0__weight"].proj.bias.add_(1.0)
    assert torch.equal(t.decoder.params_proj.projections["nerstf__mlp__0__weight"].proj.bias,
                       t.encoder.params_proj.projections["nerstf__mlp__0__weight"].proj.bias)
    with pytest.raises(EngineError):
        Transmitter(cfg_e, DecoderConfig(nerstf=NeRSTFConfig(d_hidden=16), params_proj=ParamsProjConfig(d_latent=8)))
