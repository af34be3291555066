"""Split a text prompt into the part that names a colour and the rest, for composed guidance.

Composed guidance (``diffusion.denoisers.PartsGuidance``; Liu et al. 2022, "Compositional Visual Generation with
Composable Diffusion Models") adds the prior's answers for each part of a prompt, so a prior that knows "a cube"
and "a pink object" from other pairs can answer "a pink cube" even if it never saw that pair. Which words form a
part is plain English here, not the embedded model's vocabulary: the basic colour terms below (with their common
spelling variants) are the attribute, the prompt without them is the object. A prompt with no colour word, or
with colour words only, has no parts, and the sampler then runs on the whole prompt alone.

    >>> split_color("a tall pink cube")
    ('a tall cube', 'a pink object')
"""

from __future__ import annotations

import re

# Basic colour terms of English (Berlin & Kay's eleven and the common further ones), longest first so that
# "light blue" is matched before "blue".
COLOR_WORDS = (
    "light blue", "dark blue", "light green", "dark green", "light gray", "dark gray", "light grey", "dark grey",
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey",
    "cyan", "magenta", "violet", "turquoise", "beige", "gold", "silver", "teal", "maroon", "navy",
)
_COLOR = re.compile(r"\b(" + "|".join(w.replace(" ", r"\s+") for w in COLOR_WORDS) + r")\b", re.IGNORECASE)
# Words that only carry the colour ("a red colored cube", "a cube that is red", "the cube is red").
_GLUE = re.compile(r"\b(colou?red|in colou?r)\b|\b(that|which)\s+is\s*$|\bis\s*$", re.IGNORECASE)


def _article(text: str) -> str:
    """'a' / 'an' agreeing with the next word, after words were taken out."""
    return re.sub(r"\b([Aa])n?\s+(?=(\w))", lambda m: m.group(1) + ("n " if m.group(2).lower() in "aeiou" else " "),
                  text)


def _tidy(text: str) -> str:
    text = re.sub(r"\s*,\s*", ", ", text)
    text = re.sub(r"\s+", " ", text).strip(" ,:;")
    return _article(text)


def split_color(prompt: str) -> tuple[str, str] | None:
    """(the prompt without its colour words, 'a {colour} object') or None when the prompt names no colour, more
    than one colour (which colour belongs to which object is then not ours to guess), or nothing but colours."""
    found = {re.sub(r"\s+", " ", m.group(1).lower()) for m in _COLOR.finditer(prompt)}
    if len(found) != 1:
        return None
    color = found.pop()
    rest = _tidy(_COLOR.sub(" ", prompt))
    rest = _tidy(_GLUE.sub(" ", rest))
    if not re.search(r"\w", re.sub(r"\b(an?|the|object|thing|something|3d|model|of|render)\b", "", rest, flags=re.I)):
        return None
    return rest, _article(f"a {color} object")


__all__ = ["COLOR_WORDS", "split_color"]
