"""Where variants go: a near-square grid of cells centred on an anchor (the 3D cursor), and "beside" placement.

Shap-E objects live in [-1, 1]^3 (the mini world's in [-0.75, 0.75]^3), so a 2.0 spacing leaves a clear gap.
Rows run towards +Y (away from the default front view, which looks along +Y), columns along +X.
"""

from __future__ import annotations

import math


def grid_offsets(count: int, spacing: float = 2.0) -> list[tuple[float, float, float]]:
    """``count`` (x, y, 0) offsets, row-major, the whole grid centred on (0, 0, 0)."""
    if count <= 0:
        return []
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    out = []
    for i in range(count):
        r, c = divmod(i, cols)
        out.append(((c - (cols - 1) / 2) * spacing, (r - (rows - 1) / 2) * spacing, 0.0))
    return out


def beside_offsets(count: int, spacing: float = 2.0, start: int = 1) -> list[tuple[float, float, float]]:
    """Offsets in a row to the right (+X) of an existing object, the first one ``start`` cells away."""
    return [((start + i) * spacing, 0.0, 0.0) for i in range(count)]
