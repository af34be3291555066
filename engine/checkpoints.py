"""Checkpoint files: safe loading, a safetensors cache, strict loads with readable errors.

* ``load_state_dict``: ``.safetensors`` directly; ``.pt/.pth/.bin/.ckpt`` with ``torch.load(weights_only=True)``
  (no arbitrary pickle code), and TorchScript archives (OpenAI's ``ViT-L-14.pt``) with a restricted reader of the
  archive's pickle that only rebuilds tensors (``torch.load`` refuses TorchScript with weights_only and
  ``torch.jit.load`` would run the archive's code). The first load of a non-safetensors file writes a safetensors
  copy (next to it, else under the weights cache) keyed by the source's size and mtime; later loads use it.
* ``load_strict``: ``load_state_dict(strict=True)`` after a check that turns missing / unexpected keys and shape
  mismatches into one short EngineError.
* The diffusers-format key maps live in ``engine/diffusers_format.py``.

No bpy and no open_clip here.
"""

from __future__ import annotations

import hashlib
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


__all__ = ["load_state_dict", "load_strict", "check_state_dict", "read_torchscript_state_dict"]
