"""The README's command-line round trip with the shipped mini model: sample -> decode -> render -> encode -> decode."""

import numpy as np
import pytest
from PIL import Image

from engine.cli import load_latents, main
from engine.geometry.mesh_io import read_mesh
from engine.registry import MINI_DIR

pytestmark = pytest.mark.skipif(not (MINI_DIR / "mini.json").exists(), reason="mini weights not shipped")


def test_sample_decode_render_encode(tmp_path):
    lat = tmp_path / "l.safetensors"
    assert main(["sample", "--prompt", "a red cube", "--seed", "3", "--steps", "4", "--out", str(lat)]) == 0
    latents, meta = load_latents(lat)
    assert latents.shape == (1, 4096) and meta["model"] == "mini" and meta["seeds"] == "3"

    mesh_path = tmp_path / "m.ply"
    assert main(["decode", str(lat), "--grid", "48", "--out", str(mesh_path)]) == 0
    mesh = read_mesh(mesh_path)
    assert len(mesh.faces) > 100 and np.abs(mesh.vertices).max() <= 1.0
    fast = tmp_path / "fast.ply"  # the same grid with colours from the grid corners: same mesh, near colours
    assert main(["decode", str(lat), "--grid", "48", "--vertex-colors", "interpolate", "--out", str(fast)]) == 0
    fast_mesh = read_mesh(fast)
    assert len(fast_mesh.faces) == len(mesh.faces)
    assert np.abs(np.asarray(fast_mesh.vertex_colors, float) - np.asarray(mesh.vertex_colors, float)).mean() < 0.01

    png = tmp_path / "p.png"
    assert main(["render", str(lat), "--size", "16", "--out", str(png)]) == 0
    assert np.asarray(Image.open(png)).shape == (16, 16, 3)

    enc = tmp_path / "e.safetensors"
    assert main(["encode", str(mesh_path), "--out", str(enc)]) == 0
    encoded, _ = load_latents(enc)
    assert encoded.shape == (1, 4096) and np.isfinite(encoded).all() and np.abs(encoded).max() < 1.0
    assert main(["decode", str(enc), "--grid", "32", "--out", str(tmp_path / "e.glb")]) == 0
    assert len(read_mesh(tmp_path / "e.glb").faces) > 0


def test_generate_says_when_seeds_give_the_same_object(tmp_path, capsys):
    """The embedded model answers one object per prompt whatever the seed: two seeds write two equal meshes and
    the CLI says so, with what to change."""
    assert main(["generate", "--prompt", "a red cube", "--batch", "2", "--grid", "32",
                 "--out", str(tmp_path / "m.ply")]) == 0
    out = capsys.readouterr().out
    assert "1 of the 2 results are the same object as another" in out and "Change the prompt" in out
    assert len(list(tmp_path.glob("m*.ply"))) == 2


def test_variety_tells_seed_jitter_from_other_objects():
    from engine import variety

    rng = np.random.default_rng(0)
    z = rng.normal(size=4096).astype(np.float32)
    seed_jitter = z + 0.001 * np.linalg.norm(z) / 64 * rng.normal(size=4096)  # 0.1 % of the norm: one object
    other = z + 0.05 * np.linalg.norm(z) / 64 * rng.normal(size=4096)  # 5 %: another wording of one kind
    assert variety.same_object(z, seed_jitter) and not variety.same_object(z, other)
    assert not variety.same_object(z, z[:100])  # different models' latents
    assert variety.repeats([z, seed_jitter, other]) == 1
    assert variety.repeats([seed_jitter, other], reference=z) == 1  # Variations: the source counts too
    assert variety.repeats([z, None, other]) == 0
