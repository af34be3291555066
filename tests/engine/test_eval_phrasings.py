"""Text prompts of the evaluation in several phrasings (``eval --phrasings``), and accuracy by phrasing."""

import pytest
import torch

from engine.eval.run import Tally, evaluate, prompt_for, text_prompts
from engine.records import EngineError
from engine.training.captions import caption, phrasings
from engine.training.world import ObjectSpec, kind_index


def test_first_phrasing_is_the_default_prompt_and_all_name_the_kind():
    spec = ObjectSpec(4, 1, 9)  # a tall green torus
    prompts = text_prompts(spec, 11)
    assert prompts[0] == prompt_for(spec) == text_prompts(spec)[0]
    assert len(set(prompts)) == 11
    for p in prompts:
        assert "tall" in p and "green" in p and "torus" in p
    for bad in (0, 12):
        with pytest.raises(EngineError):
            text_prompts(spec, bad)


@pytest.mark.parametrize("spec", [ObjectSpec(7, 2, 3), ObjectSpec(0, 0, 0), ObjectSpec(5, 1, 1)])
def test_phrasings_are_exactly_the_training_templates_without_synonyms(spec):
    g = torch.Generator().manual_seed(0)
    drawn = {caption(spec, g, synonym_prob=0.0) for _ in range(800)}
    assert set(phrasings(spec)) == drawn


def test_accuracy_by_phrasing_groups_the_answers():
    tally = Tally()
    for j, ok in [(0, True), (0, True), (1, False), (1, True)]:
        tally.add(kind_index(0, 0, 0), None, {"shape_correct": ok, "color_correct": True, "iou": 0.5,
                                              "pred_shape": 0 if ok else 1, "pred_aspect": 0, "pred_color": 0})
        tally.phrasing.append(j)
    by = tally.row(None)["by_phrasing"]
    assert by == {"0": {"n": 2, "shape_acc": 1.0, "color_acc": 1.0}, "1": {"n": 2, "shape_acc": 0.5, "color_acc": 1.0}}
    one = Tally()
    one.phrasing = [0, 0]
    assert "by_phrasing" not in one.row(None)  # a single phrasing has nothing to break down


def test_evaluate_scores_every_phrasing_with_every_seed():
    tally = evaluate([kind_index(1, 0, 0)], mode="text", model="mini", seeds=2, steps=4, sampler="heun",
                     device="cpu", grid=32, phrasings=3)
    assert tally.phrasing == [0, 0, 1, 1, 2, 2] and len(tally.shape) == 6
    assert len(tally.color_spread) == 3  # seed diversity within each prompt, not across phrasings
