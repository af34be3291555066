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


def text_prompt_probe(clip, *, phrasings: int = 11, steps: int = 1500, seed: int = 0) -> dict:
    """What the CLIP text vector of a held-out prompt tells, and how it is built.

    Linear probes (softmax regression on the unit vectors, fitted on the ``phrasings`` prompts of every trained
    kind) read the (shape, aspect) and the colour off the held-out kinds' prompts: if they read them, the
    information the text prior needs is at its input, linearly, and its misses are its own. ``analogy_top1``: for
    each held-out kind (g, c), the mean over every analogy e(g, c') - e(g', c') + e(g', c) of trained kinds (mean
    vector of the kind's phrasings), is the nearest of the 288 kinds' vectors the held-out kind itself? High
    values mean the text space is nearly additive in shape and colour.
    """
    from ..training.world import COLORS, N_KINDS, allowed_kinds, analogies
    from .run import text_prompts

    n_c = len(COLORS)
    vec = clip.embed_text([p for k in range(N_KINDS) for p in text_prompts(ObjectSpec(*kind_from_index(k)),
                                                                            phrasings)])
    vec = vec.view(N_KINDS, phrasings, -1)
    train, held = allowed_kinds("train"), allowed_kinds("heldout")
    labels = torch.tensor([[k // n_c, k % n_c] for k in range(N_KINDS)])
    out = {"n": len(held) * phrasings}
    g = torch.Generator().manual_seed(seed)
    for j, name, classes in ((0, "shape_aspect", N_KINDS // n_c), (1, "color", n_c)):
        x, y = vec[train].reshape(-1, vec.shape[-1]), labels[train, j].repeat_interleave(phrasings)
        w = (0.01 * torch.randn(vec.shape[-1], classes, generator=g)).requires_grad_()
        b = torch.zeros(classes, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=1e-2)
        for _ in range(steps):
            with torch.enable_grad():
                loss = torch.nn.functional.cross_entropy(10 * x @ w + b, y)
                opt.zero_grad()
                loss.backward()
            opt.step()
        xh, yh = vec[held].reshape(-1, vec.shape[-1]), labels[held, j].repeat_interleave(phrasings)
        out[f"probe_{name}_acc"] = float(((10 * xh @ w + b).argmax(1) == yh).float().mean())
        out[f"probe_{name}_train_acc"] = float(((10 * x @ w + b).argmax(1) == y).float().mean())
    mean = torch.nn.functional.normalize(vec.mean(1), dim=-1)
    have, hits = frozenset(train), 0
    for k in held:
        a, b, c = torch.tensor(analogies(k, have)).T
        hits += int((mean @ (mean[a] - mean[b] + mean[c]).mean(0)).argmax()) == k
    out["analogy_top1"] = hits / len(held)
    return out


def print_probe(res: dict) -> None:
    print(f"held-out text prompts' CLIP vectors (n {res['n']}): linear probe (shape, aspect) "
          f"{100 * res['probe_shape_aspect_acc']:.1f} %, colour {100 * res['probe_color_acc']:.1f} % (trained "
          f"{100 * res['probe_shape_aspect_train_acc']:.1f} / {100 * res['probe_color_train_acc']:.1f} %); "
          f"additive analogy finds the kind {100 * res['analogy_top1']:.1f} %")
