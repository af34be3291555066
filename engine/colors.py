"""The sRGB transfer function (IEC 61966-2-1), the one copy the engine uses.

``srgb_to_linear`` is also the official ``_convert_srgb_to_linear`` applied to STF mesh colours (SHAP-E.md §6.7);
inputs are clamped to [0, 1] first, which leaves the decoder's sigmoid outputs unchanged.
"""

from __future__ import annotations

import torch


def srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    c = c.clamp(0.0, 1.0)
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    c = c.clamp(0.0, 1.0)
    return torch.where(c <= 0.0031308, c * 12.92, 1.055 * c.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)
