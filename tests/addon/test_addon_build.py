"""build.py: manifest rules, import relativisation for the vendored engine, and the built zip's layout."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import build  # noqa: E402


def manifest():
    return tomllib.loads((ROOT / "blender_manifest.toml").read_text())


def test_repository_manifest_passes_all_rules():
    data = manifest()
    assert build.check_manifest(data, build.addon_version()) == []
    assert data["id"] == "shap_e_generator" and data["version"] == "0.1.0" and data["type"] == "add-on"
    assert data["blender_version_min"] == "4.2.0" and data["license"] == ["SPDX:GPL-3.0-or-later"]


@pytest.mark.parametrize("change, needle", [
    ({"tagline": "x" * 65}, "tagline"),
    ({"tagline": "Makes 3D objects."}, "punctuation"),
    ({"license": ["GPL-3.0-or-later"]}, "SPDX"),
    ({"tags": ["Magic"]}, "unknown tags"),
    ({"permissions": {"network": "Downloads weights."}}, "final period"),
    ({"permissions": {"network": "x" * 65}}, "1-64"),
    ({"permissions": {"teleport": "because"}}, "unknown permission"),
    ({"blender_version_min": "4.1.0"}, "4.2.0"),
    ({"version": "1.0"}, "semantic"),
    ({"maintainer": ""}, "empty"),
    ({"id": "Shap-E"}, "id must"),
])
def test_manifest_rule_violations_are_reported(change, needle):
    data = {**manifest(), **change}
    errs = build.check_manifest(data)
    assert any(needle in e for e in errs), errs


def test_missing_keys_and_version_mismatch():
    data = manifest()
    del data["maintainer"]
    errs = build.check_manifest(data, "9.9.9")
    assert any("maintainer" in e for e in errs) and any("__version__" in e for e in errs)


def test_relativize_rewrites_absolute_engine_imports():
    src = "from engine.records import EngineError\nfrom engine.render.cameras import Camera\nimport os\n"
    out, problems = build.relativize(src, "engine/render/nerf.py")
    assert out.splitlines()[:2] == ["from ..records import EngineError", "from ..render.cameras import Camera"]
    assert problems == []
    out, _ = build.relativize("from engine import records\n", "engine/pipeline.py")
    assert out.strip() == "from . import records"
    _, problems = build.relativize("import engine.records\n", "engine/cli.py")
    assert problems and "relative" in problems[0]


def test_exclude_patterns():
    pats = ["__pycache__/", "*.pyc", "/demo.py", "/demo_assets/"]
    assert build.excluded("engine/__pycache__/x.pyc", pats)
    assert build.excluded("demo.py", pats) and build.excluded("demo_assets/cube.png", pats)
    assert not build.excluded("engine/demo.py", ["/demo.py"])
    assert not build.excluded("operators.py", pats)


def test_built_zip_layout(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "build.py"), "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    zpath = Path(proc.stdout.strip().splitlines()[-1])
    assert zpath.name == "shap_e_generator-0.1.0.zip" and "MB zip" in proc.stdout
    names = zipfile.ZipFile(zpath).namelist()
    assert "blender_manifest.toml" in names and "__init__.py" in names and "engine/__init__.py" in names
    assert "engine/pipeline.py" in names and "engine_shim.py" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") or n == "demo.py" for n in names)
    assert not any(n.startswith(("tests/", "shap_e_blender/")) for n in names)
    with zipfile.ZipFile(zpath) as zf:
        for n in names:
            if n.startswith("engine/") and n.endswith(".py"):
                text = zf.read(n).decode()
                assert "from engine." not in text and "\nimport engine" not in text, n
