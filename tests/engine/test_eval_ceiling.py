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
