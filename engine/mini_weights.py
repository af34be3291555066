"""Load the shipped embedded "mini" model (engine/weights/mini, written by ``engine.training.export``).

Every file's SHA-256 is checked against ``mini.json`` BEFORE it is read: a corrupted or swapped file is an
EngineError, never a silently wrong model. Weights are stored in fp16 and loaded as fp32 modules (the pipeline
chooses autocast on CUDA).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelBundleConfig, from_dict
from .records import EngineError

MINI_DIR = Path(__file__).parent / "weights" / "mini"
FILES = ("clip.safetensors", "transmitter.safetensors", "text_prior.safetensors", "image_prior.safetensors")


def read_manifest(directory: str | Path = MINI_DIR) -> dict:
    path = Path(directory) / "mini.json"
    if not path.exists():
        raise EngineError(f"the embedded mini model is missing ({path} not found)",
                          "reinstall the extension, or rebuild it with `python -m engine.training reproduce`")
    return json.loads(path.read_text())


def verify(directory: str | Path = MINI_DIR, manifest: dict | None = None) -> dict:
    """Check presence and SHA-256 of every file; returns the manifest."""
    from .training.export import sha256_file

    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    for name in FILES:
        entry = manifest.get("files", {}).get(name)
        path = directory / name
        if entry is None or not path.exists():
            raise EngineError(f"mini model file {name} is missing", "reinstall the extension")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise EngineError(f"mini model file {name} is corrupted (SHA-256 {digest[:12]}... does not match the "
                              f"recorded {entry['sha256'][:12]}...)", "reinstall the extension")
    return manifest


def bundles(manifest: dict) -> dict[str, ModelBundleConfig]:
    return {m: from_dict(ModelBundleConfig, c) for m, c in manifest["configs"].items()}


def _state(directory: Path, name: str, device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(directory / name), device=str(device)).items()}


def _build_clip(cfg):
    from .conditioning.clip_model import build_clip

    return build_clip(cfg)


def load_mini(device: torch.device | str = "cpu", directory: str | Path = MINI_DIR) -> dict:
    """Verified mini model: {'clip': ClipModel, 'transmitter': Transmitter, 'decoder': ImplicitDecoder,
    'text_prior': LatentPrior, 'image_prior': LatentPrior, 'configs': {'text'|'image': ModelBundleConfig},
    'manifest': dict}; all modules in eval mode on ``device``."""
    from .models.latent_transformer import LatentPrior
    from .models.transmitter import Transmitter

    directory = Path(directory)
    manifest = verify(directory)
    cfgs = bundles(manifest)
    text, image = cfgs["text"], cfgs["image"]
    dev = torch.device(device)
    clip = _build_clip(text.clip)
    clip.load_state_dict(_state(directory, "clip.safetensors", "cpu"))
    transmitter = Transmitter(text.encoder, text.decoder)
    transmitter.load_state_dict(_state(directory, "transmitter.safetensors", "cpu"))
    priors = {}
    for mode, cfg in (("text", text), ("image", image)):
        prior = LatentPrior(cfg.prior)  # small: a plain build costs ~20 ms (meta + to_empty imports sympy, ~1 s)
        prior.load_state_dict(_state(directory, f"{mode}_prior.safetensors", "cpu"))
        priors[mode] = prior
    mods = {"clip": clip, "transmitter": transmitter, "text_prior": priors["text"], "image_prior": priors["image"]}
    for m in mods.values():
        m.to(dev).eval()
    return {**mods, "decoder": transmitter.decoder, "configs": cfgs, "manifest": manifest}
