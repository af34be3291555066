"""Official YAML -> dataclass translation and the JSON round trip of bundle configs."""

import ast
from pathlib import Path

import pytest

from engine import config as C
from engine.mini_config import mini_bundle


def test_official_text_and_image_priors():
    text = C.official_bundle("text300M").prior
    image = C.official_bundle("image300M").prior
    assert (text.cond, text.width, text.layers, text.heads, text.latent_ctx) == ("text", 1024, 24, 16, 1024)
    assert text.token_channels == 1024 and text.output_channels == 2048 and text.clip_dim == 768
    assert (image.cond, image.heads, image.clip_dim, image.clip_grid_tokens) == ("image", 8, 1024, 256)


def test_transmitter_translation():
    enc, dec = C.transmitter_from_official(C.OFFICIAL_CONFIG_DIR / "transmitter_config.yaml")
    assert (enc.width, enc.layers, enc.heads, enc.n_points, enc.n_views) == (1024, 12, 8, 16384, 20)
    assert dec.nerstf.d_hidden == 256 and dec.latent_ctx == 1024 and dec.d_latent == 1024 * 1024
    assert dec.background == (0.0, 0.0, 0.0) and dec.n_fine_samples == 128


def test_fixture_configs_translate(fixtures_dir):
    import json

    text = C.prior_from_official(fixtures_dir / "text_denoiser.config.json")
    assert (text.width, text.layers, text.heads, text.latent_ctx, text.token_channels) == (256, 4, 4, 256, 64)
    dec_cfg = json.loads((fixtures_dir / "decoder.config.json").read_text())
    _, dec = C.transmitter_from_official(dec_cfg)
    assert dec.nerstf.d_hidden == 64 and dec.params_proj.d_latent == 64


@pytest.mark.parametrize("mode", ["text", "image"])
def test_bundle_json_round_trip(mode):
    b = mini_bundle(mode)
    assert C.from_dict(C.ModelBundleConfig, C.to_dict(b)) == b


@pytest.mark.parametrize("mode", ["text", "image"])
def test_shipped_manifest_agrees_with_mini_config(mode):
    # the loader takes sizes and sampler defaults from the shipped mini.json; a change to mini_config.py that was
    # not exported into the weights folder would otherwise be silently ignored
    from engine.mini_weights import bundles, read_manifest

    assert bundles(read_manifest())[mode] == mini_bundle(mode)


def test_unknown_field_rejected():
    with pytest.raises(ValueError, match="unknown config field"):
        C.from_dict(C.SamplerConfig, {"stepz": 3})


def test_engine_never_imports_bpy():
    root = Path(C.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "bpy" or n.startswith("bpy.") for n in names), f"{path} imports bpy"
