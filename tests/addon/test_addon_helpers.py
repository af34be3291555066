"""Pure helpers of the add-on: image conversion, variant layout, latent text codec, pip commands."""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shap_e_blender import deps, imaging, latent_codec, layout, variety  # noqa: E402


def test_pixels_flip_rows_and_keep_srgb_bytes():
    h, w = 2, 3
    rgba = np.zeros((h, w, 4), np.float32)  # Blender order: row 0 is the BOTTOM row
    rgba[0, :, 0] = 1.0  # bottom row red
    rgba[1, :, 2] = 0.5  # top row half blue
    rgba[..., 3] = 1.0
    out = imaging.pixels_to_srgb_uint8(rgba.reshape(-1), w, h, 4, linear=False)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 0, 128, 255]  # top-down: first row is Blender's top row
    assert out[1, 0].tolist() == [255, 0, 0, 255]


def test_linear_buffers_are_srgb_encoded():
    lin = np.array([0.0, 0.0031308, 0.214, 1.0], np.float32)
    enc = imaging.linear_to_srgb(lin)
    assert enc[0] == 0.0 and enc[-1] == pytest.approx(1.0)
    assert enc[2] == pytest.approx(0.5, abs=2e-3)  # linear 0.214 is sRGB mid-grey
    assert np.allclose(imaging.srgb_to_linear(enc), lin, atol=1e-6)
    px = np.tile(np.array([0.214, 0.214, 0.214, 1.0], np.float32), 4)
    out = imaging.pixels_to_srgb_uint8(px, 2, 2, 4, linear=True)
    assert np.all(np.abs(out[..., :3].astype(int) - 127.5) < 1) and np.all(out[..., 3] == 255)


def test_premultiplied_float_buffers_come_out_with_straight_alpha():
    # Blender's float buffers hold colour x alpha (a float image with pixels (0.5, 0, 0, 0.5) saves as PNG
    # (255, 0, 0, 128)); the engine composites straight alpha, as PNG stores it.
    px = np.array([0.5, 0.0, 0.0, 0.5, 0.107, 0.107, 0.107, 0.5, 0.3, 0.2, 0.1, 0.0, 0.2, 0.2, 0.2, 1.0], np.float32)
    out = imaging.pixels_to_srgb_uint8(px, 2, 2, 4, linear=False, premultiplied=True)
    assert out[1, 0].tolist() == [255, 0, 0, 128]  # Blender's bottom row comes last
    assert out[0, 0].tolist() == [0, 0, 0, 0]  # fully transparent: no colour to recover
    assert out[0, 1].tolist() == [51, 51, 51, 255]  # opaque: unchanged
    lin = imaging.pixels_to_srgb_uint8(px, 2, 2, 4, linear=True, premultiplied=True)
    assert abs(int(lin[1, 1, 0]) - 128) <= 1 and lin[1, 1, 3] == 128  # unpremultiplied (0.214) before encoding
    assert imaging.pixels_to_srgb_uint8(px, 2, 2, 4, linear=False)[1, 0].tolist() == [128, 0, 0, 128]  # straight


def test_pixel_buffer_size_is_checked():
    with pytest.raises(ValueError):
        imaging.pixels_to_srgb_uint8(np.zeros(10), 2, 2, 4, linear=False)


def test_preview_roundtrip_to_blender_order():
    img = np.zeros((2, 2, 3), np.uint8)
    img[0, 0] = (255, 0, 0)  # top-left red
    flat = imaging.preview_to_rgba_float(img).reshape(2, 2, 4)
    assert flat[1, 0].tolist() == [1.0, 0.0, 0.0, 1.0]  # Blender's last row is the top


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 9, 16])
def test_grid_is_centred_without_overlaps(count):
    offs = np.array(layout.grid_offsets(count, spacing=2.0))
    assert offs.shape == (count, 3)
    assert np.allclose(offs.mean(0)[2], 0.0)
    if count == 1:
        assert offs.tolist() == [[0.0, 0.0, 0.0]]
    d = np.linalg.norm(offs[:, None] - offs[None], axis=-1) + np.eye(count) * 9
    assert d.min() >= 2.0 - 1e-9
    span = offs.max(0) - offs.min(0)
    assert abs(span[0] - span[1]) <= 2.0 + 1e-9  # near-square


def test_beside_offsets_run_to_the_right():
    assert layout.beside_offsets(3, 2.0) == [(2.0, 0.0, 0.0), (4.0, 0.0, 0.0), (6.0, 0.0, 0.0)]


