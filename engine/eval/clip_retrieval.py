"""What the conditioning itself tells: the mini CLIP's image embedding of each image prompt, retrieved among the
captions of all 288 kinds.

The image prior sees nothing of the target but the CLIP's view of one render. If the CLIP's own embedding of that
render names another shape, the information the prior needs is weak or missing at its input, whatever the prior
learns. The prompts are exactly the evaluation's (``condition_image``: one view per kind and seed), so the figures
compare with the image rows of ``python -m engine eval``. The prior reads the token grid rather than the pooled
embedding, so this is a measure of what the encoder makes easy to read, not a strict bound.
"""

from __future__ import annotations

import torch

from ..training.captions import all_kind_captions
from ..training.world import ObjectSpec, kind_from_index


@torch.no_grad()
def image_prompt_retrieval(kinds: list[int], clip, *, seeds: int) -> dict:
    """Top-1 retrieval of each (kind, seed) image prompt among the 288 kind captions.

    ``clip``: an object with ``embed_text(list[str])`` and ``embed_image(list[uint8 images])`` returning
    L2-normalised rows (the engine's CLIP conditioner). Returns the fractions of prompts whose retrieved caption has
    the right shape, shape and aspect, colour, and kind, with ``n`` and the confusions (target -> retrieved).
    """
    from .run import condition_image

    text = clip.embed_text(all_kind_captions())
    hits = {"shape": 0, "shape_aspect": 0, "color": 0, "kind": 0}
    confusions: dict[str, int] = {}
    n = 0
    for k in kinds:
        s, a, c = kind_from_index(k)
        images = [condition_image(ObjectSpec(s, a, c), seed) for seed in range(seeds)]
        for p in (clip.embed_image(images) @ text.T).argmax(1).tolist():
            ps, pa, pc = kind_from_index(p)
            n += 1
            hits["shape"] += ps == s
            hits["shape_aspect"] += ps == s and pa == a
            hits["color"] += pc == c
            hits["kind"] += p == k
            if (ps, pa) != (s, a):
                key = f"{ObjectSpec(s, a, c).describe()} -> {ObjectSpec(ps, pa, pc).describe()}"
                confusions[key] = confusions.get(key, 0) + 1
    out = {f"{name}_acc": v / max(n, 1) for name, v in hits.items()}
    return {"n": n, **out, "confusions": dict(sorted(confusions.items(), key=lambda kv: -kv[1]))}


def print_retrieval(name: str, res: dict) -> None:
    print(f"{name}: n {res['n']}, shape {100 * res['shape_acc']:.1f} %, shape and aspect "
          f"{100 * res['shape_aspect_acc']:.1f} %, colour {100 * res['color_acc']:.1f} %, kind "
          f"{100 * res['kind_acc']:.1f} %")
    top = list(res["confusions"].items())[:6]
    if top:
        print("  most confused: " + ", ".join(f"{k} ({v})" for k, v in top))
