"""The built zip installs and enables as an extension; registering loads no torch; disabling leaves nothing."""

import pytest

pytestmark = [pytest.mark.blender, pytest.mark.timeout(150)]




def test_install_enable_and_disable(run_scenario):
    f = run_scenario("install")
    assert f["enabled"]
    assert f["vendored"], "the add-on must use the engine vendored inside the zip"
    assert not f["torch_after_enable"] and not f["engine_loaded_at_register"]
    assert f["scene_prop"]
    for cls in ("SHAP_E_OT_generate", "SHAP_E_OT_cancel", "SHAP_E_OT_redecode", "SHAP_E_OT_variations", "SHAP_E_OT_blend",
                "SHAP_E_PT_generate", "SHAP_E_PT_advanced", "SHAP_E_OT_download_models",
                "SHAP_E_OT_install_dependencies"):
        assert cls in f["operators"]
    assert f["prefs_idname"] == "bl_ext.user_default.shap_e_generator"
    assert f["models_dir_is_extension_user"] and f["models_dir"].endswith("models")
    assert f["models"][0] == "mini" and {"text300M", "image300M"} <= set(f["models"])
    if f["engine_deps_installed"]:  # (a Blender without torch still installs and registers the add-on)
        assert f["engine_import_errors"] == {}, f["engine_import_errors"]
    assert f["engine_modules_from_repo"] == [], "the repository's engine leaked into the extension"
    gone = f["after_disable"]
    assert not gone["enabled"]
    assert not gone["scene_prop"], "Scene.shap_e must be removed"
    assert gone["classes"] == [], f"classes left registered: {gone['classes']}"
    assert gone["handlers"] == []
    assert not gone["timers"] and not gone["data_changed"] and gone["sys_path"] == []
