"""Shap-E engine: text or image -> latent -> coloured mesh. Pure Python + torch; never imports bpy.

Public surface (everything else is internal):
    generate(request, *, on_step=None, should_cancel=None) -> list[MeshRecord]
    decode_latent(latent, *, model, grid_size, device="auto") -> MeshRecord
    available_models() -> list[ModelInfo]
    GenerationRequest, StepEvent, MeshRecord, EngineError, GenerationCancelled
Heavy modules (torch) load lazily so that `import engine` stays cheap for the Blender add-on.
"""

from __future__ import annotations

from .records import EngineError, GenerationCancelled, GenerationRequest, MeshRecord, StepEvent

__version__ = "0.1.0"

__all__ = [
    "EngineError", "GenerationCancelled", "GenerationRequest", "MeshRecord", "StepEvent",
    "generate", "decode_latent", "available_models", "__version__",
]


def generate(request, *, on_step=None, should_cancel=None):
    from .pipeline import generate as _generate

    return _generate(request, on_step=on_step, should_cancel=should_cancel)


def decode_latent(latent, *, model="mini", grid_size=64, device="auto"):
    from .pipeline import decode_latent as _decode

    return _decode(latent, model=model, grid_size=grid_size, device=device)


def available_models():
    from .registry import available_models as _available

    return _available()
