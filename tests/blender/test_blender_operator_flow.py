"""The add-on's operator code path with an engine test double (seconds, runs without the model weights).

Checks what the add-on itself is responsible for: bulk mesh build, colour attribute + material, metadata, the
latent surviving save/reopen, re-decode replacing the mesh in one undo step, variations laid out beside the
source, one undo step per generate, cancel mid-run leaving the .blend unchanged. test_end_to_end.py repeats the
main checks with the real engine.
"""

import pytest

pytestmark = [pytest.mark.blender, pytest.mark.timeout(150)]


def test_generate_redecode_reopen_variations(run_scenario, tmp_path):
    f = run_scenario("generate", fake=True, blend=str(tmp_path / "t.blend"))
    assert f["ret"] == ["FINISHED"] and f["error"] == ["", ""]
    (obj,) = f["new_objects"]
    assert obj["attr"] == ["POINT", "FLOAT_COLOR"] and obj["active_color"] == "Col"
    assert obj["color_mean"] == pytest.approx([0.8, 0.1, 0.1], abs=1e-6)  # linear colours stored unchanged
    assert ["ShaderNodeVertexColor", "Col", "ShaderNodeBsdfPrincipled", "Base Color"] in obj["links"]
    p = obj["props"]
    assert p["shap_e_prompt"] == "a red cube" and p["shap_e_model"] == "mini" and p["shap_e_grid_size"] == 64
    assert p["shap_e_seed"] == f["last_seed"] and p["shap_e_version"] == "0.1.0"
    assert p["shap_e_latent_text"] in f["texts"] and f["latent_size"] == 4096
    assert obj["location"] == [1.0, 2.0, 0.0], "a single result goes at the 3D cursor"
    assert obj["selected"] and obj["active"]
    assert obj["bbox_min"] == [-0.5, -0.5, -0.5]  # no axis conversion: the record is already Z up

    assert f["redecode_ret"] == ["FINISHED"] and f["redecode_error"] == ""
    assert f["redecode_changed"] and f["redecoded"]["props"]["shap_e_grid_size"] == 32
    assert f["redecoded"]["links"] == obj["links"], "the material survives a re-decode"
    undone = f["after_redecode_undo"]
    assert (undone["verts"], undone["props"]["shap_e_grid_size"]) == (obj["verts"], 64), "one undo step"

    assert f["latent_after_reopen_equal"]
    assert f["variations_ret"] == ["FINISHED"] and len(f["variations"]) == 2
    assert f["variations_info"] == "Added 2 object(s)", "seeds that give other objects need no notice"
    src = f["source_after_reopen"]
    for i, v in enumerate(f["variations"]):
        assert v["props"]["shap_e_prompt"] == "a red cube" and v["props"]["shap_e_seed"] != p["shap_e_seed"]
        assert v["location"][0] > src["location"][0] + 1.0 + 2.0 * i - 1e-6  # to the right, in a row
        assert v["location"][1:] == src["location"][1:]
    assert f["after_variations_undo"] == [], "one undo removes all variations"


def test_one_undo_step_removes_all_variants(run_scenario):
    f = run_scenario("undo", fake=True, count=3)
    assert f["ret"] == ["FINISHED"] and len(f["added"]) == 3
    assert f["after_one_undo_equal"], (f["before"], f["after_one_undo"])


def test_cancel_mid_run_leaves_scene_unchanged(run_scenario):
    f = run_scenario("cancel", fake=True)
    assert f["main_thread_worker"], "the job must run off the main thread"
    assert f["reached_step2"] and "step 2/50" in f["progress_text"] and "ETA" in f["progress_text"]
    assert f["had_preview"]
    assert f["status"] == "cancelled" and f["unchanged"] and not f["busy_after"]


def test_blend_between_two_generated_objects(run_scenario):
    f = run_scenario("blend", fake=True, count=3)
    assert f["poll_one_selected"] is False, "Blend needs two selected generated objects"
    assert f["ret"] == ["FINISHED"] and f["error"] == "", f.get("traceback")
    assert f["info"] == "Added 3 blend(s) between '{}' and '{}'".format(*sorted(f["info"].split("'")[1::2]))
    assert len(f["blends"]) == 3 and max(f["latent_err"]) < 1e-6, "latents mixed at 1/4, 1/2, 3/4"
    (xa, ya, za), (xb, yb, zb) = f["ends"]
    for blend, t in zip(f["blends"], (0.25, 0.5, 0.75)):
        assert blend["location"] == pytest.approx([xa + t * (xb - xa), ya + t * (yb - ya), za + t * (zb - za)])
        assert blend["props"]["shap_e_blend"].endswith(f"at {t:.2f}") and blend["props"]["shap_e_model"] == "mini"
        assert blend["attr"] == ["POINT", "FLOAT_COLOR"] and "shap_e_latent_text" in blend["props"]
    assert f["selected"] == f["new_names"], "the new objects are selected"
    assert f["variations_poll_on_blend"] is False, "a blend has no prompt of its own to vary"
    assert f["after_undo_equal"], "one undo step removes every blend"
    assert f["mixed_ret"][0] == "CANCELLED" and "different models" in f["mixed_error"][0]
    assert f["mixed_error"][1] and f["mixed_unchanged"]
