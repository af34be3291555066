"""The one place the add-on finds the engine: vendored inside the extension, or the repository's top level.

In an installed extension (``bl_ext.<repo>.shap_e_generator``) build.py copies ``engine/`` into the add-on package,
so it must be imported relatively (an extension may not rely on sys.path). In the repository (tests, demo,
``python -m shap_e_blender.demo``) the engine is the top-level package ``engine``. Everything is imported lazily:
registering the add-on never loads numpy-heavy engine modules or torch.
"""

from __future__ import annotations

import importlib


def get_engine():
    """The engine package (``engine/__init__.py`` imports only records; torch loads on first generate)."""
    if __package__:
        try:
            return importlib.import_module(".engine", __package__)
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.engine":  # the vendored engine exists but one of its imports failed
                raise
    return importlib.import_module("engine")


def engine_submodule(name: str):
    """``engine.<name>`` from wherever the engine lives (e.g. 'weights', 'registry')."""
    return importlib.import_module(f"{get_engine().__name__}.{name}")


def is_vendored() -> bool:
    return get_engine().__name__ != "engine"
