"""CLIP conditioner: parity with the official FrozenImageCLIP on the tiny OpenAI-format CLIP (fixture clip_tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import ClipConfig
from engine.records import EngineError
from tests.refdata import FIXTURES, load_config, load_npz

pytest.importorskip("open_clip")

from engine.conditioning.clip import (  # noqa: E402
    ClipConditioner, build_open_clip, load_image, normalize_state_dict, preprocess_image, tokenize,
)


def tiny_config() -> ClipConfig:
    c = load_config("clip_tiny")["clip_config"]
    return ClipConfig(arch="custom", pretrained="", embed_dim=c["embed_dim"], image_size=c["image_resolution"],
                      vision_width=c["vision_width"], vision_layers=c["vision_layers"],
                      vision_patch_size=c["vision_patch_size"], text_width=c["transformer_width"],
                      text_layers=c["transformer_layers"], text_heads=c["transformer_heads"],
                      context_length=c["context_length"], vocab_size=c["vocab_size"], quick_gelu=True)


@pytest.fixture(scope="module")
def clip() -> ClipConditioner:
    return ClipConditioner.from_config(tiny_config(), weights=FIXTURES / "clip_tiny.safetensors")


@pytest.fixture(scope="module")
def ref() -> dict:
    return load_npz("clip_tiny")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [load_image(FIXTURES / "clip_image0_rgb.png"), load_image(FIXTURES / "clip_image1_rgba.png")]


def test_tokens_exact_and_truncation_flag(clip, ref):
    prompts = load_config("clip_tiny")["prompts"]
    tokens, truncated = clip.tokenize(prompts)
    assert tokens.dtype == torch.long and tokens.shape == (3, 77)
    np.testing.assert_array_equal(tokens.numpy(), ref["tokens"])
    assert truncated == [False, False, True]
    assert tokens[2, 76] == 49407 and tokens[0, 0] == 49406  # EOT kept last when truncated


def test_truncation_boundary():
    # SOT + n words + EOT: 75 one-token words fit exactly (77), 76 do not.
    fits, over = " ".join(["cat"] * 75), " ".join(["cat"] * 76)
    tokens, truncated = tokenize([fits, over])
    assert truncated == [False, True]
    assert tokens[0, 76] == 49407 and tokens[1, 76] == 49407
    assert torch.equal(tokens[0], tokens[1])  # truncating 76 words gives the 75-word tokens


def test_text_embedding(clip, ref):
    emb = clip.embed_text(load_config("clip_tiny")["prompts"])
    assert emb.dtype == torch.float32 and emb.shape == (3, 32)
    np.testing.assert_allclose(emb.numpy(), ref["text_emb"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(emb.norm(dim=-1).numpy(), 1.0, atol=1e-6)


def test_load_image_keeps_alpha(images):
    assert images[0].shape == (200, 300, 3) and images[0].dtype == np.uint8
    assert images[1].shape == (160, 128, 4)


def test_preprocess_matches_official_pixels(clip, ref, images):
    px = clip.preprocess(images)
    assert px.shape == (2, 3, 224, 224) and px.dtype == torch.float32
    np.testing.assert_allclose(px.numpy(), ref["pixel_values"], atol=1e-6, rtol=0)


def test_preprocess_float_input_equals_uint8(clip, images):
    as_float = images[0].astype(np.float32) / 255.0
    assert torch.equal(clip.preprocess([as_float]), clip.preprocess([images[0]]))


def test_image_grid_and_embedding(clip, ref, images):
    grid = clip.embed_image_grid(images)
    assert grid.shape == (2, 64, 256) and grid.dtype == torch.float32
    np.testing.assert_allclose(grid.numpy(), ref["image_grid"], atol=1e-5, rtol=0)
    emb = clip.embed_image(images)
    np.testing.assert_allclose(emb.numpy(), ref["image_emb"], atol=1e-5, rtol=0)
    # Preprocessed pixels are accepted as well.
    np.testing.assert_allclose(clip.embed_image(torch.from_numpy(ref["pixel_values"])).numpy(), ref["image_emb"],
                               atol=1e-5, rtol=0)


def test_grid_is_before_ln_post(clip, images):
    """The grid must not be layer-normalised: open_clip's ln_post applied to it gives different tokens."""
    grid = clip.embed_image_grid(images[:1])  # (1, C, T)
    normed = clip.model.visual.ln_post(grid.transpose(1, 2))
    assert (normed - grid.transpose(1, 2)).abs().max() > 1e-2


def test_openai_state_dict_with_int_entries_loads():
    from tests.refdata import load_weights

    sd = load_weights("clip_tiny.safetensors")
    sd_openai = {**sd, "input_resolution": 224, "context_length": 77, "vocab_size": 49408}
    sd_ddp = {f"module.{k}": v for k, v in sd.items()}
    assert normalize_state_dict(sd_openai).keys() == sd.keys() == normalize_state_dict(sd_ddp).keys()
    a = ClipConditioner.from_config(tiny_config(), weights=sd_ddp).embed_text(["a cube"])
    b = ClipConditioner.from_config(tiny_config(), weights=sd).embed_text(["a cube"])
    assert torch.equal(a, b)


def test_wrong_weights_give_readable_error():
    sd = {k: v for k, v in build_open_clip(tiny_config()).state_dict().items() if "visual.proj" not in k}
    with pytest.raises(EngineError, match=r"1 missing \(visual\.proj\)"):
        ClipConditioner.from_config(tiny_config(), weights=sd)


