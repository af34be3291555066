"""Every panel and the preferences draw without errors and only name existing properties and operators."""

import pytest

pytestmark = [pytest.mark.blender, pytest.mark.timeout(150)]


def test_panels_draw_in_every_state(run_scenario):
    states = run_scenario("ui")["states"]
    assert set(states) >= {"idle_text", "image_EDITOR", "image_DATABLOCK", "image_FILE", "error",
                           "selected_generated", "running"}
    for name, st in states.items():
        assert st["bad"] == [], f"{name}: unknown property/operator names {st['bad']}"
        assert "shap_e.generate" in st["operators"] and "shap_e.download_models" in st["operators"]
    assert any("prompt is empty" in lbl for lbl in states["error"]["labels"])
    assert "shap_e.dismiss_error" in states["error"]["operators"]
    assert {"shap_e.redecode", "shap_e.variations", "shap_e.blend"} <= set(states["selected_generated"]["operators"])
    assert "shap_e.redecode" not in states["idle_text"]["operators"]  # refine only for generated objects
    run = states["running"]
    assert run["progress"] and "shap_e.cancel" in run["operators"]
    assert any("Online access is off" in lbl for lbl in states["idle_text"]["labels"])
