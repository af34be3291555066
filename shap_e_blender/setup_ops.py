"""Setup operators: download the official weights (SHA-256 verified, cancellable) and install dependencies.

Both run as background jobs (jobs.py) with a progress bar in the preferences. Downloads go through the engine's
``weights.ensure_file`` (registry of URLs + SHA-256, temp file + os.replace, so a cancelled or broken download
never leaves a file that looks complete) and only when Blender's "Allow Online Access" is on. The installer runs
pip in a subprocess from the worker, into the extension's user directory, after a confirmation dialog.
"""

from __future__ import annotations

import os
from pathlib import Path

import bpy

from . import deps, session
from .preferences import models_dir, site_packages_dir

MODELS_ENV = "SHAP_E_MODELS_DIR"  # read by engine.weights.cache_dir()
OFFICIAL_FILES = ("text_cond.pt", "image_cond.pt", "vector_decoder.pt", "ViT-L-14.pt")


def configure_models_dir(context=None) -> str:
    """Point the engine at the preferences' models folder (an environment variable: no engine import)."""
    path = models_dir(context)
    os.environ[MODELS_ENV] = path
    return path


def official_file_names(weights) -> list[str]:
    reg = next((getattr(weights, a) for a in ("REGISTRY", "FILES", "KNOWN_FILES") if hasattr(weights, a)), None)
    if isinstance(reg, dict):
        known = [n for n in OFFICIAL_FILES if n in reg]
        return known or [n for n in reg if not n.startswith("mini")]
    return list(OFFICIAL_FILES)


def _print_manual_instructions(folder: str) -> None:
    try:
        from .engine_shim import engine_submodule

        weights = engine_submodule("weights")
        for name in official_file_names(weights):
            entry = weights.REGISTRY[name]
            print("[shap-e] " + weights.manual_instructions(entry.url, entry.sha256, Path(folder) / name))
    except Exception as err:  # noqa: BLE001 - instructions are a courtesy; the hint still names the files
        print(f"[shap-e] could not list download URLs: {err}")


def _progress_reporter(ctx, index: int, count: int, name: str):
    def progress(*args):
        done, total = (args[-2], args[-1]) if len(args) >= 2 else (args[0], 0)
        frac = (done / total) if total else 0.0
        mb = f"{done / 1e6:.0f}/{total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
        ctx.report((index + frac) / count, f"{name} ({index + 1}/{count}): {mb}")

    return progress


class SHAP_E_OT_download_models(bpy.types.Operator):
    """Download the official Shap-E weights (several GB; SHA-256 verified; Cancel stops between chunks)"""

    bl_idname = "shap_e.download_models"
    bl_label = "Download official models"

    def execute(self, context):
        if not bpy.app.online_access:
            _print_manual_instructions(models_dir(context))
            session.report_error(RuntimeError("Online access is disabled in Blender"))
            session.ui.hint = (f"Enable Preferences > System > Network > Allow Online Access, or download "
                               f"{', '.join(OFFICIAL_FILES)} by hand into {models_dir(context)} "
                               "(the system console lists their URLs and SHA-256 sums)")
            self.report({"ERROR"}, session.ui.hint)
            return {"CANCELLED"}
        if session.runner.busy:
            self.report({"WARNING"}, "A Shap-E job is already running")
            return {"CANCELLED"}
        configure_models_dir(context)
        from .engine_shim import engine_submodule

        weights = engine_submodule("weights")
        names = official_file_names(weights)

        def task(ctx):
            for i, name in enumerate(names):
                ctx.check_cancel()
                weights.ensure_file(name, progress=_progress_reporter(ctx, i, len(names), name),
                                    should_cancel=ctx.should_cancel)
            ctx.report(1.0, f"Downloaded and verified {len(names)} files")
            return names

        session.start_task(task, label="Downloading official models", kind="download")
        return {"FINISHED"}


class SHAP_E_OT_install_dependencies(bpy.types.Operator):
    """Install PyTorch and the other engine packages into the extension's user folder (needs internet)"""

    bl_idname = "shap_e.install_dependencies"
    bl_label = "Install Dependencies"

    def invoke(self, context, event):
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context):
        if not bpy.app.online_access:
            session.report_error(RuntimeError("Online access is disabled in Blender"))
            session.ui.hint = ("Enable Preferences > System > Network > Allow Online Access, or install torch, "
                               f"open_clip_torch and scikit-image with pip --target {site_packages_dir()}")
            self.report({"ERROR"}, session.ui.hint)
            return {"CANCELLED"}
        if session.runner.busy:
            self.report({"WARNING"}, "A Shap-E job is already running")
            return {"CANCELLED"}
        target = site_packages_dir()
        python = deps.python_executable()

        def task(ctx):
            from . import jobs

            ctx.report(0.0, "Checking pip and the GPU")
            cmds = deps.install_commands(python, target, deps.detect_gpu(), deps.missing([target]),
                                         has_pip=deps.pip_available(python))
            env = deps.install_env(target)
            for i, cmd in enumerate(cmds):
                def line(text, i=i):
                    ctx.report(i / len(cmds), text[-90:])

                code = jobs.run_subprocess(cmd, ctx, env=env, on_line=line)
                if code != 0:
                    from .engine_shim import get_engine

                    raise get_engine().EngineError(
                        f"pip failed with exit code {code}",
                        "Check the internet connection; the system console shows pip's output and command")
            deps.add_to_path(target)
            ctx.report(1.0, "Dependencies installed: restart Blender to be safe")
            return cmds

        session.start_task(task, label="Installing dependencies", kind="install")
        return {"FINISHED"}


classes = (SHAP_E_OT_download_models, SHAP_E_OT_install_dependencies)
register, unregister = bpy.utils.register_classes_factory(classes)