def test_bad_image_files(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(EngineError, match="not a readable image") as err:
        load_image(bad)
    assert "PNG or JPEG" in err.value.hint
    with pytest.raises(EngineError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((FIXTURES / "clip_image0_rgb.png").read_bytes()[:200])
    with pytest.raises(EngineError, match="not a readable image"):
        load_image(truncated)


def test_bad_image_arrays(clip):
    with pytest.raises(EngineError, match="shape"):
        clip.preprocess([np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(EngineError, match="NaN"):
        clip.preprocess([np.full((4, 4, 3), np.nan, np.float32)])


def test_missing_real_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAP_E_CACHE", str(tmp_path))
    with pytest.raises(EngineError) as err:
        ClipConditioner.from_config(ClipConfig())  # ViT-L-14, nothing in the cache
    text = str(err.value)
    assert "ViT-L-14.pt" in text and str(tmp_path) in text
    assert "--clip-weights PATH" in err.value.hint and "python -m engine download clip" in err.value.hint
    assert "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836" in err.value.hint


def test_vit_l14_architecture_matches_manifest():
    """The named arch builds offline (meta device) with exactly the CLIP ViT-L/14 manifest's keys and shapes."""
    from tests.refdata import load_manifest

    manifest = load_manifest("clip_vit_l14")["state_dict"]
    model = build_open_clip(ClipConfig(), device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: v["shape"] for k, v in manifest.items() if k not in ("input_resolution", "context_length",
                                                                        "vocab_size")}
    assert ours == theirs
    # QuickGELU like the OpenAI weights
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_fp16_needs_cuda():
    with pytest.raises(EngineError, match="CUDA"):
        ClipConditioner.from_config(tiny_config(), dtype=torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_cuda_close_to_fp32(ref, images):
    clip16 = ClipConditioner.from_config(tiny_config(), weights=FIXTURES / "clip_tiny.safetensors", device="cuda",
                                         dtype=torch.float16)
    emb = clip16.embed_text(load_config("clip_tiny")["prompts"])
    assert emb.dtype == torch.float32
    np.testing.assert_allclose(emb.cpu().numpy(), ref["text_emb"], atol=5e-3)
    np.testing.assert_allclose(clip16.embed_image_grid(images).cpu().numpy(), ref["image_grid"], atol=5e-2)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_inference_towers_equal_open_clip(quick_gelu):
    """ClipModel (inference, no open_clip import) has open_clip CLIP's exact keys and shapes and, with its
    weights, the same text / image embeddings and visual tokens, bit for bit."""
    import dataclasses

    from engine.conditioning.clip_model import build_clip

    cfg = dataclasses.replace(tiny_config(), quick_gelu=quick_gelu)
    torch.manual_seed(0)
    ref = build_open_clip(cfg).eval()
    ours = build_clip(cfg).eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert {k: tuple(v.shape) for k, v in ref_sd.items()} == {k: tuple(v.shape) for k, v in our_sd.items()}
    ours.load_state_dict(ref_sd, strict=True)
    tokens, _ = tokenize(["a red cube", "a small green torus with a long caption " * 3, ""], cfg.context_length)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert torch.equal(ref.encode_text(tokens), ours.encode_text(tokens))
        assert torch.equal(ref.encode_image(pixels), ours.encode_image(pixels))
        assert not torch.isnan(build_clip(cfg).encode_text(tokens)).any()  # random init is usable too


def test_mini_text_generation_does_not_import_open_clip_package():
    """The cold-start saving: tokenizer module loaded on its own, towers from clip_model (no torchvision)."""
    import subprocess
    import sys

    code = ("import sys; from engine.registry import load; m = load('mini', 'text', 'cpu'); "
            "m.clip.embed_text(['a red cube']); "
            "print(sorted(k for k in ('open_clip', 'torchvision', 'transformers') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def _cutout(size=48):
    """An RGB picture on white and the same picture as a cutout: transparent (black) background, opaque object."""
    rgb = np.full((size, size, 3), 255, np.uint8)
    rgb[12:36, 16:32] = (40, 160, 60)
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[12:36, 16:32, :3] = (40, 160, 60)
    rgba[12:36, 16:32, 3] = 255
    return rgb, rgba


def test_alpha_background_composites_cutouts_before_the_transform():
    rgb, rgba = _cutout()
    on_white = preprocess_image(rgb, 32)
    torch.testing.assert_close(preprocess_image(rgba, 32, (1.0, 1.0, 1.0)), on_white, rtol=0, atol=1e-6)
    dropped = preprocess_image(rgba, 32)  # the official transform: alpha dropped, the background turns black
    assert (dropped - on_white).abs().amax() > 1.0
    torch.testing.assert_close(preprocess_image(rgb, 32, (1.0, 1.0, 1.0)), on_white, rtol=0, atol=0)  # RGB: as is


def test_mini_conditioner_reads_a_cutout_as_the_picture_on_white():
    from engine import registry

    loaded = registry.load("mini", "image", "cpu")
    assert loaded.clip.cfg.alpha_background == (1.0, 1.0, 1.0)
    rgb, rgba = _cutout(96)
    torch.testing.assert_close(loaded.clip.embed_image_grid([rgba]), loaded.clip.embed_image_grid([rgb]))
    assert ClipConfig().alpha_background is None  # the official models keep the official transform
