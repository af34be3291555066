"""Shap-E for Blender: text or image -> coloured 3D objects, in the background, with one undo step per result.

Register/unregister only. Importing and registering loads no torch and no heavy engine module: the engine is
imported on first use (engine_shim.py). Dependencies installed by the add-on's installer live in the extension's
user folder, which is put on sys.path here.
"""

from __future__ import annotations

__version__ = "0.1.0"  # keep equal to blender_manifest.toml (build.py checks)

_MODULES = ("properties", "preferences", "preview", "session", "operators", "setup_ops", "panels")


def _modules():
    import importlib

    return [importlib.import_module(f".{name}", __package__) for name in _MODULES]


def register():
    from . import deps, preferences, setup_ops

    for mod in _modules():
        mod.register()
    try:
        deps.add_to_path(preferences.site_packages_dir())
        setup_ops.configure_models_dir()
    except Exception as err:  # a read-only home must not stop the add-on from loading
        print(f"[shap-e] could not prepare the user folder: {err}")


def unregister():
    for mod in reversed(_modules()):
        mod.unregister()
    _forget_paths()


def _forget_paths():
    import os
    import sys

    from . import preferences, setup_ops

    os.environ.pop(setup_ops.MODELS_ENV, None)
    try:
        path = preferences.site_packages_dir()
    except Exception:
        return
    if path in sys.path:
        sys.path.remove(path)
