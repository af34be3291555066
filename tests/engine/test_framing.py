"""The embedded model's framing check of image prompts (engine.conditioning.framing)."""

import logging

import numpy as np
import pytest

from engine.conditioning.framing import TRAINING_EXTENT, framing_advice, subject_framing
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
