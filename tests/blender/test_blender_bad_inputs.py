"""Bad inputs through the Generate operator: a reported error with a hint, and the .blend left unchanged."""

import pytest

pytestmark = [pytest.mark.blender, pytest.mark.timeout(150)]


def test_bad_inputs_report_and_leave_scene_unchanged(run_scenario, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("this is text, not a PNG")
    results = run_scenario("bad_inputs", bad_file=str(bad))["results"]
    expected = {"empty_prompt": "prompt is empty", "no_image": "No image selected",
                "no_editor_image": "Image Editor", "non_image_file": "not an image",
                "unknown_model": "Unknown model"}
    assert set(results) == set(expected)
    for label, needle in expected.items():
        r = results[label]
        assert needle in r["error"], (label, r)
        assert r["hint"], f"{label}: an error must say what to do"
        assert r["unchanged"], f"{label}: the .blend changed"
        # The operator reported an ERROR (bpy raises it as RuntimeError in background mode) and did not finish.
        assert r["ret"][0] in ("RuntimeError", "CANCELLED") and "FINISHED" not in r["ret"], (label, r)


def test_network_features_respect_online_access(run_scenario, tmp_path):
    f = run_scenario("bad_inputs", bad_file=str(tmp_path / "missing.png"))
    assert f["online_access"] is False  # the bpy wheel's default
    for op in ("download_models", "install_dependencies"):
        r = f[op]
        assert "FINISHED" not in r["ret"] and not r["busy"], (op, r)
        assert "Online access" in r["error"] and "Allow Online Access" in r["hint"], (op, r)
    assert "by hand into" in f["download_models"]["hint"]  # manual instructions name the folder
