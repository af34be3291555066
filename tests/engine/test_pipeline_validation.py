"""Bad requests are refused before any model loads, with a message and a hint; the CLI exits 2 and writes nothing."""

import numpy as np
import pytest

from engine import EngineError, GenerationRequest
from engine.cli import main
from engine.pipeline import validate


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt=None), "prompt is empty"),
    (dict(prompt="a cube", steps=0), "steps must be"),
    (dict(prompt="a cube", guidance_scale=-1.0), "guidance scale must be >= 0"),
    (dict(prompt="a cube", guidance_scale=float("nan")), "guidance scale"),
    (dict(prompt="a cube", grid_size=100), "grid size 100"),
    (dict(prompt="a cube", batch_size=0), "batch size"),
    (dict(prompt="a cube", model="nope"), "unknown model"),
    (dict(prompt="a cube", sampler="ddim"), "unknown sampler"),
    (dict(prompt="a cube", vertex_colors="fast"), "vertex colour mode"),
    (dict(image=np.zeros((4, 4, 3), np.uint8)), "at least 8x8"),
    (dict(image=np.zeros((32, 32), np.uint8)), r"\(H, W, 3\|4\)"),
    (dict(prompt="x", image=np.zeros((32, 32, 3), np.uint8)), "not both"),
])
def test_bad_requests(kwargs, match):
    with pytest.raises(EngineError, match=match) as info:
        validate(GenerationRequest(**kwargs))
    assert info.value.hint  # every refusal says what to do


def test_good_request_is_normalised():
    req = validate(GenerationRequest(prompt="  a red cube  "))
    assert req.prompt == "a red cube"


def test_cli_refuses_without_partial_files(tmp_path, capsys):
    out = tmp_path / "x.glb"
    assert main(["generate", "--prompt", "", "--out", str(out)]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a cube", "--out", str(tmp_path / "x.stl")]) == 2
    assert "unsupported output file type" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a cube", "--out", str(tmp_path / "missing" / "x.ply")]) == 2
    assert main(["generate", "--prompt", "a cube", "--guidance", "-2", "--out", str(out)]) == 2
    assert main(["decode", str(tmp_path / "nope.safetensors"), "--out", str(out)]) == 2
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    assert main(["decode", str(bogus), "--out", str(out)]) == 2
    assert "not a readable latent file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus.safetensors"]
