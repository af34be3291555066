"""Build the installable Blender extension zip: dist/<id>-<version>.zip.

Layout of the zip (what ``blender --command extension build`` would produce for this package):
    blender_manifest.toml, __init__.py, operators.py, ...   the shap_e_blender/ package at the zip root
    engine/...                                              the engine, vendored as a subpackage (+ mini weights)
The add-on imports the engine relatively when vendored (engine_shim.py), so the vendored engine must use only
relative imports: ``from engine.x import y`` is rewritten to its relative form in the zip (the repository keeps
its source), and a plain ``import engine.x`` (not rewritable) fails the build. It checks the manifest
against the extension schema's rules, honours ``[build] paths_exclude_pattern``, runs Blender's own validator
(``bl_pkg/cli/blender_ext.py validate``, shipped in the bpy wheel) when it is installed, and lists the result.

    python build.py [--out dist] [--require-weights] [--no-validate]
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import glob
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ADDON_DIR = ROOT / "shap_e_blender"
ENGINE_DIR = ROOT / "engine"
MANIFEST = ROOT / "blender_manifest.toml"

REQUIRED = ("schema_version", "id", "version", "name", "tagline", "maintainer", "type", "blender_version_min",
            "license")
# The fixed tag list of extensions.blender.org for add-ons.
ADDON_TAGS = {"3D View", "Add Curve", "Add Mesh", "Animation", "Bake", "Camera", "Compositing", "Development",
              "Game Engine", "Geometry Nodes", "Grease Pencil", "Import-Export", "Lighting", "Material",
              "Modeling", "Mesh", "Node", "Object", "Paint", "Pipeline", "Physics", "Render", "Rigging", "Scene",
              "Sculpt", "Sequencer", "System", "Text Editor", "Tracking", "User Interface", "UV"}
PERMISSIONS = {"files", "network", "clipboard", "camera", "microphone"}
PLATFORMS = {"windows-x64", "windows-arm64", "macos-x64", "macos-arm64", "linux-x64"}
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def check_manifest(data: dict, addon_version: str | None = None) -> list[str]:
    """Every rule of the extension manifest schema we rely on; returns human-readable problems (empty: ok)."""
    errs = [f"missing required key '{k}'" for k in REQUIRED if k not in data]

    def empty(v):
        return v in ("", [], {}) or v is None

    errs += [f"key '{k}' is empty" for k, v in data.items() if empty(v)]
    get = data.get
    if get("schema_version") not in (None, "1.0.0"):
        errs.append("schema_version must be \"1.0.0\"")
    if "id" in data and not re.fullmatch(r"[a-z][a-z0-9_]*[a-z0-9]", str(get("id"))):
        errs.append("id must be lower-case letters, digits and underscores, starting with a letter")
    if "version" in data and not SEMVER.match(str(get("version"))):
        errs.append(f"version {get('version')!r} is not semantic versioning (MAJOR.MINOR.PATCH)")
    if addon_version is not None and get("version") != addon_version:
        errs.append(f"manifest version {get('version')} != shap_e_blender.__version__ {addon_version}")
    tagline = str(get("tagline", ""))
    if len(tagline) > 64:
        errs.append(f"tagline is {len(tagline)} characters (max 64)")
    if tagline and not tagline[-1].isalnum():
        errs.append("tagline must not end with punctuation")
    if get("type") not in (None, "add-on", "theme"):
        errs.append("type must be \"add-on\" or \"theme\"")
    for key in ("blender_version_min", "blender_version_max"):
        if key in data:
            if not re.fullmatch(r"\d+\.\d+\.\d+", str(data[key])):
                errs.append(f"{key} must look like 4.2.0")
            elif key == "blender_version_min" and _version_tuple(data[key]) < (4, 2, 0):
                errs.append("blender_version_min must be at least 4.2.0 (extensions need 4.2)")
    lic = get("license", [])
    if not isinstance(lic, list) or not all(isinstance(x, str) and x.startswith("SPDX:") for x in lic):
        errs.append("license must be a list of \"SPDX:<identifier>\" strings")
    tags = get("tags", [])
    if get("type") == "add-on" and any(t not in ADDON_TAGS for t in tags):
        errs.append(f"unknown tags: {sorted(set(tags) - ADDON_TAGS)}")
    bad_platforms = set(get("platforms", [])) - PLATFORMS
    if bad_platforms:
        errs.append(f"unknown platforms: {sorted(bad_platforms)}")
    for key, reason in (get("permissions") or {}).items():
        if key not in PERMISSIONS:
            errs.append(f"unknown permission '{key}'")
        elif not isinstance(reason, str) or not reason or len(reason) > 64 or reason.endswith("."):
            errs.append(f"permission '{key}': the reason must be 1-64 characters without a final period")
    build = get("build") or {}
    if "paths_exclude_pattern" in build and not isinstance(build["paths_exclude_pattern"], list):
        errs.append("[build] paths_exclude_pattern must be a list")
    return errs


def addon_version() -> str:
    m = re.search(r'^__version__ = "([^"]+)"', (ADDON_DIR / "__init__.py").read_text(), re.M)
    return m.group(1) if m else "?"


def absolute_engine_imports(engine_dir: Path = ENGINE_DIR) -> list[str]:
    """``import engine...`` / ``from engine...`` inside the engine: they would break once vendored."""
    found = []
    for path in sorted(engine_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n == "engine" or n.startswith("engine.") for n in names):
                found.append(f"{path.relative_to(engine_dir.parent)}:{node.lineno}")
    return found


def relativize(source: str, rel_path: str) -> tuple[str, list[str]]:
    """Rewrite ``from engine.x import y`` into the relative form for a file at ``rel_path`` inside engine/.

    Returns (new source, problems): plain ``import engine.x`` statements cannot be rewritten and are reported.
    """
    depth = len(Path(rel_path).parts) - 2  # engine/render/nerf.py -> 1 package below engine
    lines = source.splitlines(keepends=True)
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "engine" or node.module.startswith("engine.")):
            line = lines[node.lineno - 1]
            rest = node.module[len("engine"):]  # "" or ".render.cameras"
            new = "." * (depth + 1) + rest.lstrip(".")
            lines[node.lineno - 1] = re.sub(r"from\s+" + re.escape(node.module) + r"\b", "from " + new, line, 1)
        elif isinstance(node, ast.Import) and any(a.name == "engine" or a.name.startswith("engine.")
                                                  for a in node.names):
            problems.append(f"{rel_path}:{node.lineno} uses 'import engine...' (use a relative import)")
    return "".join(lines), problems


def excluded(rel: str, patterns: list[str]) -> bool:
    """gitignore-style subset used by Blender's builder: '/x' anchors at the root, 'x/' matches directories."""
    parts = rel.split("/")
    for pat in patterns:
        anchored = pat.startswith("/")
        core = pat.strip("/")
        if pat.endswith("/"):
            dirs = parts[:-1]
            candidates = ["/".join(dirs[: i + 1]) for i in range(len(dirs))] if anchored else dirs
        else:
            candidates = [rel] if anchored else [rel, *parts]
        if any(fnmatch.fnmatch(c, core) for c in candidates):
            return True
    return False


