"""The embedded model's framing check of image prompts (engine.conditioning.framing)."""

import logging

import numpy as np
import pytest

from engine.conditioning.framing import TRAINING_EXTENT, framing_advice, reframe, subject_framing
from engine.eval.run import condition_image
from engine.training.world import ObjectSpec, allowed_kinds, kind_from_index


def _pad(img, factor):
    n = int(round(img.shape[0] * factor))
    o = (n - img.shape[0]) // 2
    out = np.full((n, n, 3), 255, np.uint8)
    out[o:o + img.shape[0], o:o + img.shape[1]] = img
    return out


def test_pictures_framed_like_the_training_renders_pass():
    for k in allowed_kinds("heldout")[::3]:
        for seed in (0, 1):
            img = condition_image(ObjectSpec(*kind_from_index(k)), seed)
            extent, background = subject_framing(img)
            assert TRAINING_EXTENT[0] <= extent <= TRAINING_EXTENT[1] and background > 0.95
            assert framing_advice(img) is None


def test_too_small_too_large_dark_and_empty_pictures_get_advice():
    img = condition_image(ObjectSpec(1, 0, 4), 0)  # a blue sphere
    small = framing_advice(_pad(img, 2.5))
    assert "spans" in small and "crop the picture closer" in small
    e = subject_framing(img)[0]
    n = int(img.shape[0] * e * 0.95)  # a crop the object almost fills
    o = (img.shape[0] - n) // 2
    large = framing_advice(img[o:o + n, o:o + n])
    assert "spans" in large and "pad the picture" in large
    dark = img.copy()
    dark[(img >= 250).all(-1)] = 20
    assert "dark" in framing_advice(dark)
    assert "no object" in framing_advice(np.full((64, 64, 3), 200, np.uint8))


def test_centre_crop_and_alpha_are_measured_as_the_clip_sees_them():
    img = condition_image(ObjectSpec(0, 0, 0), 0)
    wide = np.full((128, 256, 3), 255, np.uint8)
    wide[:, 64:192] = img  # the centre crop of the wide picture is the render itself
    assert subject_framing(wide) == subject_framing(img)
    bg = (img >= 250).all(-1)
    rgba = np.concatenate([img, np.where(bg, 0, 255).astype(np.uint8)[..., None]], -1)
    rgba[bg, :3] = 0  # a cutout: transparent black background
    assert subject_framing(rgba) == pytest.approx(subject_framing(img))


def test_the_pipeline_warns_about_the_framing_of_mini_image_prompts(caplog):
    from engine.pipeline import generate
    from engine.records import GenerationRequest

    img = condition_image(ObjectSpec(1, 0, 4), 0)
    with caplog.at_level(logging.WARNING, logger="shap_e"):
        generate(GenerationRequest(image=img, model="mini", steps=2, grid_size=32, device="cpu"))
        assert not [r for r in caplog.records if "spans" in r.getMessage()]
        generate(GenerationRequest(image=_pad(img, 2.5), model="mini", steps=2, grid_size=32, device="cpu"))
    assert any("spans" in r.getMessage() for r in caplog.records)


def test_float_and_grey_pictures_are_measured_like_uint8_ones():
    img = condition_image(ObjectSpec(2, 1, 7), 0)
    assert subject_framing(img.astype(np.float32) / 255) == subject_framing(img)
    grey = img.mean(-1).astype(np.uint8)
    assert subject_framing(grey) == subject_framing(np.repeat(grey[..., None], 3, -1))


def test_reframe_pads_and_crops_about_the_centre():
    img = condition_image(ObjectSpec(1, 0, 4), 0)  # 128 px, white background
    e = subject_framing(img)[0]
    padded = reframe(img, 1.5)
    assert padded.shape == (192, 192, 3) and np.array_equal(padded, _pad(img, 1.5))
    assert subject_framing(padded)[0] == pytest.approx(e / 1.5, abs=1 / 128)
    cropped = reframe(img, 0.8)
    assert cropped.shape == (102, 102, 3) and np.array_equal(cropped, img[13:115, 13:115])
    assert subject_framing(cropped)[0] == pytest.approx(min(1.0, e / 0.8), abs=2 / 102)
    assert np.array_equal(reframe(img, 1.0), img)
    grey = reframe(np.full((8, 8, 3), 90, np.uint8), 2.0)  # the border's colour fills the new canvas
    assert grey.shape == (16, 16, 3) and (grey == 90).all()


def test_eval_image_scale_pads_the_prompts(capsys):
    from engine.cli import main

    assert main(["eval", "--mode", "image", "--seeds", "1", "--trained-sample", "0", "--image-scale", "9",
                 "--steps", "2"]) != 0
    assert "--image-scale 9" in capsys.readouterr().err


def test_zoomed_views_extend_the_conditioning_of_every_object():
    import torch

    from engine.training.encode_dataset import add_zoomed_views

    class FakeClip:  # grid = the picture's dark-pixel fraction per row, enough to see the zoom
        def grid(self, images):
            return (images.mean(-1) < 0.5).float().mean(-1, keepdim=True).transpose(1, 2).half()

    imgs = torch.full((3, 1, 32, 32, 3), 255, dtype=torch.uint8)
    imgs[:, :, 8:24, 8:24] = 20  # a dark square spanning half the picture
    blob = {"cond_images": imgs, "image_grids": FakeClip().grid(imgs.flatten(0, 1).float() / 255).view(3, 1, 1, 32),
            "latents": torch.zeros(3, 4)}
    out = add_zoomed_views(blob, FakeClip(), views=4, max_scale=1.6, seed=0)
    assert out["cond_images"].shape == (3, 5, 32, 32, 3) and out["image_grids"].shape == (3, 5, 1, 32)
    scales = out["zoom_scales"]
    assert torch.equal(scales[:, 0], torch.ones(3)) and ((scales >= 1 / 1.6) & (scales <= 1.6)).all()
    dark = (out["cond_images"].float().mean(-1) < 128).float().mean((-1, -2))  # (3, 5) dark fraction
    expected = torch.clamp(0.25 / scales ** 2, max=1.0)  # the square's area shrinks (pad) or grows (crop)
    assert torch.allclose(dark, expected, atol=0.06), (dark, expected)
    assert torch.allclose(out["image_grids"][:, 1:].float().mean((-1, -2)), dark[:, 1:], atol=0.01)  # embedded
