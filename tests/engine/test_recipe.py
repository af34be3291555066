"""The shipped weights' chain as one command (engine.training.recipe): its numbers match the shipped training
records, and the whole chain runs end to end at toy sizes, resumably."""

import json
from pathlib import Path

import pytest

from engine.training import recipe

MINI = Path(recipe.__file__).resolve().parents[1] / "weights" / "mini"
SHIPPED = json.loads((MINI / "mini.json").read_text())["training"]


def _runs(run):
    while run is not None:
        yield run
        run = run.then


def test_every_step_uses_the_numbers_of_the_record_it_reproduces():
    assert SHIPPED["preset"] == "gpu-short" and recipe.RECIPE[0].kind == "base"
    seen = []
    for step in recipe.RECIPE[1:]:
        names = (step.record,) if isinstance(step.record, str) else step.record
        seen += names
        if step.kind == "decoder":
            rec = SHIPPED[names[0]]
            assert rec["steps"] == step.decoder["steps"] and rec["objects"] == step.decoder["objects"]
            assert rec.get("prior_mix", 0.0) == step.decoder.get("prior-mix", 0.0)
            assert rec.get("color_weight", 16.0) == step.decoder.get("color-weight", 16.0)
            if rec.get("prior_mix"):  # its image samples were drawn at the image default of the day, 1.5
                assert step.decoder["image-prior-guidance"] == 1.5
            assert rec.get("keep_sdf", False) == step.decoder.get("keep-sdf", False)
            continue
        assert len(names) == len(step.priors)
        for name, lane in zip(names, step.priors):
            rec = SHIPPED[name]
            assert name.startswith(lane.mode) and rec["batch"] == 64, name
            runs = list(_runs(lane))
            steps = [r.steps for r in runs]
            noise = [r.cond_noise for r in runs]
            assert rec["steps"] == (steps[0] if len(steps) == 1 else steps), name
            assert rec.get("cond_noise", 0.0) == (noise[0] if len(noise) == 1 else noise), name
            assert f"--steps {rec['steps'] if len(steps) == 1 else steps[0]} " in rec["command"], name
    # every CPU fine-tune the shipped weights record is in the chain, once
    finetunes = [k for k in SHIPPED if k.startswith(("text_prior_finetune", "image_prior_finetune",
                                                     "decoder_finetune"))]
    assert sorted(seen) == sorted(finetunes)


def test_dry_run_prints_the_chain_in_order(capsys, tmp_path):
    assert recipe.run_recipe(tmp_path, device="cpu", dry_run=True) == []
    text = capsys.readouterr().out
    heads = [line.split()[1] for line in text.splitlines() if line.startswith("# ")]
    assert heads == [s.name for s in recipe.RECIPE]
    assert "--preset gpu-short" in text and "--cond-noise 0.06" in text and "--prior-mix 0.75" in text
    assert not (tmp_path / "steps").exists()  # nothing ran
    recipe.run_recipe(tmp_path, device="cpu", dry_run=True, stop_after="priors_1")
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("# ")] == \
        ["base", "decoder_1", "priors_1"]
    with pytest.raises(SystemExit, match="the steps are base, decoder_1"):
        recipe.run_recipe(tmp_path, dry_run=True, stop_after="cycle_9")


@pytest.mark.timeout(900)
def test_the_whole_chain_runs_at_toy_sizes_and_resumes(tmp_path):
    from engine.mini_weights import load_mini

    ran = recipe.run_recipe(tmp_path, device="cpu", smoke=True)
    assert ran == [s.name for s in recipe.RECIPE]
    parts = load_mini("cpu", tmp_path / "weights")  # verifies every SHA-256
    training = parts["manifest"]["training"]
    assert list(training["recipe"]) == ran
    assert {"decoder_finetune", "decoder_finetune_2", "decoder_finetune_3"} <= set(training)
    assert "--keep-sdf" in training["recipe"]["decoder_3"]["commands"][0]
    assert "--steps 2 " in training["recipe"]["cycle_6"]["commands"][0]
    assert recipe.run_recipe(tmp_path, device="cpu", smoke=True) == []  # every step is marked done
