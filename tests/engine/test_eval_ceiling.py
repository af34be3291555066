"""The eval's autoencoder ceiling: encoded-and-decoded instances of a kind, scored like generated meshes."""

from engine.eval.ceiling import autoencoder_ceiling
from engine.training.world import allowed_kinds, kind_from_index


def test_ceiling_scores_reconstructions_of_each_kind():
    kinds = allowed_kinds("train")[:3]
    tally = autoencoder_ceiling(kinds, model="mini", seeds=2)
    assert tally.kinds == [k for k in kinds for _ in range(2)]
    assert len(tally.meshes) == 6 and all(len(m.faces) > 100 for m in tally.meshes)
    # the shipped transmitter reconstructs trained kinds well (measured: mean IoU 0.82 over 12 kinds x 2)
    assert sum(tally.iou) / len(tally.iou) > 0.6, (tally.iou, [kind_from_index(k) for k in kinds])


def test_prior_error_table_measures_the_shipped_text_prior():
    from engine.eval.prior_error import TIMESTEPS, prior_error

    kinds = allowed_kinds("train")[::25][:4]
    res = prior_error(kinds, instances=2)
    assert res["n"] == 8 and [r["t"] for r in res["rows"]] == list(TIMESTEPS)
    assert 0 < res["within_kind"] < res["across_kinds"]
    for r in res["rows"]:
        # the prompt tells the prior which kind it is: far closer to the kind's mean than the kinds are to each other
        assert r["mse_kind_mean"] < 0.5 * res["across_kinds"], r
        assert r["mse_instance"] > 0


def test_additive_ceiling_composes_a_held_out_kind_from_trained_ones():
    import pytest

    from engine.eval.ceiling import additive_ceiling
    from engine.records import EngineError

    held = allowed_kinds("heldout")[0]
    s, a, c = kind_from_index(held)
    train = allowed_kinds("train")
    # trained kinds sharing the held-out kind's (shape, aspect), or its colour at the same aspect
    fit = [k for k in train if (kind_from_index(k)[:2] == (s, a)) or kind_from_index(k)[1:] == (a, c)]
    assert held not in fit and len(fit) > 10
    tally, fit_mse = additive_ceiling([held], instances=1, fit_kinds=fit)
    assert tally.kinds == [held] and len(tally.meshes[0].faces) > 100
    assert 0 <= fit_mse < 0.05
    assert tally.iou[0] > 0.5, (kind_from_index(held), tally.iou)  # measured over all 42: mean 0.82
    with pytest.raises(EngineError):  # never fitted on held-out data
        additive_ceiling([held], instances=1, fit_kinds=fit + [held])
    with pytest.raises(EngineError):  # a colour no fit kind has cannot be composed
        additive_ceiling([held], instances=1, fit_kinds=[k for k in fit if kind_from_index(k)[2] != c])


def test_ground_truth_meshes_score_perfectly_on_shape_and_colour():
    from engine.eval.ceiling import ground_truth_meshes

    kinds = allowed_kinds("heldout")[::9]
    tally = ground_truth_meshes(kinds)
    assert tally.kinds == kinds
    assert all(tally.shape) and all(tally.color), [kind_from_index(k) for k in kinds]  # the metric's own sanity
    assert min(tally.iou) > 0.9
    row = tally.row(None)
    assert (row["wrong_shape"], row["wrong_aspect_only"], row["wrong_color"], row["misses"]) == (0, 0, 0, [])


def test_error_breakdown_says_how_each_wrong_answer_is_wrong():
    from engine.eval.run import Tally
    from engine.training.world import kind_index

    tally = Tally()
    right = {"shape_correct": True, "color_correct": True, "iou": 0.9}
    tally.add(kind_index(0, 0, 0), None, {**right, "pred_shape": 0, "pred_aspect": 0, "pred_color": 0})
    tally.add(kind_index(0, 0, 0), None, {**right, "shape_correct": False, "pred_shape": 1, "pred_aspect": 0,
                                          "pred_color": 0})
    tally.add(kind_index(2, 0, 3), None, {**right, "shape_correct": False, "color_correct": False,
                                          "pred_shape": 2, "pred_aspect": 1, "pred_color": 4})
    tally.add(kind_index(2, 0, 3), None, {"shape_correct": False, "color_correct": False, "iou": 0.0,
                                          "pred_shape": -1, "pred_aspect": -1, "pred_color": -1})
    row = tally.row(None)
    assert (row["wrong_shape"], row["wrong_aspect_only"], row["wrong_color"]) == (2, 1, 2)
    assert len(row["misses"]) == 3 and row["misses"][-1].endswith("-> empty mesh")
    assert " -> " in row["misses"][0] and row["misses"][0].split(" -> ")[0] != row["misses"][0].split(" -> ")[1]


def test_prior_error_covers_the_image_prior_on_the_same_instances():
    from engine.eval.prior_error import prior_error

    kinds = allowed_kinds("train")[::25][:3]
    res = prior_error(kinds, instances=2, timesteps=(0, 1023), modes=("text", "image"))
    assert set(res) == {"text", "image"}
    assert res["text"]["within_kind"] == res["image"]["within_kind"]  # one set of encoded instances
    assert res["text"] == prior_error(kinds, instances=2, timesteps=(0, 1023))  # text alone: the same figures
    for r in res["image"]["rows"]:
        # a render of the instance tells the image prior which kind it is
        assert 0 < r["mse_kind_mean"] < 0.5 * res["image"]["across_kinds"], r
