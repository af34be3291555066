"""The Hugging Face diffusers ports of Shap-E mapped back to the official keys (SHAP-E.md §9).

``openai/shap-e`` and ``openai/shap-e-img2img``: ``prior/`` = PriorTransformer, ``shap_e_renderer/`` =
ShapERenderer. The only non-rename is attention: diffusers has separate ``to_q/to_k/to_v``; the official ``c_qkv``
interleaves q|k|v rows per head (§3.2). Users who already have these folders need nothing else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch

from .checkpoints import _fmt, load_state_dict
from .records import EngineError


_PRIOR_RENAMES = {
    "time_embedding.linear_1": "time_embed.c_fc",
    "time_embedding.linear_2": "time_embed.c_proj",
    "proj_in": "input_proj",
    "norm_in": "ln_pre",
    "norm_out": "ln_post",
    "proj_to_clip_embeddings": "output_proj",
}
_BLOCK_RENAMES = {
    "attn1.to_out.0": "attn.c_proj",
    "ff.net.0.proj": "mlp.c_fc",
    "ff.net.2": "mlp.c_proj",
    "norm1": "ln_1",
    "norm3": "ln_2",
}
_PRIOR_IGNORED = ("clip_mean", "clip_std")  # unCLIP leftovers; the Shap-E pipelines never use them


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Separate q, k, v (W, ...) -> official c_qkv (3W, ...): [q_0 k_0 v_0 q_1 k_1 v_1 ...], blocks of W/heads."""
    w = q.shape[0]
    if w % heads or k.shape != q.shape or v.shape != q.shape:
        raise EngineError(f"attention projections of shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} "
                          f"cannot be split into {heads} heads", "pass the diffusers config's num_attention_heads")
    d = w // heads
    return torch.stack([t.reshape(heads, d, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(3 * w, *q.shape[1:])


def split_qkv(c_qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``interleave_qkv``."""
    w = c_qkv.shape[0] // 3
    parts = c_qkv.reshape(heads, 3, w // heads, *c_qkv.shape[1:])
    return tuple(parts[:, i].reshape(w, *c_qkv.shape[1:]) for i in range(3))


def from_diffusers_prior(sd: Mapping[str, torch.Tensor], *, heads: int) -> dict[str, torch.Tensor]:
    """diffusers ``PriorTransformer`` (Shap-E ``prior/``) state dict -> official ``wrapped.*`` keys.

    ``heads``: the ``num_attention_heads`` of the *diffusers* config (16 in both Shap-E repos), i.e. the block
    size W/heads in which diffusers' conversion dealt the official c_qkv rows out to to_q / to_k / to_v, not the
    official head count. Dealing the blocks back is an exact inverse, so the official c_qkv is restored whatever
    the official head count is. This matters for the image model: official image300M has 8 heads of 128, but the
    diffusers conversion split its c_qkv in 64-row blocks for 16 heads of 64, so diffusers' to_q holds
    [q_h[:64], k_h[64:]] of each official head h (to_k [q_h[64:], v_h[:64]], to_v [k_h[:64], v_h[64:]]), and
    diffusers computes a different attention from the official one. Loaded into our model (8 x 128 from the
    official config), the restored c_qkv computes the official function.

    Token order differs (diffusers puts the condition before the time token, the official image model after it);
    with no mask and positional embeddings only on latent tokens this does not change the outputs.
    """
    sd = dict(sd)
    image = "embedding_proj_norm.weight" in sd
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set(k for k in sd if k.split(".")[0] in _PRIOR_IGNORED)

    def take(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"wrapped.{dst}.{p}"] = sd[f"{src}.{p}"]
                used.add(f"{src}.{p}")

    for src, dst in _PRIOR_RENAMES.items():
        take(src, dst)
    if image:
        take("embedding_proj_norm", "clip_embed.0")
        take("embedding_proj", "clip_embed.1")
    else:
        take("embedding_proj", "clip_embed")
    if "positional_embedding" in sd:
        pe = sd["positional_embedding"]
        out["wrapped.pos_emb"] = pe[0] if pe.ndim == 3 else pe  # (1, ctx, W) -> (ctx, W)
        used.add("positional_embedding")

    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in blocks:
        src, dst = f"transformer_blocks.{i}", f"backbone.resblocks.{i}"
        for a, b in _BLOCK_RENAMES.items():
            take(f"{src}.{a}", f"{dst}.{b}")
        for p in ("weight", "bias"):
            names = [f"{src}.attn1.to_{x}.{p}" for x in "qkv"]
            if all(n in sd for n in names):
                out[f"wrapped.{dst}.attn.c_qkv.{p}"] = interleave_qkv(*(sd[n] for n in names), heads=heads)
                used.update(names)
    stray = [k for k in sd if k not in used]
    if stray:
        raise EngineError(f"not a Shap-E diffusers prior: {len(stray)} keys have no official counterpart "
                          f"({_fmt(stray)})", "use the prior/ folder of openai/shap-e or openai/shap-e-img2img")
    return out


def to_diffusers_prior(sd: Mapping[str, torch.Tensor], *, heads: int) -> dict[str, torch.Tensor]:
    """Official ``wrapped.*`` -> diffusers PriorTransformer keys (the conversion ``from_diffusers_prior`` undoes;
    ``heads`` = the diffusers num_attention_heads). Used by the tests and for exporting."""
    image = "wrapped.clip_embed.0.weight" in sd
    rev = {v: k for k, v in _PRIOR_RENAMES.items()}
    rev.update({"clip_embed.0": "embedding_proj_norm", "clip_embed.1": "embedding_proj"} if image
               else {"clip_embed": "embedding_proj"})
    brev = {v: k for k, v in _BLOCK_RENAMES.items()}
    out = {}
    for key, v in sd.items():
        name = key[len("wrapped."):]
        if name == "pos_emb":
            out["positional_embedding"] = v[None]
            continue
        mod, _, p = name.rpartition(".")
        m = re.match(r"backbone\.resblocks\.(\d+)\.(.+)", mod)
        if m and m.group(2) == "attn.c_qkv":
            for x, t in zip("qkv", split_qkv(v, heads)):
                out[f"transformer_blocks.{m.group(1)}.attn1.to_{x}.{p}"] = t
        elif m:
            out[f"transformer_blocks.{m.group(1)}.{brev[m.group(2)]}.{p}"] = v
        else:
            out[f"{rev[mod]}.{p}"] = v
    return out


def from_diffusers_renderer(sd: Mapping[str, torch.Tensor], *,
                            background: tuple[float, float, float] | None = (0.0, 0.0, 0.0)
                            ) -> dict[str, torch.Tensor]:
    """diffusers ``ShapERenderer`` (``shap_e_renderer/``) -> official vector-decoder keys.

    ``params_proj.*`` keep their names, ``mlp.mlp.i`` -> ``renderer.nerstf.mlp.i``, ``void.background`` ->
    ``renderer.void.background``; ``mesh_decoder.*`` (marching-cubes tables) and ``volume.*`` are dropped.
    diffusers' background buffer is its constructor default (white), not a trained value; the official decoder's
    is black (SHAP-E.md §5.3), so ``background`` replaces it unless None.
    """
    out: dict[str, torch.Tensor] = {}
    stray = []
    for k, v in sd.items():
        if k.startswith("params_proj."):
            out[k] = v
        elif k.startswith("mlp.mlp."):
            out["renderer.nerstf.mlp." + k[len("mlp.mlp."):]] = v
        elif k == "void.background":
            out["renderer.void.background"] = v if background is None else torch.tensor(background, dtype=v.dtype)
        elif not k.startswith(("mesh_decoder.", "volume.")):
            stray.append(k)
    if stray or not any(k.startswith("params_proj.") for k in out):
        raise EngineError(f"not a Shap-E diffusers renderer ({_fmt(stray) if stray else 'no params_proj keys'})",
                          "use the shap_e_renderer/ folder of openai/shap-e")
    return out


def read_diffusers_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers model folder (config.json + diffusion_pytorch_model.{safetensors,bin}) -> (state dict, config)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise EngineError(f"{folder} has no config.json", "point at a diffusers model folder (prior/ ...)")
    config = json.loads(cfg_path.read_text())
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return load_state_dict(folder / name), config
    raise EngineError(f"{folder} has no diffusion_pytorch_model.safetensors / .bin", "download the whole folder")


def load_diffusers_prior(folder: str | Path) -> dict[str, torch.Tensor]:
    """diffusers ``prior/`` folder -> official ``wrapped.*`` state dict (heads read from its config.json)."""
    sd, config = read_diffusers_folder(folder)
    return from_diffusers_prior(sd, heads=int(config.get("num_attention_heads", 16)))


def load_diffusers_renderer(folder: str | Path) -> dict[str, torch.Tensor]:
    """diffusers ``shap_e_renderer/`` folder -> official vector-decoder state dict."""
    sd, _ = read_diffusers_folder(folder)
    return from_diffusers_renderer(sd)


__all__ = ["from_diffusers_prior", "to_diffusers_prior", "from_diffusers_renderer", "interleave_qkv", "split_qkv",
           "load_diffusers_prior", "load_diffusers_renderer", "read_diffusers_folder"]
