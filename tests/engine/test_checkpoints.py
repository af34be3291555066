"""Checkpoint loading: weights_only pickles, TorchScript archives, the safetensors cache, strict-load summaries and
the diffusers -> official key maps (numerically checked against diffusers' own modules at small sizes)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from engine import checkpoints
from engine.checkpoints import load_state_dict, load_strict
from engine.diffusers_format import (
    from_diffusers_prior, from_diffusers_renderer, interleave_qkv, split_qkv, to_diffusers_prior,
)
from engine.config import DecoderConfig, NeRSTFConfig, ParamsProjConfig, PriorConfig
from engine.records import EngineError
from tests.refdata import FIXTURES, load_manifest


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAP_E_CACHE", str(tmp_path / "cache"))


def small_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g),
            "b": torch.randn(2, 2, generator=g).half()}


# ----------------------------------------------------------------------------------------------------------------
# loading + cache


def test_safetensors_roundtrip(tmp_path):
    from safetensors.torch import save_file

    sd = small_sd()
    save_file(sd, str(tmp_path / "w.safetensors"))
    out = load_state_dict(tmp_path / "w.safetensors")
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


def test_pt_cache_created_and_reused(tmp_path, monkeypatch):
    sd = small_sd()
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    out = load_state_dict(path)
    assert all(torch.equal(out[k], sd[k]) and out[k].dtype == sd[k].dtype for k in sd)
    cache = tmp_path / "w.pt.cache.safetensors"
    assert cache.is_file()

    def no_torch_load(p):
        raise AssertionError("the .pt was read again instead of the cache")

    monkeypatch.setattr(checkpoints, "_load_torch_file", no_torch_load)
    again = load_state_dict(path)
    assert all(torch.equal(again[k], sd[k]) for k in sd)

    # A changed source (size / mtime) invalidates the cache.
    monkeypatch.undo()
    monkeypatch.setenv("SHAP_E_CACHE", str(tmp_path / "cache"))
    sd2 = {k: v + 1 for k, v in sd.items()}
    torch.save(sd2, path)
    os.utime(path, ns=(1, 1))
    fresh = load_state_dict(path)
    assert all(torch.equal(fresh[k], sd2[k]) for k in sd)


def test_cache_falls_back_to_cache_dir_when_folder_is_read_only(tmp_path, monkeypatch):
    sd = small_sd()
    src = tmp_path / "ro"
    src.mkdir()
    torch.save(sd, src / "w.pt")
    real = checkpoints.cache_locations

    def unwritable_first(path):
        first, second = real(path)
        return [first.parent / "nope" / first.name, second]  # below a *file*: cannot be created

    (src / "nope").write_text("a file, not a folder")
    monkeypatch.setattr(checkpoints, "cache_locations", unwritable_first)
    load_state_dict(src / "w.pt")
    second = real(src / "w.pt")[1]
    assert second.is_file() and second.parent == tmp_path / "cache" / "converted"


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": Boom()}, path)
    with pytest.raises(EngineError, match="plain tensor checkpoint") as err:
        load_state_dict(path)
    assert "never executed" in err.value.hint
    assert not (tmp_path / "evil.pt.cache.safetensors").exists()


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(EngineError, match="unsupported checkpoint format"):
        load_state_dict(tmp_path / "w.txt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(EngineError, match="could not be loaded"):
        load_state_dict(tmp_path / "cut.pt")


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.register_buffer("scale", torch.tensor([2.0]))
        self.plain = torch.ones(4)  # a constant in the archive, not part of the state dict

    def forward(self, x):
        return self.lin(x) * self.scale + self.plain


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Inner(), _Inner()])
        self.emb = nn.Parameter(torch.randn(3).half())

    def forward(self, x):
        for b in self.blocks:
            x = b(x)[..., :3]
        return x + self.emb.float()


def test_torchscript_archive_read_without_executing(tmp_path):
    traced = torch.jit.trace(_Outer(), torch.ones(1, 3), check_trace=False)
    path = tmp_path / "model.pt"
    traced.save(str(path))
    want = torch.jit.load(str(path), map_location="cpu").state_dict()  # reference only (our own file)
    got = load_state_dict(path, cache=False)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


def test_openai_style_torchscript_clip_loads_into_conditioner(tmp_path):
    """The real ViT-L-14.pt is a traced OpenAI CLIP; a traced tiny CLIP goes the same path end to end."""
    pytest.importorskip("open_clip")
    from engine.conditioning.clip import ClipConditioner, build_open_clip
    from tests.engine.test_clip import tiny_config

    cfg = tiny_config()
    ref = ClipConditioner.from_config(cfg, weights=FIXTURES / "clip_tiny.safetensors")

    class TextOnly(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, t):
            return self.m.encode_text(t)

    model = build_open_clip(cfg)
    model.load_state_dict(ref.model.state_dict())
    traced = torch.jit.trace(TextOnly(model), torch.zeros(1, 77, dtype=torch.long), check_trace=False)
    path = tmp_path / "clip.pt"
    traced.save(str(path))
    sd = {k[len("m."):]: v for k, v in load_state_dict(path).items()}
    loaded = ClipConditioner.from_config(cfg, weights=sd)
    assert torch.equal(loaded.embed_text(["a red chair"]), ref.embed_text(["a red chair"]))


# ----------------------------------------------------------------------------------------------------------------
# strict loading


def test_strict_load_summary():
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    load_strict(m, sd, what="toy")  # fits
    bad = dict(sd)
    del bad["1.bias"]
    bad["0.weight"] = torch.zeros(3, 5)
    bad.update({f"extra.{i}": torch.zeros(1) for i in range(7)})
    with pytest.raises(EngineError) as err:
        load_strict(m, bad, what="toy")
    msg = str(err.value)
    assert "1 missing (1.bias)" in msg
    assert "7 unexpected (extra.0, extra.1, extra.2, extra.3, extra.4, ... (+2))" in msg
    assert "1 with another shape (0.weight: file [3, 5] vs model [3, 4])" in msg
    assert len(msg) < 600
    assert torch.equal(m[0].weight, sd["0.weight"])  # nothing was half-loaded


# ----------------------------------------------------------------------------------------------------------------
# diffusers maps

diffusers = pytest.importorskip("diffusers")


def _randomize(module: nn.Module, seed: int, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _diffusers_prior(cfg: PriorConfig, heads: int):
    from diffusers import PriorTransformer

    image = cfg.cond == "image"
    model = PriorTransformer(
        num_attention_heads=heads, attention_head_dim=cfg.width // heads, num_layers=cfg.layers,
        embedding_dim=cfg.token_channels, num_embeddings=cfg.latent_ctx, additional_embeddings=0,
        time_embed_act_fn="gelu", norm_in_type="layer", embedding_proj_norm_type="layer" if image else None,
        encoder_hid_proj_type=None, added_emb_type=None, time_embed_dim=4 * cfg.width,
        embedding_proj_dim=cfg.clip_dim, clip_embed_dim=cfg.output_channels)
    _randomize(model, 1)
    return model.eval()


def _compare_prior(cfg: PriorConfig, heads: int) -> None:
    from engine.models.latent_transformer import LatentPrior

    dm = _diffusers_prior(cfg, heads)
    ours = LatentPrior(cfg)
    load_strict(ours, from_diffusers_prior(dm.state_dict(), heads=heads), what="diffusers prior")
    g = torch.Generator().manual_seed(2)
    b, ctx, c = 2, cfg.latent_ctx, cfg.token_channels
    x = torch.randn(b, ctx * c, generator=g)
    t = torch.tensor([3, 700])
    if cfg.cond == "text":
        cond = torch.nn.functional.normalize(torch.randn(b, cfg.clip_dim, generator=g), dim=-1)
        proj = cond * math.sqrt(cfg.clip_dim)  # diffusers' pipeline scales before the prior; ours inside
    else:
        cond = torch.randn(b, cfg.clip_dim, cfg.clip_grid_tokens, generator=g)
        proj = cond.transpose(1, 2)  # diffusers takes grid tokens token-major
    with torch.no_grad():
        want = dm(x.view(b, ctx, c), t, proj_embedding=proj).predicted_image_embedding  # (B, ctx, 2C)
        got = ours(x, t, cond)
    want_flat = torch.cat([want[..., :c].reshape(b, -1), want[..., c:].reshape(b, -1)], dim=1)
    assert want_flat.abs().max() > 0.1
    torch.testing.assert_close(got, want_flat, atol=2e-5, rtol=1e-4)


def test_diffusers_text_prior_numeric():
    _compare_prior(PriorConfig(cond="text", width=128, layers=2, heads=2, latent_ctx=16, d_latent=16 * 8,
                               clip_dim=24), heads=2)


def test_diffusers_image_prior_numeric_same_heads():
    _compare_prior(PriorConfig(cond="image", width=128, layers=2, heads=2, latent_ctx=16, d_latent=16 * 8,
                               clip_dim=32, clip_grid_tokens=9), heads=2)


def _official_rule_split(c_qkv: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """diffusers' conversion script: c_qkv rows in blocks of ``chunk``, dealt round-robin to q, k, v."""
    blocks = c_qkv.split(chunk, dim=0)
    return [torch.cat(blocks[i::3]) for i in range(3)]


