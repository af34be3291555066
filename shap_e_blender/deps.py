"""Python dependencies of the engine: what is importable, and the pip commands that install the rest.

Blender's bundled Python has numpy but not torch & co. The installer puts them into the extension's *user*
directory (``extension_path_user(..., "site-packages")``: writable without admin rights, kept across extension
updates) and that folder is added to ``sys.path`` at register time. The torch build follows the detected GPU:
an NVIDIA driver -> the CUDA wheel index, otherwise the CPU index (macOS: PyPI's default MPS/CPU build).
Commands are built here and *run* by the worker (jobs.run_subprocess); the tests check the construction only.
No bpy here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

# (import name, pip requirement). torch/torchvision come from the index chosen for the GPU.
REQUIREMENTS = (
    ("torch", "torch>=2.2"),
    ("torchvision", "torchvision"),
    ("open_clip", "open_clip_torch==3.3.0"),
    ("skimage", "scikit-image>=0.22"),
    ("safetensors", "safetensors>=0.4"),
    ("yaml", "pyyaml>=6"),
)
TORCH_INDEX = {
    "cuda": "https://download.pytorch.org/whl/cu124",
    "cpu": "https://download.pytorch.org/whl/cpu",
}


@dataclass(frozen=True)
class DepStatus:
    module: str
    requirement: str
    present: bool


def status(extra_paths: list[str] | None = None) -> list[DepStatus]:
    """Which dependencies can be imported (find_spec only: nothing heavy is imported)."""
    for p in extra_paths or []:
        add_to_path(p)
    return [DepStatus(mod, req, importlib.util.find_spec(mod) is not None) for mod, req in REQUIREMENTS]


def missing(extra_paths: list[str] | None = None) -> list[DepStatus]:
    return [d for d in status(extra_paths) if not d.present]


def add_to_path(path: str) -> None:
    if path and os.path.isdir(path) and path not in sys.path:
        sys.path.append(path)  # appended: Blender's own numpy must win over a second copy


def detect_gpu(run=subprocess.run, which=shutil.which, platform: str = sys.platform) -> str:
    """'cuda' when an NVIDIA driver answers, 'mps' on macOS, else 'cpu'."""
    if platform == "darwin":
        return "mps"
    exe = which("nvidia-smi")
    if exe:
        try:
            out = run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                      text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return "cuda"
        except (OSError, subprocess.SubprocessError):
            pass
    return "cpu"


def install_commands(python: str, target: str, gpu: str, packages: list[DepStatus] | None = None,
                     has_pip: bool = True) -> list[list[str]]:
    """The pip command lines (in order) that install ``packages`` (default: all) into ``target``."""
    packages = list(packages) if packages is not None else [DepStatus(m, r, False) for m, r in REQUIREMENTS]
    base = [python, "-m", "pip", "install", "--upgrade", "--no-input", "--disable-pip-version-check",
            "--target", target]
    cmds: list[list[str]] = []
    if not has_pip:
        cmds.append([python, "-m", "ensurepip", "--upgrade", "--user"])
    torch_reqs = [d.requirement for d in packages if d.module in ("torch", "torchvision")]
    other_reqs = [d.requirement for d in packages if d.module not in ("torch", "torchvision")]
    if torch_reqs:
        index = [] if gpu == "mps" else ["--index-url", TORCH_INDEX["cuda" if gpu == "cuda" else "cpu"]]
        cmds.append(base + index + torch_reqs)
    if other_reqs:
        # torch is already in target: keep pip from replacing it with PyPI's default build.
        cmds.append(base + ["--upgrade-strategy", "only-if-needed"] + other_reqs)
    return cmds


def install_env(target: str, base: dict | None = None) -> dict:
    """Environment for the pip runs: ``target`` on PYTHONPATH so the second run sees the torch build the first
    one installed as satisfied (pip --target alone ignores what is already in the target folder)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([target] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONNOUSERSITE"] = "1"
    return env


def pip_available(python: str) -> bool:
    try:
        return subprocess.run([python, "-m", "pip", "--version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def python_executable() -> str:
    """Blender's Python (sys.executable is the interpreter inside Blender 2.91+)."""
    return sys.executable
