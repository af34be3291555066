"""Prior-sample training pairs for the decoder fine-tune: held-out objects refused, yaws read off the decoded field."""

import math

import pytest
import torch

from engine.mini_weights import load_mini
from engine.training import prior_targets as pt
from engine.training.encode_dataset import random_instances
from engine.training.object_bank import build_bank
from engine.training.world import ObjectSpec, allowed_kinds, is_held_out, kind_from_index


@pytest.fixture(scope="module")
def parts():
    p = load_mini("cpu")
    p["transmitter"].float()
    return p


def _bank(parts, specs, seed=0):
    enc = parts["transmitter"].encoder.cfg
    return build_bank(specs, torch.Generator().manual_seed(seed), n_points=enc.n_points, data_ctx=enc.data_ctx,
                      n_surface=64, n_views=enc.n_views, image_size=enc.image_size, max_depth=enc.max_depth)


def test_training_pairs_refuse_held_out_objects(parts):
    k = allowed_kinds("heldout")[0]
    bank = _bank(parts, [ObjectSpec(*kind_from_index(k))])
    assert is_held_out(int(bank.shape[0]), int(bank.color[0]))
    with pytest.raises(ValueError, match="train-split"):
        pt.prior_bank(parts, bank, ("text",), torch.Generator().manual_seed(0))


class _AnalyticDecoder:
    """Stands in for the decoder: each 'latent' is (shape, aspect, yaw) and decodes to that exact object."""

    def __call__(self, z, pts, outputs=("sdf",)):
        from engine.training.object_bank import _param_table
        from engine.training.world import signed_distance_tensors

        shape, aspect, yaw = z[:, 0].long(), z[:, 1].long(), z[:, 2]
        return {"sdf": -signed_distance_tensors(shape, _param_table("cpu")[shape, aspect], yaw, pts)}


def test_decoded_yaw_is_the_yaw_of_the_field():
    """The yaw search reads the yaw of the decoded field (mod 90°), whatever the spec says; shapes symmetric about
    Z keep their spec's yaw."""
    cases = [(0, 0, 35.0), (5, 1, 70.0), (7, 2, 10.0), (0, 2, 95.0)]  # cube, tall pyramid, flat octahedron, cube
    z = torch.tensor([[s, a, math.radians(y)] for s, a, y in cases])
    specs = [ObjectSpec(s, a, 0, yaw=0.0) for s, a, _ in cases]
    got = pt.decoded_yaws(_AnalyticDecoder(), z, specs, grid=32)
    for (_, _, want), have in zip(cases, got):
        assert abs(math.degrees(have) - want % 90) <= 2.5, (want, math.degrees(have))
    sphere = ObjectSpec(1, 0, 0, yaw=0.3)
    assert pt.decoded_yaws(_AnalyticDecoder(), torch.tensor([[1.0, 0.0, 0.0]]), [sphere]) == [0.3]


def test_prior_bank_pairs_each_sample_with_its_object(parts):
    specs = random_instances(allowed_kinds("train")[5], 2, torch.Generator().manual_seed(1))
    bank = _bank(parts, specs)
    z, pbank = pt.prior_bank(parts, bank, ("text", "image"), torch.Generator().manual_seed(2),
                             sampler="dpmpp_2m", steps=4)
    assert z.shape == (4, parts["configs"]["text"].prior.d_latent) and torch.isfinite(z).all()
    assert len(pbank) == 4 and torch.equal(pbank.kind(), bank.kind().repeat(2))
    # surface samples follow the (possibly new) yaw: still on the object's surface
    from engine.training.world import signed_distance_tensors
    from engine.training.object_bank import _param_table

    shape, prm, yaw = pbank.shape, _param_table("cpu")[pbank.shape, pbank.aspect], pbank.yaw
    d = signed_distance_tensors(shape, prm, yaw, pbank.surface)
    assert d.abs().max() < 1e-3


def test_image_samples_use_the_guidance_asked_for(parts):
    """The recipe re-draws decoder_finetune_2's image samples at the guidance of that day (1.5), not today's."""
    specs = random_instances(allowed_kinds("train")[7], 1, torch.Generator().manual_seed(3))

    def sample(guidance):
        return pt.sample_for_specs(parts, specs, "image", torch.Generator().manual_seed(4), sampler="dpmpp_2m",
                                   steps=3, guidance=guidance)

    default = parts["configs"]["image"].sampler.guidance_scale
    assert torch.equal(sample(None), sample(default))
    assert not torch.allclose(sample(None), sample(default + 1.0))
