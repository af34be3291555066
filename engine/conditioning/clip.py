"""CLIP conditioning: text embeddings, image embeddings and the image grid (SHAP-E.md §7).

open_clip provides the tokenizer (its ``tokenizer`` module, loaded on its own so that the package's heavy
imports are skipped) and, for training and the parity tests, the ``CLIP`` module (``build_open_clip``). Inference
runs the same network as ``engine.conditioning.clip_model.ClipModel`` (same parameter names; see that module for
the measured reason). Behaviour follows the official ``FrozenImageCLIP``
(OpenAI ``clip`` package, ViT-L/14):

* Text: ``clip.tokenize(prompts, truncate=True)`` - 77 tokens, SOT ... EOT, zero padding; a longer prompt keeps its
  first 77 tokens with the last one replaced by EOT - then ``encode_text`` (EOT pooling, projection), float32,
  L2-normalised.
* Image preprocessing, exactly the official PIL path (``clip._transform``): uint8 PIL image, resize of the shorter
  side to S with PIL's bicubic filter (PIL antialiases when shrinking and premultiplies alpha for RGBA), centre crop
  S x S, ``convert('RGB')`` (alpha dropped, not composited), /255, CLIP mean/std. A model whose
  ``ClipConfig.alpha_background`` is set (the mini model: white) composites pictures with alpha onto it first.
* Image grid: conv1 -> class token -> positional embedding -> ln_pre -> visual transformer, *before* ln_post and
  the projection, class token dropped, channels first: (B, vision_width, grid_tokens).

Weights: an OpenAI-format state dict (the official ``ViT-L-14.pt`` TorchScript file, the fixture ``clip_tiny``, the
mini model's ``clip.safetensors``) or an open_clip one; both use the same key names as open_clip's ``CLIP`` and
``ClipModel``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from ..config import ClipConfig
from ..records import EngineError
from .clip_model import ClipModel, build_clip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI files, not tensors
CLIP_FILE = "ViT-L-14.pt"  # the OpenAI file name (weights registry name 'clip')
NAMED_ARCHS = {"ViT-L-14": "ViT-L-14"}  # our arch name -> open_clip model name (QuickGELU forced separately)


def _open_clip():
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise EngineError("the open_clip package is not installed (needed for CLIP conditioning)",
                          "install open_clip_torch (pip install open_clip_torch), or use the add-on's "
                          "'Install Dependencies' button") from err
    return open_clip


# ----------------------------------------------------------------------------------------------------------------
# Model construction


def build_open_clip(cfg: ClipConfig, *, device: torch.device | str | None = None):
    """An open_clip ``CLIP`` with the architecture of ``cfg`` and random weights (nothing is downloaded).

    'custom': text heads from ``cfg.text_heads``; vision heads = vision_width // 64 (open_clip's head_width 64,
    the same rule OpenAI's ``build_model`` uses). Named archs ('ViT-L-14') come from open_clip's model configs with
    QuickGELU when ``cfg.quick_gelu`` (the OpenAI weights were trained with it). ``device='meta'`` builds without
    allocating, for a later ``load_state_dict(assign=True)``.
    """
    open_clip = _open_clip()
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    ctx = torch.device(device) if device is not None else torch.device("cpu")
    with ctx:
        if cfg.arch == "custom":
            if cfg.vision_width % 64 or cfg.text_width % cfg.text_heads:
                raise EngineError(f"CLIP config has vision width {cfg.vision_width} (must be a multiple of 64) / "
                                  f"text width {cfg.text_width} with {cfg.text_heads} heads",
                                  "fix the ClipConfig")
            vision = CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width, head_width=64,
                                   patch_size=cfg.vision_patch_size, image_size=cfg.image_size)
            text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                               heads=cfg.text_heads, layers=cfg.text_layers)
            return open_clip.CLIP(cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=cfg.quick_gelu)
        if cfg.arch not in NAMED_ARCHS:
            raise EngineError(f"unknown CLIP architecture {cfg.arch!r}",
                              f"use 'custom' or one of: {', '.join(NAMED_ARCHS)}")
        return open_clip.create_model(NAMED_ARCHS[cfg.arch], pretrained=None, force_quick_gelu=cfg.quick_gelu,
                                      device=ctx)


def normalize_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI or open_clip state dict -> open_clip ``CLIP`` keys: drops the OpenAI int entries, a DDP ``module.``
    prefix and causal ``attn_mask`` tensors (a traced model carries them; open_clip rebuilds them); everything else
    already has the same names."""
    out = {}
    for k, v in sd.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if k in OPENAI_EXTRA_KEYS or k.split(".")[-1] == "attn_mask" or not isinstance(v, torch.Tensor):
            continue
        out[k] = v
    return out


