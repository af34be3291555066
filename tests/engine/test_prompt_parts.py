"""Composed guidance: a prompt's colour is split from the rest, and the sampler runs the parts when asked."""

import numpy as np
import pytest

from engine import EngineError, GenerationRequest
from engine.conditioning.prompt_parts import split_color
from engine.eval.run import text_prompts
from engine.pipeline import generate, validate
from engine.training.world import ObjectSpec
from tests.engine.test_pipeline_random import random_mini  # noqa: F401  (fixture)


@pytest.mark.parametrize("prompt, parts", [
    ("a tall pink cube", ("a tall cube", "a pink object")),
    ("a red octahedron", ("an octahedron", "a red object")),
    ("an orange sphere", ("a sphere", "an orange object")),
    ("the cube is red", ("the cube", "a red object")),
    ("a cube that is Blue", ("a cube", "a blue object")),
    ("a red colored cone", ("a cone", "a red object")),
    ("torus, green", ("torus", "a green object")),
    ("a light blue chair", ("a chair", "a light blue object")),
    ("a grey  capsule", ("a capsule", "a grey object")),
])
def test_split_color(prompt, parts):
    assert split_color(prompt) == parts


@pytest.mark.parametrize("prompt", ["a cube", "a red object", "something red", "red", "an orange",
                                    "a red and blue cube", "a chair", "reddish cube", ""])
def test_no_parts(prompt):
    assert split_color(prompt) is None


def test_every_eval_phrasing_splits_into_shape_and_colour_words():
    spec = ObjectSpec(3, 2, 10)  # flat pink cone
    for prompt in text_prompts(spec, 11):
        rest, color = split_color(prompt)
        assert color == "a pink object" and "flat cone" in rest and "pink" not in rest


def test_part_weight_is_validated():
    with pytest.raises(EngineError, match="part weight") as info:
        validate(GenerationRequest(prompt="a red cube", part_weight=1.5))
    assert info.value.hint


def _latent(prompt, weight):
    (rec,) = generate(GenerationRequest(prompt=prompt, seed=3, steps=3, grid_size=16, device="cpu",
                                        part_weight=weight))
    return rec


def test_pipeline_composes_only_prompts_with_parts(random_mini):  # noqa: F811
    plain, composed = _latent("a red cube", 0.0), _latent("a red cube", 1.0)
    assert not np.allclose(plain.latent, composed.latent, atol=1e-4)
    assert composed.request.part_weight == 1.0
    half = _latent("a red cube", 0.5).latent
    assert not np.allclose(half, plain.latent, atol=1e-4) and not np.allclose(half, composed.latent, atol=1e-4)
    # no colour word: nothing to compose, the same latent whatever the weight
    np.testing.assert_allclose(_latent("a cube", 1.0).latent, _latent("a cube", 0.0).latent, atol=1e-6)