def test_image_prior_8x128_roundtrip_through_16x64_conversion():
    """Official image300M: 8 heads of 128; diffusers converted it in 64-row blocks (16 heads). Undoing it with the
    diffusers head count restores the official c_qkv exactly, and to_q then mixes q and k halves of each head."""
    w, official_heads, diffusers_heads = 1024, 8, 16
    g = torch.Generator().manual_seed(3)
    c_qkv = torch.randn(3 * w, 4, generator=g)
    q, k, v = _official_rule_split(c_qkv, w // diffusers_heads)
    assert torch.equal(interleave_qkv(q, k, v, heads=diffusers_heads), c_qkv)
    d = w // official_heads
    head0 = c_qkv[:3 * d]
    assert torch.equal(q[:d], torch.cat([head0[:d // 2], head0[d + d // 2:2 * d]]))  # [q_0[:64], k_0[64:]]
    # The same rule with matching head sizes is the per-head split.
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(c_qkv, 16), _official_rule_split(c_qkv, 64)))


def test_prior_map_covers_full_size_manifests():
    """On the meta device at full size: diffusers keys -> exactly the official text300M / image300M manifests."""
    from diffusers import PriorTransformer

    for name, image, clip_dim in (("text300M", False, 768), ("image300M", True, 1024)):
        with torch.device("meta"):
            dm = PriorTransformer(num_attention_heads=16, attention_head_dim=64, num_layers=24, embedding_dim=1024,
                                  num_embeddings=1024, additional_embeddings=0, time_embed_act_fn="gelu",
                                  norm_in_type="layer", embedding_proj_norm_type="layer" if image else None,
                                  encoder_hid_proj_type=None, added_emb_type=None, time_embed_dim=4096,
                                  embedding_proj_dim=clip_dim, clip_embed_dim=2048)
        mapped = from_diffusers_prior(dm.state_dict(), heads=16)
        manifest = load_manifest(name)["state_dict"]
        assert {k: list(v.shape) for k, v in mapped.items()} == {k: v["shape"] for k, v in manifest.items()}
        back = to_diffusers_prior(mapped, heads=16)
        assert set(back) == set(dm.state_dict()) - {"clip_mean", "clip_std"}


def test_non_shap_e_prior_refused():
    with pytest.raises(EngineError, match="no official counterpart"):
        from_diffusers_prior({"prd_embedding": torch.zeros(1, 1, 8)}, heads=1)


def test_diffusers_renderer_numeric():
    from diffusers.pipelines.shap_e.renderer import ShapERenderer

    from engine.models.implicit_decoder import ImplicitDecoder

    h, c = 32, 8
    dr = ShapERenderer(param_shapes=((h, 93), (h, h), (h, h), (h, h)), d_latent=c, d_hidden=h)
    _randomize(dr, 4, std=0.3)
    cfg = DecoderConfig(nerstf=NeRSTFConfig(d_hidden=h), params_proj=ParamsProjConfig(d_latent=c))
    ours = ImplicitDecoder(cfg)
    mapped = from_diffusers_renderer(dr.state_dict())
    assert torch.equal(mapped["renderer.void.background"], torch.zeros(3))
    assert torch.equal(from_diffusers_renderer(dr.state_dict(), background=None)["renderer.void.background"],
                       dr.void.background)
    load_strict(ours, mapped, what="diffusers renderer")

    g = torch.Generator().manual_seed(5)
    latent = torch.randn(1, cfg.d_latent, generator=g)
    points = torch.rand(1, 200, 3, generator=g) * 2 - 1
    with torch.no_grad():
        projected = dr.params_proj(latent.view(1, cfg.latent_ctx, c))
        for name, param in dr.mlp.state_dict().items():
            if f"nerstf.{name}" in projected:
                param.copy_(projected[f"nerstf.{name}"][0])
        want = dr.mlp(position=points, direction=None, ts=None, nerf_level="fine", rendering_mode="stf")
        got = ours(latent, points, outputs=("sdf", "stf_rgb", "density_fine"))
    assert want.signed_distance.std() > 1e-3
    torch.testing.assert_close(got["sdf"], want.signed_distance[..., 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["stf_rgb"], want.channels, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["density_fine"], want.density[..., 0], atol=1e-5, rtol=1e-4)


def test_renderer_map_matches_vector_decoder_manifest():
    from diffusers.pipelines.shap_e.renderer import ShapERenderer

    with torch.device("meta"):
        dr = ShapERenderer()
    mapped = from_diffusers_renderer({k: v for k, v in dr.state_dict().items()}, background=None)
    manifest = load_manifest("vector_decoder")["state_dict"]
    assert {k: list(v.shape) for k, v in mapped.items()} == {k: v["shape"] for k, v in manifest.items()}
