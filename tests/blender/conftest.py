"""bpy-wheel tests: build the extension zip once, then run each scenario in its own isolated Blender process.

Isolation: BLENDER_USER_RESOURCES, HOME, TMPDIR and MESA_SHADER_CACHE_DIR point into a temporary folder, so the
extension is installed into a throw-away user repository and nothing touches the real ~/.config/blender.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blender_env import ROOT, HERE  # noqa: E402  (tests/blender is on sys.path)


pytest.importorskip("bpy", reason="the bpy wheel (Blender as a Python module) is not installed")


@pytest.fixture(scope="session")
def addon_zip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, str(ROOT / "build.py"), "--out", str(out), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def run_scenario(tmp_path, addon_zip):
    def run(name: str, timeout: float = 120, **opts) -> dict:
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        env = dict(os.environ, HOME=str(home), TMPDIR=str(home), BLENDER_USER_RESOURCES=str(home / "blender"),
                   MESA_SHADER_CACHE_DIR=str(home / "mesa"), PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)  # the engine must come from inside the zip, not the repository
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, str(HERE / "scenarios.py"), name, str(addon_zip), str(out),
                               json.dumps(opts)], cwd=str(home), env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert out.exists(), f"scenario {name} crashed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
        facts = json.loads(out.read_text())
        assert facts.get("ok"), facts.get("traceback", "") + proc.stderr[-2000:]
        return facts

    return run
