"""The image prompts of the evaluation: one view per (kind, seed), and the accuracy by view elevation."""

import numpy as np

from engine.eval.run import Tally, condition_image, condition_view, view_elevation_deg
from engine.training.render_world import CONDITION_ELEV_DEG
from engine.training.world import YAWED_SHAPES, ObjectSpec, allowed_kinds, kind_from_index, kind_index


def test_every_kind_gets_its_own_view_and_seeds_repeat():
    kinds = allowed_kinds("heldout")
    views = {k: condition_view(k, 0)[1] for k in kinds}
    elevations = [view_elevation_deg(k, 0) for k in kinds]
    assert len({tuple(np.round(v.numpy().ravel(), 6)) for v in views.values()}) == len(kinds)
    assert all(CONDITION_ELEV_DEG[0] <= e <= CONDITION_ELEV_DEG[1] for e in elevations)
    assert np.ptp(elevations) > 30  # spread over the range, not one view for all
    k = kinds[0]
    assert (condition_view(k, 1)[1] != views[k]).any()  # another seed, another view
    assert (condition_view(k, 0)[1] == views[k]).all()  # deterministic
    for k in kinds:
        yaw = condition_view(k, 0)[0]
        assert (yaw == 0.0) == (kind_from_index(k)[0] not in YAWED_SHAPES)


def test_condition_image_is_reproducible_8bit_and_depends_on_the_kind():
    a = condition_image(ObjectSpec(0, 0, 0), 0, size=32)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert (a == condition_image(ObjectSpec(0, 0, 0), 0, size=32)).all()
    assert (a != condition_image(ObjectSpec(0, 0, 1), 0, size=32)).any()


def test_accuracy_by_elevation_bins_every_answer_once():
    tally = Tally()
    for i, el in enumerate([-10.0, 0.0, 12.0, 29.9, 30.0, 50.0]):
        ok = i % 2 == 0
        tally.add(kind_index(0, 0, 0), None, {"shape_correct": ok, "color_correct": True, "iou": 0.5,
                                              "pred_shape": 0 if ok else 1, "pred_aspect": 0, "pred_color": 0})
        tally.elevations.append(el)
    bins = tally.row(None)["by_elevation"]
    assert [v["n"] for v in bins.values()] == [2, 2, 2]
    assert [v["shape_acc"] for v in bins.values()] == [0.5, 0.5, 0.5]
    assert "by_elevation" not in Tally().row(None)  # text prompts have no view
