"""Pinhole cameras with the official Shap-E conventions (DifferentiableProjectiveCamera, SHAP-E.md §8, §10).

A camera is an origin and an orthonormal frame: ``z`` looks forward, ``x`` to the image right, ``y`` to the image
*bottom* (y = z × x). Pixel (col, row), top-left origin, maps to the unnormalised direction
z + x·a_col + y·a_row with a = (2·pix/(size−1) − 1)·tan(fov/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Camera:
    """A batch of cameras: origin/x/y/z are (N, 3) float32 tensors; one image size and fov for all."""

    origin: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    width: int
    height: int
    x_fov: float = 0.7
    y_fov: float = 0.7

    def __len__(self) -> int:
        return self.origin.shape[0]

    def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions, each (N, H, W, 3), row-major pixels."""
        n = len(self)
        dev, dt = self.origin.device, self.origin.dtype
        rows = torch.arange(self.height, device=dev, dtype=dt)
        cols = torch.arange(self.width, device=dev, dtype=dt)
        a_col = (cols / (self.width - 1) * 2 - 1) * math.tan(self.x_fov / 2)  # (W,)
        a_row = (rows / (self.height - 1) * 2 - 1) * math.tan(self.y_fov / 2)  # (H,)
        d = (self.z[:, None, None, :]
             + self.x[:, None, None, :] * a_col[None, None, :, None]
             + self.y[:, None, None, :] * a_row[None, :, None, None])  # (N, H, W, 3)
        d = d / d.norm(dim=-1, keepdim=True)
        o = self.origin[:, None, None, :].expand(n, self.height, self.width, 3)
        return o, d


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def pan_cameras(n: int, size: int, *, fov: float = 0.7, distance: float = 4.0, elevation_z: float = -0.5,
                device: torch.device | str = "cpu") -> Camera:
    """The official ``create_pan_cameras``: n views on a circle, theta = linspace(0, 2π, n) (first == last)."""
    theta = torch.linspace(0, 2 * math.pi, n, dtype=torch.float64)
    z = _normalize(torch.stack([torch.sin(theta), torch.cos(theta), torch.full_like(theta, elevation_z)], -1))
    origin = -z * distance
    x = torch.stack([torch.cos(theta), -torch.sin(theta), torch.zeros_like(theta)], -1)
    y = torch.cross(z, x, dim=-1)
    f = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
    return Camera(f(origin), f(x), f(y), f(z), size, size, fov, fov)


def look_at_cameras(directions: torch.Tensor, size: int, *, fov: float = 0.7, distance: float = 4.0) -> Camera:
    """Cameras at ``distance`` along each unit vector of ``directions`` (N, 3), looking at the origin, world Z up."""
    dirs = _normalize(directions.to(torch.float64))
    z = -dirs
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(z)
    x = torch.cross(z, up, dim=-1)
    # Looking straight up/down: pick any horizontal x.
    degenerate = x.norm(dim=-1) < 1e-6
    x[degenerate] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    x = _normalize(x)
    y = torch.cross(z, x, dim=-1)
    f = lambda t: t.to(dtype=torch.float32)  # noqa: E731
    return Camera(f(dirs * distance), f(x), f(y), f(z), size, size, fov, fov)
