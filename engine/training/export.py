"""Export a finished mini training run into the shipped weight folder (engine/weights/mini).

Files (fp16 safetensors, the official key layouts): ``clip.safetensors`` (open_clip/OpenAI CLIP keys),
``transmitter.safetensors`` (official transmitter keys: ``encoder.*`` incl. ``encoder.params_proj.*``,
``renderer.*``), ``text_prior.safetensors`` and ``image_prior.safetensors`` (``wrapped.*``), plus ``mini.json``:
the model configs (``engine.config.to_dict`` of the two ``ModelBundleConfig``), the SHA-256 and size of every file
(``engine.mini_weights.load_mini`` refuses files that do not match) and the training record (steps, seconds,
device, metrics). Everything is written to temporary files in the target folder first, then moved into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from engine.config import to_dict
from engine.mini_config import mini_bundle
from engine.records import EngineError

MAX_TOTAL_BYTES = 25 * 1000 * 1000
# shipped file name -> (stage folder in the run, file written by that stage)
SOURCES = {
    "clip.safetensors": ("clip", "clip.safetensors"),
    "transmitter.safetensors": ("transmitter", "transmitter.safetensors"),
    "text_prior.safetensors": ("text_prior", "prior.safetensors"),
    "image_prior.safetensors": ("image_prior", "prior.safetensors"),
}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_fp16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def export_mini(run_dir: str | Path, out_dir: str | Path, *, training: dict | None = None,
                bundles: dict | None = None) -> dict:
    """Convert the run's stage outputs to fp16 files in ``out_dir`` and write mini.json; returns its content."""
    from safetensors.torch import load_file, save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    missing = [str(run_dir / a / b) for a, b in SOURCES.values() if not (run_dir / a / b).exists()]
    if missing:
        raise EngineError(f"cannot export: missing stage outputs {missing}", "run all training stages first")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_paths, files = {}, {}
    try:
        for name, (stage, fname) in SOURCES.items():
            tmp = out_dir / f".{name}.tmp"
            save_file(to_fp16(load_file(str(run_dir / stage / fname))), str(tmp), metadata={"format": "pt"})
            tmp_paths[name] = tmp
            files[name] = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
        total = sum(f["bytes"] for f in files.values())
        if total > MAX_TOTAL_BYTES:
            raise EngineError(f"exported weights are {total / 1e6:.1f} MB, over the {MAX_TOTAL_BYTES / 1e6:.0f} MB "
                              "budget", "reduce the sizes in engine/mini_config.py")
        bundles = bundles or {m: mini_bundle(m) for m in ("text", "image")}
        meta = {"format": 1, "name": "mini", "dtype": "float16",
                "configs": {m: to_dict(b) for m, b in bundles.items()}, "files": files,
                "total_bytes": total, "training": training or {}}
        jtmp = out_dir / ".mini.json.tmp"
        jtmp.write_text(json.dumps(meta, indent=2, default=str))
        for name, tmp in tmp_paths.items():
            os.chmod(tmp, 0o644)
            os.replace(tmp, out_dir / name)
        os.replace(jtmp, out_dir / "mini.json")
        return meta
    finally:
        for tmp in list(tmp_paths.values()) + [out_dir / ".mini.json.tmp"]:
            if tmp.exists():
                tmp.unlink()