def _load_weights(cfg: ClipConfig, sd: Mapping[str, torch.Tensor]) -> ClipModel:
    """Build on the meta device and adopt the loaded tensors (no random init of ~430M parameters, no 2x RAM)."""
    from ..checkpoints import load_strict

    model = build_clip(cfg, device="meta")
    load_strict(model, {k: v.float() for k, v in normalize_state_dict(sd).items()}, what=f"CLIP ({cfg.arch})",
                assign=True)
    return model


def missing_weights_error(path: Path | None = None) -> EngineError:
    from ..weights import REGISTRY, cache_dir

    entry = REGISTRY[CLIP_FILE]
    where = Path(path) if path is not None else cache_dir() / CLIP_FILE
    return EngineError(
        f"the CLIP ViT-L/14 weights file {CLIP_FILE} was not found at {where}",
        f"run 'python -m engine download clip', or download {entry.url} (SHA-256 {entry.sha256}) by hand into "
        f"{cache_dir()} (the weights cache; set SHAP_E_CACHE to move it), or pass an existing copy with "
        f"--clip-weights PATH (or the SHAP_E_CLIP_WEIGHTS environment variable)")


# ----------------------------------------------------------------------------------------------------------------
# Tokens and images


@functools.lru_cache(maxsize=1)
def _tokenizer_module():
    """open_clip's ``tokenizer`` module without running the package ``__init__`` (which imports torchvision and
    transformers, ~4.7 s); the module itself only needs ftfy, regex, numpy and torch. Falls back to the normal
    import when open_clip is already loaded or its layout differs."""
    import importlib.util
    import sys

    if "open_clip" in sys.modules:
        return sys.modules["open_clip"].tokenizer
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return _open_clip().tokenizer  # raises the install hint
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    try:
        mspec = importlib.util.spec_from_file_location("_shap_e_open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        module.SimpleTokenizer  # noqa: B018 - the class this module needs
        return module
    except Exception:  # pragma: no cover - a future open_clip whose tokenizer imports its package
        return _open_clip().tokenizer


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    module = _tokenizer_module()
    shared = getattr(module, "_tokenizer", None)  # the module builds a default one at import (~0.2 s each)
    if isinstance(shared, module.SimpleTokenizer) and getattr(shared, "context_length", None) == context_length:
        return shared
    return module.SimpleTokenizer(context_length=context_length)


def tokenize(prompts: Sequence[str], context_length: int = 77) -> tuple[torch.Tensor, list[bool]]:
    """(tokens (B, context_length) long, truncated flags) - identical to ``clip.tokenize(truncate=True)``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tok = _tokenizer(context_length)
    out = torch.zeros(len(prompts), context_length, dtype=torch.long)
    truncated = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise EngineError(f"prompt {i} is a {type(text).__name__}, not text", "pass strings")
        ids = [tok.sot_token_id, *tok.encode(text), tok.eot_token_id]
        truncated.append(len(ids) > context_length)
        if truncated[-1]:
            ids = ids[:context_length]
            ids[-1] = tok.eot_token_id
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out, truncated


def _to_uint8(image) -> np.ndarray:
    """Array-like (H, W[, 1|3|4]) uint8 or float in [0, 1] -> uint8 (H, W) / (H, W, 3|4)."""
    a = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2], default=0) < 1:
        raise EngineError(f"image array has shape {a.shape}", "give an (H, W, 3) RGB or (H, W, 4) RGBA image")
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number):
        raise EngineError(f"image array has dtype {a.dtype}", "give uint8 or float (0..1) pixels")
    if np.issubdtype(a.dtype, np.integer):  # e.g. 16-bit
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
        return np.round(np.clip(a.astype(np.float64) / top, 0, 1) * 255.0).astype(np.uint8)
    if not np.isfinite(a).all():
        raise EngineError("image array contains NaN or infinite values", "give finite float pixels in 0..1")
    return np.round(np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode in ("RGB", "RGBA", "L"):
            return image
        return image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    return Image.fromarray(_to_uint8(image))


def flatten_alpha(image, background: tuple[float, float, float] | None):
    """The picture as a PIL image, composited onto ``background`` (sRGB in [0, 1]) when it has alpha; None keeps
    the alpha for the official transform to drop."""
    from PIL import Image

    im = _to_pil(image)
    if background is not None and im.mode == "RGBA":
        colour = tuple(int(round(255 * c)) for c in background)
        im = Image.alpha_composite(Image.new("RGBA", im.size, colour + (255,)), im)
    return im


def preprocess_image(image, size: int, alpha_background: tuple[float, float, float] | None = None) -> torch.Tensor:
    """One image -> (3, size, size) float32, the official ``clip._transform(size)`` on a PIL image.

    ``alpha_background``: for a picture with transparency, the sRGB colour to composite it onto first (None: the
    official transform, which drops alpha)."""
    from PIL import Image

    im = flatten_alpha(image, alpha_background)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # torchvision's rule for an int size
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)  # PIL premultiplies RGBA internally
    top = int(round((new_h - size) / 2.0))  # torchvision center_crop (Python round)
    left = int(round((new_w - size) / 2.0))
    im = im.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)  # (3, S, S)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file -> uint8 (H, W, 3) or (H, W, 4) (alpha kept; CLIP preprocessing drops it later).

    EXIF orientation is applied so that the model sees what an image viewer shows.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise EngineError(f"image file {path} does not exist", "check the path")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return np.repeat(_to_uint8(np.asarray(im))[..., None], 3, axis=2)
            has_alpha = "A" in im.getbands() or "transparency" in im.info
            im = im.convert("RGBA" if has_alpha else "RGB")
            arr = np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise EngineError(f"{path} is not a readable image ({type(err).__name__}: {err})",
                          "give a PNG or JPEG file") from err
    if arr.size == 0:
        raise EngineError(f"{path} is an empty image", "give a PNG or JPEG file with pixels")
    return arr


# ----------------------------------------------------------------------------------------------------------------
# The conditioner


class ClipConditioner:
    """A frozen CLIP on one device: ``tokenize``, ``embed_text``, ``preprocess``, ``embed_image``,
    ``embed_image_grid``. ``dtype`` float16 (CUDA only) runs the network in half precision like the official
    sampling on a GPU; outputs are always float32 on ``device``."""

    def __init__(self, cfg: ClipConfig, model, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        device = torch.device(device)
        if dtype == torch.float16 and device.type != "cuda":
            raise EngineError("CLIP in float16 needs a CUDA device", "use float32 on the CPU")
        if not isinstance(model, ClipModel):  # e.g. an open_clip CLIP from training: same keys, same network
            tower = build_clip(cfg)
            tower.load_state_dict(model.state_dict(), strict=True)
            model = tower
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: ClipConfig, weights=None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "ClipConditioner":
        """weights: None (random for 'custom'; the cached ``ViT-L-14.pt`` for named archs), a file path
        (.pt TorchScript/pickle, .safetensors, .bin) or a state dict (OpenAI or open_clip layout)."""
        if weights is None and cfg.arch != "custom":
            from ..weights import cache_dir

            weights = cache_dir() / CLIP_FILE
        if weights is None:
            return cls(cfg, build_clip(cfg), device=device, dtype=dtype)
        if isinstance(weights, (str, Path)):
            path = Path(weights)
            if not path.is_file():
                if cfg.arch != "custom" or path.name == CLIP_FILE:
                    raise missing_weights_error(path)
                raise EngineError(f"CLIP weights file {path} does not exist", "check the path")
            from ..checkpoints import load_state_dict

            weights = load_state_dict(path)
        return cls(cfg, _load_weights(cfg, weights), device=device, dtype=dtype)

    # -- text --------------------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """(tokens (B, 77) long on the CPU, truncated flags)."""
        return tokenize(prompts, self.cfg.context_length)

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, embed_dim) float32, L2-normalised projected EOT features."""
        tokens, _ = self.tokenize(prompts)
        emb = self.model.encode_text(tokens.to(self.device)).float()
        return emb / torch.linalg.norm(emb, dim=-1, keepdim=True)

    # -- images ------------------------------------------------------------------------------------------------

    def preprocess(self, images: Iterable) -> torch.Tensor:
        """Images (uint8 / float 0..1 (H, W, 3|4) arrays or PIL images) -> (B, 3, S, S) float32 on the CPU."""
        if not isinstance(images, (list, tuple)) and not (isinstance(images, (np.ndarray, torch.Tensor))
                                                          and images.ndim == 4):
            images = [images]  # one image
        xs = [preprocess_image(im, self.cfg.image_size, self.cfg.alpha_background) for im in images]
        if not xs:
            raise EngineError("no images to embed", "give at least one image")
        return torch.stack(xs)

    def _pixels(self, images) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3 \
            and images.is_floating_point() else self.preprocess(images)
        return x.to(self.device, self.dtype)

    @torch.no_grad()
    def embed_image(self, images) -> torch.Tensor:
        """(B, embed_dim) float32, L2-normalised. ``images`` may also be preprocessed pixels (B, 3, S, S)."""
        emb = self.model.encode_image(self._pixels(images)).float()
        return emb / torch.linalg.norm(emb, dim=-1, keepdim=True)

    @torch.no_grad()
    def embed_image_grid(self, images) -> torch.Tensor:
        """(B, vision_width, grid_tokens) float32: visual tokens after the transformer, before ln_post, no CLS."""
        x = self.model.visual.tokens(self._pixels(images))  # (B, 1 + g*g, W)
        return x[:, 1:].transpose(1, 2).float().contiguous()  # (B, W, g*g)

    @property
    def grid_tokens(self) -> int:
        return self.cfg.grid_tokens

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"ClipConditioner({self.cfg.arch}, {n / 1e6:.1f}M params, {self.device}, {self.dtype})"


__all__ = ["ClipConditioner", "build_clip", "build_open_clip", "load_image", "normalize_state_dict", "preprocess_image",
           "tokenize", "missing_weights_error", "CLIP_MEAN", "CLIP_STD"]
