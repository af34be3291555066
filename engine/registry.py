"""Named models ('mini', 'text300M', 'image300M'): what they need, whether it is present, and loading them.

A loaded model is the conditioner (CLIP), the latent prior and the implicit decoder of one mode, on one device.
Loaded models are cached per (name, mode, device) so that a warm process (the Blender add-on, the eval loop)
pays the load once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from .config import ModelBundleConfig, official_bundle
from .records import EngineError

# the folder 'mini' is served from (use_mini_weights swaps it); the same default as mini_weights.MINI_DIR, spelt
# out here because importing mini_weights pulls in torch, which listing the models must not need
MINI_DIR = Path(__file__).parent / "weights" / "mini"

OFFICIAL_HINT = ("the embedded 'mini' model only knows simple coloured primitives (cube, sphere, cylinder, cone, "
                 "torus, pyramid, capsule, octahedron in 12 colours); for general objects download the official "
                 "Shap-E weights: python -m engine download text300M (or image300M)")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # 'text' | 'image' | 'both'
    present: bool
    description: str
    missing: tuple[str, ...] = ()


@dataclass
class LoadedModel:
    name: str
    mode: str
    bundle: ModelBundleConfig
    clip: object  # engine.conditioning.clip.ClipConditioner
    prior: object  # engine.models.latent_transformer.LatentPrior
    decoder: object  # engine.models.implicit_decoder.ImplicitDecoder
    weight_bytes: int


_OFFICIAL = {
    "text300M": ("text", "text_cond.pt"),
    "image300M": ("image", "image_cond.pt"),
}
_DECODER_FILES = ("vector_decoder.pt", "transmitter.pt")
_CLIP_FILE = "ViT-L-14.pt"


def clip_weights_path() -> Path:
    """ViT-L/14 weights: SHAP_E_CLIP_WEIGHTS (set by the CLI's --clip-weights) or the weights cache."""
    import os

    from .weights import cache_dir

    override = os.environ.get("SHAP_E_CLIP_WEIGHTS")
    return Path(override) if override else cache_dir() / _CLIP_FILE


def model_names() -> list[str]:
    return ["mini", *_OFFICIAL]


def _official_missing(name: str) -> tuple[str, ...]:
    from .weights import cache_dir

    root = cache_dir()
    missing = []
    if not (root / _OFFICIAL[name][1]).exists():
        missing.append(_OFFICIAL[name][1])
    if not any((root / f).exists() for f in _DECODER_FILES):
        missing.append(" or ".join(_DECODER_FILES))
    if not clip_weights_path().exists():
        missing.append(_CLIP_FILE)
    return tuple(missing)


def available_models() -> list[ModelInfo]:
    infos = [ModelInfo("mini", "both", (MINI_DIR / "mini.json").exists(),
                       "embedded model: simple coloured primitives, works offline on a laptop CPU")]
    for name, (kind, _) in _OFFICIAL.items():
        missing = _official_missing(name)
        infos.append(ModelInfo(name, kind, not missing, f"official Shap-E {kind}-conditional model (300M)",
                               missing))
    return infos


def bundle_for(name: str, mode: str) -> ModelBundleConfig:
    if name == "mini":
        from .mini_config import mini_bundle

        return mini_bundle(mode)
    if name in _OFFICIAL:
        kind = _OFFICIAL[name][0]
        if kind != mode:
            other = "image300M" if mode == "image" else "text300M"
            raise EngineError(f"model {name!r} is {kind}-conditional but the request is {mode}-conditional",
                              f"use --model {other} or --model mini")
        return official_bundle(name)
    raise EngineError(f"unknown model {name!r}", f"choose one of: {', '.join(model_names())}")


_cache: dict[tuple, LoadedModel] = {}
_lock = threading.Lock()


def load(name: str, mode: str, device) -> LoadedModel:
    """Load (or fetch from the cache) the conditioner, prior and decoder of model ``name`` for ``mode``."""
    bundle = bundle_for(name, mode)
    key = (name, mode, str(device))
    with _lock:
        if key not in _cache:
            _cache[key] = _load_mini(bundle, mode, device) if name == "mini" else _load_official(name, bundle,
                                                                                               device)
        return _cache[key]


def clear_cache() -> None:
    """Drop every loaded model (frees RAM / VRAM)."""
    with _lock:
        _cache.clear()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _nbytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())


