"""Image input: Blender pixels (bottom-up, linear or sRGB) reach the engine as a top-down sRGB uint8 array."""

import pytest

pytestmark = [pytest.mark.blender, pytest.mark.timeout(150)]


def test_image_sources_reach_the_engine_top_down_srgb(run_scenario, tmp_path):
    f = run_scenario("image_input", png=str(tmp_path / "probe.png"))
    assert f["error"] == ""
    byte_img, float_img, file_img = f["seen"][:3]
    assert byte_img["shape"] == [8, 16, 4] and byte_img["dtype"] == "uint8" and byte_img["prompt"] is None
    assert byte_img["top"] == [255, 0, 0, 255] and byte_img["bottom"] == [0, 0, 255, 255]
    assert all(abs(c - 127.5) < 1 for c in float_img["top"][:3])  # linear 0.214 -> sRGB 0.5
    assert file_img["top"] == [255, 0, 0, 255] and file_img["name"] == "probe.png"
    assert f["file_images_unchanged"], "reading a file must not leave an image datablock behind"
    assert f["file_obj_path"] == str(tmp_path / "probe.png")
    assert f["file_variation"] == ["probe.png"] and f["images_after_variation_unchanged"]
    assert len(f["seen"]) == 4 and f["seen"][3]["top"] == [255, 0, 0, 255]
    assert sorted(f["image_prop"]) == ["linear_probe", "probe", "probe.png", "probe.png"]
