"""Checkpoint files: safe loading, a safetensors cache, strict loads with readable errors, diffusers key maps.

* ``load_state_dict``: ``.safetensors`` directly; ``.pt/.pth/.bin/.ckpt`` with ``torch.load(weights_only=True)``
  (no arbitrary pickle code), and TorchScript archives (OpenAI's ``ViT-L-14.pt``) with a restricted reader of the
  archive's pickle that only rebuilds tensors (``torch.load`` refuses TorchScript with weights_only and
  ``torch.jit.load`` would run the archive's code). The first load of a non-safetensors file writes a safetensors
  copy (next to it, else under the weights cache) keyed by the source's size and mtime; later loads use it.
* ``load_strict``: ``load_state_dict(strict=True)`` after a check that turns missing / unexpected keys and shape
  mismatches into one short EngineError.
* ``from_diffusers_prior`` / ``from_diffusers_renderer``: the Hugging Face diffusers ports of Shap-E
  (``openai/shap-e`` and ``openai/shap-e-img2img``: ``prior/`` = PriorTransformer, ``shap_e_renderer/`` =
  ShapERenderer) back to the official keys (SHAP-E.md §9). The only non-rename is attention: diffusers has separate
  ``to_q/to_k/to_v``; the official ``c_qkv`` interleaves q|k|v rows per head (§3.2).

No bpy and no open_clip here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch

from .records import EngineError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CACHE_SUFFIX = ".cache.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_state_dict(path: str | Path, *, cache: bool = True) -> dict[str, torch.Tensor]:
    """File -> {key: CPU tensor}. See the module docstring for the formats and the cache."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"checkpoint file {path} does not exist", "check the path or download the weights")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise EngineError(f"unsupported checkpoint format {path.suffix!r} ({path.name})",
                          "use a .safetensors, .pt, .pth or .bin file")
    if cache:
        cached = _cached_copy(path)
        if cached is not None:
            try:
                return _load_safetensors(cached)
            except EngineError:
                log.warning("ignoring unreadable safetensors cache %s", cached)
    sd = _load_torch_file(path)
    if cache:
        _write_cache(path, sd)
    return sd


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise EngineError(f"{path} is not a readable safetensors file ({err})",
                          "delete it and download / convert it again") from err


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    if _is_torchscript(path):
        return read_torchscript_state_dict(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as err:
        raise EngineError(f"{path} could not be loaded as a plain tensor checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''})",
                          "the file may be incomplete (download it again) or contain pickled code, which is "
                          "never executed") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EngineError(f"{path} does not hold a state dict of tensors", "use an official checkpoint file")
    return dict(obj)


# -- TorchScript archives ----------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_CLASS_RE = re.compile(r"^class (\w+)\(Module\):\s*\n((?:  .*\n)*)", re.M)


class _ScriptObject:
    """Stand-in for a TorchScript class instance: remembers its qualified class name and its attributes."""

    qualname = ""

    def __setstate__(self, state):
        self.state = state


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict()`` of a TorchScript module archive without executing it.

    data.pkl is unpickled with a whitelist (tensor rebuild, storages, OrderedDict; ``__torch__.*`` classes become
    inert records); the parameter / buffer names of each class come from the ``__parameters__`` /
    ``__buffers__`` lines of the archive's code/ files, as torch.jit.load would register them.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise EngineError(f"{path} is not a TorchScript archive", "use the official file")
        root = pkl.split("/")[0]
        classes: dict[str, tuple[list[str], list[str]]] = {}
        for n in names:
            if not (n.startswith(f"{root}/code/") and n.endswith(".py")):
                continue
            module = n[len(f"{root}/code/"):-3].replace("/", ".")
            for cname, body in _CLASS_RE.findall(zf.read(n).decode("utf-8", "replace")):
                lists = {}
                for kind in ("__parameters__", "__buffers__"):
                    m = re.search(rf"^  {kind} = \[(.*)\]", body, re.M)
                    lists[kind] = re.findall(r'"([^"]+)"', m.group(1)) if m else []
                classes[f"{module}.{cname}"] = (lists["__parameters__"], lists["__buffers__"])

        def persistent_load(pid):
            _, dtype, key, _location, numel = pid
            raw = zf.read(f"{root}/data/{key}")
            storage = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if module.startswith("__torch__"):
                    return type(name, (_ScriptObject,), {"qualname": f"{module}.{name}"})
                if module == "torch._utils" and name == "_rebuild_tensor_v2":
                    return torch._utils._rebuild_tensor_v2
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _STORAGE_DTYPES[name]
                if module == "collections" and name == "OrderedDict":
                    return OrderedDict
                raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a TorchScript archive")

            def persistent_load(self, pid):
                return persistent_load(pid)

        try:
            with zf.open(pkl) as fh:
                unpickler = Restricted(fh)
                top = unpickler.load()
        except (pickle.UnpicklingError, ValueError, KeyError, TypeError, EOFError) as err:
            raise EngineError(f"{path} could not be read as a TorchScript weights archive ({err})",
                              "download the file again (it may be incomplete)") from err

    out: dict[str, torch.Tensor] = {}

    def walk(obj, prefix: str) -> None:
        params, buffers = classes.get(obj.qualname, ([], []))
        state = getattr(obj, "state", None) or {}
        for name in params + buffers:
            v = state.get(name)
            if isinstance(v, torch.Tensor):
                out[prefix + name] = v
        for name, v in state.items():
            if isinstance(v, _ScriptObject):
                walk(v, f"{prefix}{name}.")

    if not isinstance(top, _ScriptObject):
        raise EngineError(f"{path} is not a TorchScript module archive", "use the official file")
    walk(top, "")
    if not out:
        raise EngineError(f"no tensors found in the TorchScript archive {path}", "use the official file")
    return out


# -- safetensors cache -------------------------------------------------------------------------------------------


def _stamp(path: Path) -> dict[str, str]:
    st = path.stat()
    return {"source_name": path.name, "source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns)}


def cache_locations(path: Path) -> list[Path]:
    """Where the safetensors copy of ``path`` may live: next to it, then in the weights cache."""
    from .weights import cache_dir

    return [path.with_name(path.name + CACHE_SUFFIX),
            cache_dir() / "converted" / f"{path.stem}-{_path_key(path)}{CACHE_SUFFIX}"]


def _path_key(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]


def _cached_copy(path: Path) -> Path | None:
    from safetensors import safe_open

    stamp = _stamp(path)
    for cand in cache_locations(path):
        if not cand.is_file():
            continue
        try:
            with safe_open(str(cand), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - any unreadable cache file is just stale
            continue
        if all(meta.get(k) == v for k, v in stamp.items()):
            return cand
    return None


def _write_cache(path: Path, sd: Mapping[str, torch.Tensor]) -> Path | None:
    from safetensors.torch import save_file

    seen: set[int] = set()
    flat = {}
    for k, v in sd.items():  # safetensors refuses shared / overlapping storages: copy the repeats
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        flat[k] = v.detach().clone() if ptr in seen and ptr != -1 else v.detach().contiguous()
        seen.add(ptr)
    for target in cache_locations(path):
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            os.close(fd)
            save_file(flat, tmp, metadata=_stamp(path))
            os.replace(tmp, target)
            return target
        except OSError as err:
            log.info("could not write the safetensors cache %s (%s)", target, err)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Strict loading


def _fmt(items: list[str], n: int = 5) -> str:
    more = f", ... (+{len(items) - n})" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_state_dict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    """(missing keys, unexpected keys, 'key: file [..] vs model [..]' shape mismatches)."""
    want = module.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    mismatched = [f"{k}: file {list(sd[k].shape)} vs model {list(want[k].shape)}"
                  for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    return missing, unexpected, mismatched


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str,
                assign: bool = False) -> torch.nn.Module:
    """``module.load_state_dict(state_dict, strict=True)`` or an EngineError summarising what does not fit."""
    missing, unexpected, mismatched = check_state_dict(module, state_dict)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_fmt(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_fmt(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape ({_fmt(mismatched, 3)})")
        raise EngineError(f"the {what} checkpoint does not fit the model: " + "; ".join(parts),
                          f"check that the file is the {what} checkpoint for this model and configuration "
                          f"(a wrong or partially downloaded file gives this error)")
    module.load_state_dict(dict(state_dict), strict=True, assign=assign)
    return module


# ----------------------------------------------------------------------------------------------------------------
# diffusers -> official keys

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


__all__ = ["load_state_dict", "load_strict", "check_state_dict", "read_torchscript_state_dict",
           "from_diffusers_prior", "to_diffusers_prior", "from_diffusers_renderer", "interleave_qkv", "split_qkv",
           "load_diffusers_prior", "load_diffusers_renderer", "read_diffusers_folder"]
