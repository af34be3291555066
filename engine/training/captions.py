"""Captions of the mini world's objects (MINI-DATASET.md): the canonical one per kind (R-precision), random training
captions from templates and synonyms, every plain phrasing of a kind (evaluation), and captions naming only the
shape or only the colour (CLIP training). Aspect-free phrasings describe the `regular` aspect, so every full
caption names exactly one kind."""

from __future__ import annotations

import torch

from .world import ASPECTS, COLOR_NAMES, N_KINDS, SHAPES, ObjectSpec, kind_from_index

SHAPE_SYNONYMS = {0: ("box",), 1: ("ball",)}
ASPECT_SYNONYMS = {1: ("tall", "elongated", "stretched"), 2: ("flat", "squashed", "low")}

_TEMPLATES_CONTRACT = (
    "a {color} {shape}", "{color} {shape}", "a 3d model of a {color} {shape}", "a {shape} that is {color}",
)
_TEMPLATES_EXTRA = (
    "a {color} colored {shape}", "a render of a {color} {shape}", "the {shape} is {color}", "{shape}, {color}",
    "an object: a {color} {shape}", "a simple {color} {shape}", "a 3d {color} {shape}",
)


def _article(text: str) -> str:
    """'a' -> 'an' before a vowel sound (orange, octahedron, elongated)."""
    words = text.split(" ")
    for i, w in enumerate(words[:-1]):
        if w == "a" and words[i + 1][:1] in "aeio":
            words[i] = "an"
        if w == "A" and words[i + 1][:1] in "aeio":
            words[i] = "An"
    return " ".join(words)


def canonical_caption(shape: int, aspect: int, color: int) -> str:
    """The one caption per kind used for R-precision: 'a {aspect} {color} {shape}' (aspect omitted if regular)."""
    a = "" if aspect == 0 else ASPECTS[aspect] + " "
    return _article(f"a {a}{COLOR_NAMES[color]} {SHAPES[shape]}")


def all_kind_captions() -> list[str]:
    """The 288 canonical captions, indexed by kind (see ``kind_index``)."""
    return [canonical_caption(*kind_from_index(k)) for k in range(N_KINDS)]


def caption(spec: ObjectSpec, generator: torch.Generator, *, extra_prob: float = 0.3,
            synonym_prob: float = 0.1) -> str:
    """A random caption of ``spec``: a contract template most of the time, otherwise a further natural phrasing."""
    u = torch.rand(4, generator=generator).tolist()
    pool = _TEMPLATES_EXTRA if u[0] < extra_prob else _TEMPLATES_CONTRACT
    tpl = pool[int(torch.randint(len(pool), (1,), generator=generator))]
    shape = SHAPES[spec.shape]
    if spec.shape in SHAPE_SYNONYMS and u[1] < synonym_prob:
        shape = SHAPE_SYNONYMS[spec.shape][0]
    aspect = None
    if spec.aspect != 0:
        words = ASPECT_SYNONYMS[spec.aspect]
        aspect = words[0] if u[2] >= synonym_prob else words[int(torch.randint(len(words), (1,), generator=generator))]
    return _fill(tpl, COLOR_NAMES[spec.color], shape, aspect)


_TEMPLATES_SHAPE_ONLY = ("a {shape}", "{shape}", "a 3d model of a {shape}", "a render of a {shape}")
_TEMPLATES_COLOR_ONLY = ("a {color} object", "something {color}", "a {color} thing", "an object that is {color}")


def partial_caption(spec: ObjectSpec, generator: torch.Generator, part: str) -> str:
    """A caption naming only part of ``spec``: ``part`` 'shape' (aspect and shape, no colour) or 'color'."""
    pool = _TEMPLATES_SHAPE_ONLY if part == "shape" else _TEMPLATES_COLOR_ONLY
    tpl = pool[int(torch.randint(len(pool), (1,), generator=generator))]
    return _article(tpl.format(shape=_shape_words(spec), color=COLOR_NAMES[spec.color]))


def _shape_words(spec: ObjectSpec) -> str:
    """'cube', 'tall cube', 'flat cube': the shape with its plain aspect word."""
    return SHAPES[spec.shape] if spec.aspect == 0 else f"{ASPECT_SYNONYMS[spec.aspect][0]} {SHAPES[spec.shape]}"


N_PART_KEYS = len(SHAPES) * len(ASPECTS) + len(COLOR_NAMES)


def part_key_of_kind(kind, part: str):
    """The key of the part of a kind (int or tensor of kind indices) that a partial caption names: its
    (shape, aspect) 0..23, or 24 + its colour (kind = (shape · 3 + aspect) · 12 + colour, ``world.kind_index``)."""
    return kind // len(COLOR_NAMES) if part == "shape" else len(SHAPES) * len(ASPECTS) + kind % len(COLOR_NAMES)


def partial_caption_bank(kinds: list[int]) -> tuple[list[str], torch.Tensor]:
    """Every partial caption (each template, plain words) of the shapes-with-aspect and the colours of ``kinds``,
    and the ``part_key`` of each (M,): the conditions a prior learns the marginals E[z | shape] and E[z | colour]
    from (``train_prior --partial-frac``), which composed guidance adds up at sampling time."""
    texts, keys, seen = [], [], set()
    for k in kinds:
        spec = ObjectSpec(*kind_from_index(k))
        for part, pool in (("shape", _TEMPLATES_SHAPE_ONLY), ("color", _TEMPLATES_COLOR_ONLY)):
            key = part_key_of_kind(k, part)
            if key in seen:
                continue
            seen.add(key)
            texts += [_article(tpl.format(shape=_shape_words(spec), color=COLOR_NAMES[spec.color])) for tpl in pool]
            keys += [key] * len(pool)
    return texts, torch.tensor(keys)


def phrasings(spec: ObjectSpec) -> list[str]:
    """Every caption template filled with the plain words of ``spec`` (no synonyms), in a fixed order."""
    aspect = ASPECT_SYNONYMS[spec.aspect][0] if spec.aspect != 0 else None
    return [_fill(tpl, COLOR_NAMES[spec.color], SHAPES[spec.shape], aspect)
            for tpl in _TEMPLATES_CONTRACT + _TEMPLATES_EXTRA]


def _fill(tpl: str, color: str, shape: str, aspect: str | None) -> str:
    if aspect is not None:
        if "that is" in tpl or tpl.startswith("the ") or tpl.startswith("{shape},"):
            shape = f"{aspect} {shape}"  # the colour stays the predicate
        else:
            color = f"{aspect} {color}"
    return _article(tpl.format(color=color, shape=shape))