def collect(patterns: list[str]) -> list[tuple[Path, str]]:
    files = [(MANIFEST, "blender_manifest.toml")]
    for base, prefix in ((ADDON_DIR, ""), (ENGINE_DIR, "engine/")):
        for path in sorted(base.rglob("*")):
            if path.is_file():
                rel = prefix + path.relative_to(base).as_posix()
                if not excluded(rel, patterns):
                    files.append((path, rel))
    return files


def find_validator() -> Path | None:
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(loc, "*", "scripts", "addons_core", "bl_pkg", "cli", "blender_ext.py")))
        if hits:
            return Path(hits[-1])
    return None


def run_validator(zip_path: Path) -> tuple[bool, str]:
    tool = find_validator()
    if tool is None:
        return True, "Blender's validator not found (install the bpy wheel to run it); schema checks passed"
    proc = subprocess.run([sys.executable, str(tool), "validate", str(zip_path)], capture_output=True, text=True,
                          timeout=120)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def build(out_dir: Path, *, require_weights: bool = False, validate: bool = True) -> Path:
    data = tomllib.loads(MANIFEST.read_text())
    problems = check_manifest(data, addon_version())
    bad_imports = absolute_engine_imports()
    if bad_imports:
        print("NOTE: rewriting absolute engine imports to relative ones in the zip: " + ", ".join(bad_imports))
    for path in sorted(ENGINE_DIR.rglob("*.py")):
        problems += relativize(path.read_text(), path.relative_to(ENGINE_DIR.parent).as_posix())[1]
    weights = [p for p in (ENGINE_DIR / "weights").rglob("*") if p.is_file()] if (ENGINE_DIR / "weights").is_dir() else []
    if not any(p.suffix == ".safetensors" for p in weights):
        msg = "engine/weights has no mini model (.safetensors): the built add-on can only use official models"
        if require_weights:
            problems.append(msg)
        else:
            print(f"WARNING: {msg}")
    if problems:
        raise SystemExit("build failed:\n  - " + "\n  - ".join(problems))
    patterns = list((data.get("build") or {}).get("paths_exclude_pattern", []))
    files = collect(patterns)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{data['id']}-{data['version']}.zip"
    fd, tmp = tempfile.mkstemp(suffix=".zip", dir=out_dir)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            for src, arc in files:
                if arc.startswith("engine/") and arc.endswith(".py"):
                    zf.writestr(zipfile.ZipInfo(arc, date_time=(2024, 1, 1, 0, 0, 0)),
                                relativize(src.read_text(), arc)[0], compress_type=zipfile.ZIP_DEFLATED)
                else:
                    zf.write(src, arc)
        if validate:
            ok, text = run_validator(Path(tmp))
            print(f"[validate] {text}")
            if not ok:
                raise SystemExit("build failed: Blender's validator rejected the package")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def list_zip(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    lines = [f"{i.file_size:>12,d}  {i.filename}" for i in infos]
    total = sum(i.file_size for i in infos)
    lines.append(f"{len(infos)} files, {total / 1e6:.2f} MB uncompressed, {path.stat().st_size / 1e6:.2f} MB zip")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "dist"), help="output folder (default dist/)")
    ap.add_argument("--require-weights", action="store_true", help="fail when the mini weights are missing")
    ap.add_argument("--no-validate", action="store_true", help="skip Blender's validator")
    ap.add_argument("--quiet", action="store_true", help="print only the zip path")
    args = ap.parse_args(argv)
    path = build(Path(args.out), require_weights=args.require_weights, validate=not args.no_validate)
    if not args.quiet:
        print(list_zip(path))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
