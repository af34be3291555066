"""The engine's seams: the request that comes in, the events it emits and the records that come out.

Everything here is plain Python + numpy so that the Blender add-on can use it without importing torch.
Axes and colours: the Shap-E object frame is Blender's world frame (Z up, front -Y, objects inside [-1, 1]^3);
``MeshRecord.vertex_colors`` are *linear* RGB in [0, 1] (what glTF COLOR_0 and Blender FLOAT_COLOR store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


class EngineError(Exception):
    """A user-facing error: ``str(err)`` says what went wrong, ``err.hint`` what to do about it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  -> {self.hint}" if self.hint else msg


class GenerationCancelled(Exception):
    """Raised between network calls when ``should_cancel()`` returned True."""


@dataclass(frozen=True)
class GenerationRequest:
    """One generation job. Exactly one of ``prompt`` / ``image`` is set.

    image: uint8 or float array (H, W, 3|4) in sRGB; RGBA alpha is dropped like the official preprocessing, except
    for models whose CLIP config composites it onto a background (the embedded model: white).
    seed: None means 'draw one'; the drawn seed is reported in ``MeshRecord.seed``.
    """

    prompt: str | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    image_name: str | None = None
    model: str = "mini"
    seed: int | None = None
    steps: int | None = None  # None: the model's default
    guidance_scale: float | None = None  # None: the model's default
    part_weight: float | None = None  # text: composed guidance over the prompt's colour and the rest; None: default
    sampler: Literal["heun", "euler", "dpmpp_2m"] = "heun"
    grid_size: int = 64
    vertex_colors: Literal["auto", "query", "interpolate"] = "auto"  # auto: interpolate from grid 128 up
    batch_size: int = 1
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: Literal["auto", "fp32", "fp16"] = "auto"  # auto: fp16 autocast on CUDA, fp32 on CPU
    preview_every: int = 0  # >0: attach a small preview image of the current x0 estimate every N steps

    @property
    def mode(self) -> Literal["text", "image"]:
        return "image" if self.image is not None else "text"


@dataclass(frozen=True)
class StepEvent:
    """Progress of one sampler step (``step`` counts from 1 to ``total``)."""

    step: int
    total: int
    sigma: float
    elapsed_s: float = 0.0
    stage: Literal["condition", "sample", "decode"] = "sample"
    preview: np.ndarray | None = field(default=None, repr=False, compare=False)  # (H, W, 3) uint8 or None

    @property
    def eta_s(self) -> float | None:
        if self.step <= 0 or self.elapsed_s <= 0:
            return None
        return self.elapsed_s / self.step * (self.total - self.step)


@dataclass
class MeshRecord:
    """A triangle mesh with per-vertex colours, and what made it.

    vertices float32 (V, 3), faces int32 (F, 3) counter-clockwise seen from outside, vertex_colors float32 (V, 3)
    linear RGB in [0, 1]; latent float32 (d_latent,) token-major, or None.
    """

    vertices: np.ndarray
    faces: np.ndarray
    vertex_colors: np.ndarray
    latent: np.ndarray | None = None
    request: GenerationRequest | None = None
    seed: int | None = None
    model: str | None = None
    grid_size: int | None = None
    empty: bool = False  # the field had no zero crossing: no surface (vertices/faces are then empty)

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float32).reshape(-1, 3)
        self.faces = np.ascontiguousarray(self.faces, dtype=np.int32).reshape(-1, 3)
        self.vertex_colors = np.ascontiguousarray(self.vertex_colors, dtype=np.float32).reshape(-1, 3)
        if len(self.vertex_colors) != len(self.vertices):
            raise ValueError("vertex_colors must have one row per vertex")