def use_mini_weights(directory: str | Path) -> None:
    """Serve 'mini' from another exported folder (a training run's export, evaluated before it ships)."""
    global MINI_DIR
    directory = Path(directory)
    if not (directory / "mini.json").exists():
        raise EngineError(f"{directory} is not an exported mini model (no mini.json there)",
                          "pass the folder written by: python -m engine.training reproduce --export-to DIR")
    with _lock:
        MINI_DIR = directory
        _cache.clear()


def _mini_parts(device) -> dict:
    key = ("mini-parts", str(device))
    if key not in _cache:
        if not (MINI_DIR / "mini.json").exists():
            raise EngineError("the embedded model's weights are missing from this installation",
                              "reinstall the extension, or rebuild them: python -m engine.training reproduce")
        from .mini_weights import load_mini

        _cache[key] = load_mini(device=device, directory=MINI_DIR)
    return _cache[key]


def mini_model(parts: dict, mode: str, device) -> LoadedModel:
    """The ``mode`` model of mini parts loaded by ``mini_weights.load_mini`` (any weights folder)."""
    from .conditioning.clip import ClipConditioner

    bundle = parts["configs"][mode]  # the manifest is the truth for the sizes of its weights
    clip = ClipConditioner(bundle.clip, parts["clip"], device=device)
    prior = parts[f"{mode}_prior"]
    return LoadedModel("mini", mode, bundle, clip, prior, parts["decoder"], _nbytes(prior, parts["decoder"]))


def _load_mini(bundle: ModelBundleConfig, mode: str, device) -> LoadedModel:
    return mini_model(_mini_parts(device), mode, device)


def load_transmitter(name: str, device):
    """The encoder + decoder (official transmitter layout) of model ``name``, for mesh -> latent."""
    with _lock:
        if name == "mini":
            return _mini_parts(device)["transmitter"]
        key = ("transmitter", name, str(device))
        if key not in _cache:
            from .checkpoints import load_state_dict, load_strict
            from .config import OFFICIAL_CONFIG_DIR
            from .models.transmitter import Transmitter
            from .weights import cache_dir

            path = cache_dir() / "transmitter.pt"
            if not path.exists():
                raise EngineError(f"encoding with {name!r} needs transmitter.pt in {cache_dir()}",
                                  "run: python -m engine download transmitter   (or use --model mini)")
            model = Transmitter.from_official_config(OFFICIAL_CONFIG_DIR / "transmitter_config.yaml")
            load_strict(model, load_state_dict(path), what="transmitter")
            _cache[key] = model.to(device).eval()
        return _cache[key]


def _load_official(name: str, bundle: ModelBundleConfig, device) -> LoadedModel:
    missing = _official_missing(name)
    if missing:
        from .weights import cache_dir

        raise EngineError(f"model {name!r} is not downloaded (missing: {', '.join(missing)} in {cache_dir()})",
                          f"run: python -m engine download {name}   (or use --model mini)")
    from .checkpoints import load_state_dict, load_strict
    from .conditioning.clip import ClipConditioner
    from .models.implicit_decoder import ImplicitDecoder, transmitter_to_decoder_keys
    from .models.latent_transformer import LatentPrior
    from .weights import cache_dir

    root = cache_dir()
    prior = LatentPrior(bundle.prior)
    load_strict(prior, load_state_dict(root / _OFFICIAL[name][1]), what=name)
    decoder = ImplicitDecoder(bundle.decoder)
    if (root / "vector_decoder.pt").exists():
        load_strict(decoder, load_state_dict(root / "vector_decoder.pt"), what="decoder")
    else:
        decoder_sd, _encoder_sd = transmitter_to_decoder_keys(load_state_dict(root / "transmitter.pt"))
        load_strict(decoder, decoder_sd, what="transmitter (decoder part)")
    clip = ClipConditioner.from_config(bundle.clip, weights=clip_weights_path(), device=device)
    prior.to(device).eval()
    decoder.to(device).eval()
    return LoadedModel(name, bundle.prior.cond, bundle, clip, prior, decoder, _nbytes(prior, decoder))
