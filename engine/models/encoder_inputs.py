"""Tensor contract of the transmitter encoder and the conversion from raw render arrays (SHAP-E.md §10 "Input";
official ``load_or_create_multimodal_batch`` + ``normalize_input_batch`` + the encoder's list-input converters).

What the encoder consumes (B objects, N points, V views of S×S pixels), all float32 on one device:

* ``points``   (B, 6, N): xyz in the encoder frame (the asset normalised into [-0.5, 0.5]³ then ×2, so [-1, 1]),
  then RGB in [0, 1]. The first ``data_ctx`` points must be a farthest-point subset (``fps_method: first`` takes
  them as point-conv centres), e.g. the output of an FPS that returns points in selection order.
* ``views``    (B, V, 3, S, S): RGB renders composited onto black, u8/127.5 − 1 (range [-1, 1]).
* ``depths``   (B, V, 1, S, S): z-depth along the camera axis (same ×2 scene scale), clamped at ``max_depth``
  (9.0; the background must be ≥ max_depth or masked by alpha).
* ``alphas``   (B, V, 1, S, S): u8/255; pixels with alpha < 0.999 get the learned unknown token.
* ``rays``     (B, V, S, S, 2, 3): per pixel (origin, unit direction) of the official pinhole camera
  (``engine.render.cameras.Camera.rays``), rows top to bottom, columns left to right.
* ``camera_z`` (B, V, 3): each camera's forward axis (turns z-depth into distance along the ray).

The renders and the cameras must describe the same pixels: camera width/height == S.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..records import EngineError
from ..render.cameras import Camera


@dataclass(frozen=True)
class EncoderBatch:
    points: torch.Tensor  # (B, 6, N)
    views: torch.Tensor  # (B, V, 3, S, S)
    depths: torch.Tensor  # (B, V, 1, S, S)
    alphas: torch.Tensor  # (B, V, 1, S, S)
    rays: torch.Tensor  # (B, V, S, S, 2, 3)
    camera_z: torch.Tensor  # (B, V, 3)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """In the positional order of ``PointCloudEncoder.encode``."""
        return self.points, self.views, self.depths, self.alphas, self.rays, self.camera_z

    def to(self, device: torch.device | str) -> "EncoderBatch":
        return EncoderBatch(*(t.to(device) for t in self.tensors()))


def _tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x
    raise EngineError(f"encoder inputs: {name} must be a numpy array or torch tensor, got {type(x).__name__}")


def official_batch_from_arrays(points_xyz_rgb, views_u8, alphas_u8, depths, camera: Camera, *,
                               max_depth: float = 9.0, device: torch.device | str | None = None) -> EncoderBatch:
    """Raw arrays -> ``EncoderBatch``.

    points_xyz_rgb (B, N, 6) float: xyz (encoder frame, [-1, 1]) then RGB in [0, 1], FPS-ordered.
    views_u8 (B, V, S, S, 3) uint8 RGB on black; alphas_u8 (B, V, S, S) uint8; depths (B, V, S, S) float z-depth;
    camera: ``Camera`` with B·V cameras (object-major: all views of object 0 first), width == height == S.
    """
    pts = _tensor(points_xyz_rgb, "points_xyz_rgb")
    views = _tensor(views_u8, "views_u8")
    alphas = _tensor(alphas_u8, "alphas_u8")
    dep = _tensor(depths, "depths")
    hint = "see the tensor contract in engine/models/encoder_inputs.py"
    if pts.dim() != 3 or pts.shape[-1] != 6 or not pts.is_floating_point():
        raise EngineError(f"encoder inputs: points_xyz_rgb has shape {tuple(pts.shape)} / dtype {pts.dtype}, "
                          "expected float (B, N, 6)", hint)
    if views.dim() != 5 or views.shape[-1] != 3 or views.dtype != torch.uint8:
        raise EngineError(f"encoder inputs: views_u8 has shape {tuple(views.shape)} / dtype {views.dtype}, "
                          "expected uint8 (B, V, S, S, 3)", "composite RGBA renders onto black first")
    b, v, s, s2, _ = views.shape
    if s != s2 or pts.shape[0] != b:
        raise EngineError(f"encoder inputs: views {tuple(views.shape)} do not match points {tuple(pts.shape)}",
                          "square views, same batch size")
    if tuple(alphas.shape) != (b, v, s, s) or alphas.dtype != torch.uint8:
        raise EngineError(f"encoder inputs: alphas_u8 has shape {tuple(alphas.shape)} / dtype {alphas.dtype}, "
                          f"expected uint8 {(b, v, s, s)}", hint)
    if tuple(dep.shape) != (b, v, s, s):
        raise EngineError(f"encoder inputs: depths has shape {tuple(dep.shape)}, expected {(b, v, s, s)}", hint)
    if len(camera) != b * v or camera.width != s or camera.height != s:
        raise EngineError(f"encoder inputs: {len(camera)} cameras of {camera.width}x{camera.height}, expected "
                          f"{b * v} of {s}x{s}", "one camera per view, with the render's pixel size")
    if not torch.isfinite(pts).all():
        raise EngineError("encoder inputs: points contain NaN or inf", hint)

    origin, direction = camera.rays()  # (B·V, S, S, 3) each
    batch = EncoderBatch(
        points=pts.float().transpose(1, 2).contiguous(),
        views=(views.float() / 127.5 - 1).permute(0, 1, 4, 2, 3).contiguous(),
        depths=dep.float().clamp(max=max_depth)[:, :, None],
        alphas=(alphas.float() / 255.0)[:, :, None],
        rays=torch.stack([origin, direction], dim=-2).view(b, v, s, s, 2, 3),
        camera_z=camera.z.float().reshape(b, v, 3),
    )
    return batch if device is None else batch.to(device)
