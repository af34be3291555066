"""Transmitter encoder: parity with the official encoder fixture (fixtures README §6), manifest keys at full size,
bottleneck behaviour, ball query against a brute-force reference, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.refdata import load_config, load_manifest, load_npz, load_weights
from engine.config import OFFICIAL_CONFIG_DIR, EncoderConfig, transmitter_from_official
from engine.models.encoder import BOTTLENECK_STEPS, PointCloudEncoder, inv_parabola_schedule
from engine.models.encoder_inputs import official_batch_from_arrays
from engine.models.encoder_pointconv import ball_query
from engine.records import EngineError
from engine.render.cameras import Camera, look_at_cameras

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def ref():
    return {k: torch.from_numpy(v) for k, v in load_npz("encoder").items()}


@pytest.fixture(scope="module")
def weights():
    return load_weights("encoder.safetensors")


@pytest.fixture(scope="module")
def model(weights):
    enc_cfg, _ = transmitter_from_official(load_config("encoder"))
    m = PointCloudEncoder(enc_cfg).eval()
    sd = {k[len("encoder."):]: v for k, v in weights.items() if not k.startswith("encoder.params_proj.")}
    m.load_state_dict(sd, strict=True)
    return m


def _fixture_camera(ref) -> Camera:
    f = lambda k: ref[k].reshape(-1, 3)  # noqa: E731
    s, fov = int(ref["camera_size"]), float(ref["camera_fov"])
    return Camera(f("camera_origin"), f("camera_x"), f("camera_y"), f("camera_z"), s, s, fov, fov)


@pytest.fixture(scope="module")
def batch(ref):
    return official_batch_from_arrays(ref["points"].transpose(1, 2), ref["views_u8"], ref["view_alphas_u8"],
                                      ref["depths"], _fixture_camera(ref))


def test_input_helper_matches_official_conversions(batch, ref):
    assert torch.equal(batch.points, ref["points"])
    assert torch.equal(batch.views, ref["views_tensor"])
    assert torch.equal(batch.alphas, ref["view_alphas_tensor"])
    assert torch.equal(batch.depths, ref["depths_tensor"])  # background 12 clamped to max_depth 9
    assert batch.depths.max() == 9.0 and ref["depths"].max() > 9.0
    torch.testing.assert_close(batch.rays, ref["rays"], rtol=0, atol=1e-6)
    assert torch.equal(batch.camera_z, ref["camera_z"])


def test_ball_query_exact(model, ref):
    idx = model.point_conv.neighbours(ref["points"][:, :3].transpose(1, 2))
    assert idx.shape == ref["ball_query_idx"].shape
    assert torch.equal(idx.to(torch.int32), ref["ball_query_idx"])


def test_ball_query_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    xyz = torch.rand(2, 300, 3, generator=g) * 2 - 1
    centres = xyz[:, :40]
    idx = ball_query(xyz, centres, 0.3, 16)
    for b in range(2):
        for s in range(40):
            d = ((xyz[b] - centres[b, s]) ** 2).sum(-1)
            hits = torch.nonzero(d <= 0.09 + 1e-6).flatten().tolist()
            near = [i for i in hits if abs(d[i].item() - 0.09) > 1e-5]  # skip boundary ties
            got = idx[b, s].tolist()
            expect = hits[:16] + [hits[0]] * max(0, 16 - len(hits))
            if len(near) == len(hits):
                assert got == expect
            assert got[0] == hits[0]


def test_point_conv_tokens(model, ref):
    with torch.no_grad():
        tok = model.point_conv_tokens(ref["points"])
    torch.testing.assert_close(tok, ref["point_conv_tokens"], **TOL)


@pytest.mark.parametrize("fused", [True, False])
def test_multiview_tokens(model, batch, ref, fused):
    with torch.no_grad():
        tok = model.multiview_tokens(*batch.tensors()[1:], fused=fused)
    torch.testing.assert_close(tok, ref["multiview_tokens"], **TOL)


def test_latent_parity(model, batch, ref):
    with torch.no_grad():
        pre = model.encode_batch(batch)
        lat = model.bottleneck(pre, training=False)
        lat_fwd = model(*batch.tensors())  # eval mode: forward == tanh(encode)
    torch.testing.assert_close(pre, ref["latent_pre_bottleneck"], **TOL)
    torch.testing.assert_close(lat, ref["latent"], **TOL)
    assert torch.equal(lat_fwd, lat)


def test_fused_path_with_per_pixel_origins(model, batch):
    """Rays whose origins differ per pixel take the general fused path (origin encoding convolved, not split)."""
    args = list(batch.tensors())
    rays = args[4].clone()
    rays[..., 0, :] += 0.01 * torch.randn(rays.shape[:-2] + (3,), generator=torch.Generator().manual_seed(0))
    args[4] = rays
    with torch.no_grad():
        fused = model.multiview_tokens(*args[1:], fused=True)
        reference = model.multiview_tokens(*args[1:], fused=False)
    torch.testing.assert_close(fused, reference, **TOL)


def test_bool_mask_equals_alpha_threshold(model, batch):
    args = list(batch.tensors())
    with torch.no_grad():
        a = model.multiview_tokens(*args[1:])
        args[3] = args[3] >= 0.999
        b = model.multiview_tokens(*args[1:])
    assert torch.equal(a, b)


def test_fused_and_reference_gradients_agree(model, batch):
    """The fused multiview path must train the same weights (incl. unk_token) as the two-conv reference."""
    grads = {}
    for fused in (True, False):
        model.zero_grad()
        tok = model.multiview_tokens(*batch.tensors()[1:], fused=fused)
        (tok * torch.linspace(-1, 1, tok.shape[-1])).sum().backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert set(grads[True]) == {"mv_pcl_embed.weight", "mv_pcl_embed.bias", "mv_pcl_embed.unk_token",
                                "patch_emb.weight", "patch_emb.bias"}
    assert set(grads[True]) == set(grads[False])
    for name, g in grads[True].items():
        ref = grads[False][name]
        assert (g - ref).abs().max() <= 1e-4 * ref.abs().max(), name


def test_inv_parabola_schedule_analytic():
    sa, sb = inv_parabola_schedule(5.0)
    assert sa.shape == (BOTTLENECK_STEPS,)
    t = (torch.arange(BOTTLENECK_STEPS, dtype=torch.float64) + 1) / BOTTLENECK_STEPS
    # The beta product telescopes to alpha_bar(t_{i+1}) except the clipped last step (beta 0.999).
    torch.testing.assert_close(sa[:-1] ** 2, (1 - t**5)[:-1], rtol=0, atol=1e-12)
    torch.testing.assert_close(sa[-1] ** 2, (1 - t[-2] ** 5) * 0.001, rtol=1e-9, atol=0)
    torch.testing.assert_close(sa**2 + sb**2, torch.ones_like(sa), rtol=0, atol=1e-12)


def test_bottleneck_noise_only_in_training():
    cfg = EncoderConfig(width=32, layers=2, heads=2, data_ctx=8, latent_ctx=8, d_latent=4, n_points=8, n_views=1,
                        pointconv_hidden=(32,), bottleneck_diffusion_prob=0.5)
    m = PointCloudEncoder(cfg)
    x = torch.randn(4000, 16)
    assert torch.equal(m.bottleneck(x, training=False), x.tanh())
    noisy = m.bottleneck(x, training=True, generator=torch.Generator().manual_seed(1))
    again = m.bottleneck(x, training=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    # Replay the official draw order (randint t, rand < p, randn noise) and check the q_sample formula.
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, BOTTLENECK_STEPS, (4000,), generator=g)
    use = torch.rand(4000, generator=g) < 0.5
    noise = torch.randn(x.shape, generator=g)
    t = torch.where(use, t, 0)
    sa, sb = inv_parabola_schedule(5.0)
    expect = sa[t].float()[:, None] * x.tanh() + sb[t].float()[:, None] * noise
    torch.testing.assert_close(noisy, expect, rtol=0, atol=1e-6)
    assert 0.45 < use.float().mean().item() < 0.55
    moved = (noisy - x.tanh()).abs().amax(dim=1)
    assert (moved[~use] < 1e-6).all() and (moved[use] > 0.1).float().mean() > 0.5


def _random_batch(cfg: EncoderConfig, b: int, n: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    cam = look_at_cameras(torch.randn(b * v, 3, generator=g), s)
    o, d = cam.rays()
    return (torch.cat([torch.rand(b, 3, n, generator=g) * 2 - 1, torch.rand(b, 3, n, generator=g)], 1),
            torch.rand(b, v, 3, s, s, generator=g) * 2 - 1, torch.rand(b, v, 1, s, s, generator=g) * 4 + 2,
            torch.rand(b, v, 1, s, s, generator=g), torch.stack([o, d], -2).view(b, v, s, s, 2, 3),
            cam.z.view(b, v, 3))


SMALL = EncoderConfig(width=32, layers=3, heads=2, data_ctx=16, latent_ctx=8, d_latent=4, n_points=64, n_views=2,
                      pointconv_hidden=(32, 32), image_size=16)


def test_training_step_gradients_and_subsets():
    m = PointCloudEncoder(SMALL).train()
    args = _random_batch(SMALL, 2, 64, 2)
    out = m(*args, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, SMALL.latent_ctx * SMALL.d_latent)
    out.square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # More points/views than n_points/n_views: the cross-attention keys are a generator-drawn subset.
    m.eval()
    big = _random_batch(SMALL, 2, 100, 3, seed=1)
    with torch.no_grad():
        a = m.encode(*big, generator=torch.Generator().manual_seed(5))
        b = m.encode(*big, generator=torch.Generator().manual_seed(5))
        c = m.encode(*big, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("which, shape", [
    (0, (2, 3, 64)), (0, (2, 6, 10)), (1, (2, 2, 3, 16, 12)), (1, (2, 1, 3, 16, 16)), (1, (2, 2, 3, 12, 12)),
    (2, (2, 2, 16, 16)), (3, (2, 2, 1, 8, 8)), (4, (2, 2, 16, 16, 3)), (5, (2, 3)),
])
def test_bad_shapes_raise_engine_error(which, shape):
    m = PointCloudEncoder(SMALL)
    args = list(_random_batch(SMALL, 2, 64, 2))
    args[which] = torch.zeros(shape)
    with pytest.raises(EngineError):
        m.encode(*args)


def test_input_helper_rejects_bad_arrays(ref):
    cam = _fixture_camera(ref)
    pts, views, alphas, depths = ref["points"].transpose(1, 2), ref["views_u8"], ref["view_alphas_u8"], ref["depths"]
    with pytest.raises(EngineError):
        official_batch_from_arrays(pts, views.float(), alphas, depths, cam)  # not uint8
    with pytest.raises(EngineError):
        official_batch_from_arrays(pts[..., :3], views, alphas, depths, cam)
    with pytest.raises(EngineError):
        official_batch_from_arrays(pts, views, alphas[:, :2], depths, cam)
    with pytest.raises(EngineError):
        official_batch_from_arrays(pts, views, alphas, depths, look_at_cameras(torch.randn(4, 3), 16))
    with pytest.raises(EngineError):
        official_batch_from_arrays(pts.numpy().tolist(), views, alphas, depths, cam)


def test_full_size_meta_build_matches_manifest():
    enc_cfg, _ = transmitter_from_official(OFFICIAL_CONFIG_DIR / "transmitter_config.yaml")
    m = PointCloudEncoder(enc_cfg, device="meta")
    manifest = load_manifest("transmitter")["state_dict"]
    expected = {k[len("encoder."):]: tuple(v["shape"]) for k, v in manifest.items()
                if k.startswith("encoder.") and not k.startswith("encoder.params_proj.")}
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == expected
    assert all(v.is_meta for v in m.state_dict().values())


def test_fixture_weight_keys_equal_model_keys(model, weights):
    enc_keys = {k for k in weights if not k.startswith("encoder.params_proj.")}
    assert {f"encoder.{k}" for k in model.state_dict()} == enc_keys
    assert np.prod(model.output_tokens.shape) == 256 * 128