def test_latent_codec_roundtrip_is_exact_and_is_safetensors():
    rng = np.random.default_rng(0)
    lat = rng.standard_normal(4096).astype(np.float32)
    text = latent_codec.encode(lat, {"model": "mini", "seed": 7})
    assert max(len(line) for line in text.splitlines()[1:]) <= 76  # readable in the Text Editor
    back, meta = latent_codec.decode(text)
    assert back.dtype == np.float32 and np.array_equal(back, lat) and meta == {"model": "mini", "seed": "7"}
    import base64

    blob = base64.b64decode("".join(text.splitlines()[1:]))
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    assert header["latent"] == {"dtype": "F32", "shape": [4096], "data_offsets": [0, 4096 * 4]}
    st = pytest.importorskip("safetensors.numpy")
    assert np.array_equal(st.load(blob)["latent"], lat)


def test_latent_codec_rejects_damage():
    text = latent_codec.encode(np.ones(16, np.float32))
    with pytest.raises(ValueError):
        latent_codec.decode("hello")
    with pytest.raises(ValueError):
        latent_codec.decode(text[: len(text) // 2])


def test_install_commands_pick_the_torch_index_for_the_gpu():
    cuda = deps.install_commands("/bl/python", "/user/site", "cuda")
    assert len(cuda) == 2
    torch_cmd, rest = cuda
    assert torch_cmd[:3] == ["/bl/python", "-m", "pip"] and "--target" in torch_cmd
    assert torch_cmd[torch_cmd.index("--target") + 1] == "/user/site"
    assert torch_cmd[torch_cmd.index("--index-url") + 1].endswith("/cu124")
    assert any(r.startswith("torch") for r in torch_cmd) and not any(r.startswith("open_clip") for r in torch_cmd)
    assert "open_clip_torch==3.3.0" in rest and "--index-url" not in rest
    cpu = deps.install_commands("/bl/python", "/user/site", "cpu")[0]
    assert cpu[cpu.index("--index-url") + 1].endswith("/cpu")
    assert "--index-url" not in deps.install_commands("py", "t", "mps")[0]


def test_install_commands_only_missing_and_bootstrap_pip():
    missing = [deps.DepStatus("skimage", "scikit-image>=0.22", False)]
    cmds = deps.install_commands("py", "t", "cuda", missing, has_pip=False)
    assert cmds[0][:3] == ["py", "-m", "ensurepip"]
    assert len(cmds) == 2 and cmds[1][-1] == "scikit-image>=0.22"


def test_install_env_puts_target_first_on_pythonpath():
    env = deps.install_env("/user/site", {"PYTHONPATH": "/other"})
    assert env["PYTHONPATH"].split(":")[0] == "/user/site" and "/other" in env["PYTHONPATH"]


def test_detect_gpu():
    ok = type("R", (), {"returncode": 0, "stdout": "NVIDIA RTX 3060, 550.54"})()
    assert deps.detect_gpu(run=lambda *a, **k: ok, which=lambda n: "/usr/bin/nvidia-smi", platform="linux") == "cuda"
    assert deps.detect_gpu(run=None, which=lambda n: None, platform="linux") == "cpu"
    assert deps.detect_gpu(platform="darwin") == "mps"


def test_status_uses_find_spec_without_importing():
    before = set(sys.modules)
    st = {d.module: d.present for d in deps.status()}
    assert st["yaml"] in (True, False) and "torch" in st
    assert "torch" in sys.modules or "torch" not in (set(sys.modules) - before)


def test_guidance_tooltip_quotes_the_engine_defaults():
    """The panel's guidance tooltip spells out the defaults (the add-on's property module imports no engine code):
    they must be the ones the engine uses."""
    import re

    from engine.config import official_bundle
    from engine.mini_config import MINI_GUIDANCE

    src = (Path(__file__).resolve().parents[2] / "shap_e_blender" / "properties.py").read_text()
    m = re.search(r"official: ([\d.]+) text, ([\d.]+) image; embedded: ([\d.]+) text, ([\d.]+) image", src)
    assert m, "the guidance tooltip no longer names the defaults"
    quoted = [float(x) for x in m.groups()]
    assert quoted == [official_bundle("text300M").sampler.guidance_scale,
                      official_bundle("image300M").sampler.guidance_scale, MINI_GUIDANCE["text"], MINI_GUIDANCE["image"]]


def test_variety_message_says_what_repeated_and_what_to_do():
    assert variety.message(2, 0, variations=False, hint="h") == "Added 2 object(s)"
    msg = variety.message(2, 2, variations=True, hint="change the prompt")
    assert msg == "Added 2 object(s); 2 of them are the same object as the selected object or another new one: " \
                  "change the prompt"
    assert "as another new one" in variety.message(3, 1, variations=False, hint="h")
