"""Whether results are the same object (numpy only): a model whose answer does not depend on the seed turns
several seeds into copies of one object.

The embedded model does this: it learnt one object per prompt (text) or per picture (image), and its latents for
the seeds of one input differ by 0.01-0.1 % of their norm, against about 5 % for two wordings of one kind and
30-100 % for two kinds. The CLI and the Blender add-on tell the user when it happens.
"""

from __future__ import annotations

import numpy as np

TOLERANCE = 0.01  # distance between two latents, relative to their mean norm, under which they are one object
HINT = ("this model gives one object per input, whatever the seed. Change the prompt or picture for another, or "
        "use an official model for varied ones")


def same_object(a: np.ndarray, b: np.ndarray, tol: float = TOLERANCE) -> bool:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        return False
    scale = 0.5 * (np.linalg.norm(a) + np.linalg.norm(b))
    return bool(np.linalg.norm(a - b) <= tol * max(scale, 1e-12))


def repeats(latents, reference: np.ndarray | None = None) -> int:
    """How many of ``latents`` (None entries skipped) are the same object as an earlier one or as ``reference``
    (e.g. the object that Variations started from)."""
    seen = [] if reference is None else [np.asarray(reference)]
    count = 0
    for z in latents:
        if z is None:
            continue
        if any(same_object(z, s) for s in seen):
            count += 1
        else:
            seen.append(np.asarray(z))
    return count
