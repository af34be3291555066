"""The shipped mini weights as one command: every step that made ``engine/weights/mini``, in order.

    python -m engine.training shipped --out runs/shipped --device auto     # the whole chain -> runs/shipped/weights
    python -m engine.training shipped --out runs/shipped --dry-run         # print its commands
    python -m engine.training shipped --out /tmp/toy --scale smoke         # the same chain at toy sizes (a test)

Step ``base`` is the GPU run (preset ``gpu-short``); the others are the fine-tunes that followed on a 2-core CPU,
each kept because the held-out evaluation improved (docs/MINI-MODEL.md). ``RECIPE`` lists them as data: the
numbers each step used and the ``mini.json`` training record it reproduces (a test checks the two agree).

Each step runs its commands as child processes; the commands of one step that train different priors run side by
side, one thread each when the device is the CPU (two one-thread jobs run as fast per step as one two-thread job).
A finished step leaves a marker under ``OUT/steps/`` and is skipped when the command runs again, so an interrupted
chain resumes (a prior training resumes from its checkpoint). Every step appends its commands and seconds to
``OUT/weights/mini.json`` under ``recipe``. The chain is the same recipe, not a bit-exact replay: GPU kernels and
the code of the early steps have changed since (the first decoder fine-tune ran for 12 minutes of wall time; here
it runs the number of steps that fitted in them).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PriorRun:
    """One ``train_prior`` fine-tune of a cycle (batch 64, lr 3e-4, warmup 20, EMA 0.99 in every cycle)."""

    mode: str  # "text" or "image"
    steps: int
    cond_noise: float = 0.0
    then: "PriorRun | None" = None  # a second run on top of this one, in the same lane (cycle 3's text prior)


@dataclass(frozen=True)
class Step:
    name: str
    record: str | tuple[str, ...]  # the shipped mini.json training record(s) this step reproduces
    kind: str  # "base", "decoder", "priors" (first CPU cycle: encode + both priors), "cycle"
    priors: tuple[PriorRun, ...] = ()
    decoder: dict | None = None  # finetune_decoder options


RECIPE: tuple[Step, ...] = (
    Step("base", ("clip", "transmitter", "encode", "text_prior", "image_prior"), "base"),
    Step("decoder_1", "decoder_finetune", "decoder", decoder={"steps": 1974, "objects": 384}),
    Step("priors_1", ("text_prior_finetune", "image_prior_finetune"), "priors",
         priors=(PriorRun("text", 650), PriorRun("image", 650))),
    Step("cycle_2", ("text_prior_finetune_2", "image_prior_finetune_2"), "cycle",
         priors=(PriorRun("text", 800), PriorRun("image", 650))),
    Step("cycle_3", ("text_prior_finetune_3", "image_prior_finetune_3"), "cycle",
         priors=(PriorRun("text", 600, 0.06, then=PriorRun("text", 650, 0.03)), PriorRun("image", 650, 0.05))),
    Step("cycle_4", ("text_prior_finetune_4", "image_prior_finetune_4"), "cycle",
         priors=(PriorRun("text", 900, 0.04), PriorRun("image", 650, 0.05))),
    Step("cycle_5", "image_prior_finetune_5", "cycle", priors=(PriorRun("image", 650, 0.05),)),
    Step("decoder_2", "decoder_finetune_2", "decoder",
         decoder={"steps": 4047, "objects": 768, "heldout": 96, "color-weight": 16, "prior-mix": 0.75,
                  "image-prior-guidance": 1.5}),  # the image default then; it is 1.25 now
    Step("cycle_6", "text_prior_finetune_5", "cycle", priors=(PriorRun("text", 800, 0.04),)),
    Step("decoder_3", "decoder_finetune_3", "decoder",
         decoder={"steps": 12903, "objects": 768, "heldout": 96, "color-weight": 16, "prior-mix": 0.75,
                  "image-prior-guidance": 1.5, "keep-sdf": True}),
)

# Toy sizes for --scale smoke: the same chain of commands in a minute or two.
SMOKE_PRIOR = {"steps": 2, "batch": 4}
SMOKE_DECODER = {"steps": 2, "objects": 8, "heldout": 8, "prior-objects": 4, "prior-steps": 2}


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _prior_cmd(run: PriorRun, data: Path, out: Path, init: Path, device: str, smoke: bool) -> list[str]:
    steps, batch = (SMOKE_PRIOR["steps"], SMOKE_PRIOR["batch"]) if smoke else (run.steps, 64)
    return _python("engine.training.train_prior", "--data", str(data), "--out", str(out), "--cond", run.mode,
                   "--steps", str(steps), "--batch", str(batch), "--lr", "3e-4", "--warmup", "20",
                   "--ema-decay", "0.99", "--cond-noise", str(run.cond_noise), "--device", device,
                   "--init", str(init), "--resume")


def step_commands(step: Step, out: Path, device: str, smoke: bool = False) -> tuple[list, list]:
    """(lanes, export): lanes run side by side, the commands of one lane one after another; then the export
    commands (a cycle's ``export --from-weights``), if any."""
    weights, data = out / "weights", out / "priors_1" / "latents.pt"
    if step.kind == "base":
        return [[_python("engine.training", "reproduce", "--out", str(out / "base"), "--device", device,
                         "--preset", "smoke" if smoke else "gpu-short", "--export-to", str(weights))]], []
    if step.kind == "decoder":
        opts = {**step.decoder, **(SMOKE_DECODER if smoke else {})}
        args = [a for k, v in opts.items() for a in ((f"--{k}",) if v is True else (f"--{k}", str(v)))]
        record = step.record if isinstance(step.record, str) else step.record[0]
        return [[_python("engine.training.finetune_decoder", "--weights", str(weights), *args, "--always-write",
                         "--record", record)]], []
    if step.kind == "priors":  # the cpu-priors preset: encode the training set, fine-tune both priors, export
        return [[_python("engine.training", "reproduce", "--out", str(out / step.name), "--device", device,
                         "--preset", "smoke-priors" if smoke else "cpu-priors", "--from-weights", str(weights),
                         "--export-to", str(weights))]], []
    lanes = []
    for run in step.priors:
        lane, init, folder = [], weights / f"{run.mode}_prior.safetensors", out / step.name
        while run is not None:
            target = folder / (f"{run.mode}_prior" if run.then is None else f"{run.mode}_prior_{run.cond_noise}")
            lane.append(_prior_cmd(run, data, target, init, device, smoke))
            init, run = target / "prior.safetensors", run.then
        lanes.append(lane)
    return lanes, [_python("engine.training", "export", "--out", str(out / step.name), "--from-weights",
                           str(weights), "--export-to", str(weights))]


def _names(record: str | tuple[str, ...]) -> str:
    return record if isinstance(record, str) else ", ".join(record)


def _run_lanes(lanes: list[list[list[str]]], device: str, log: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if len(lanes) > 1 and device == "cpu":
        env.update(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // len(lanes))), MKL_NUM_THREADS="1")
    with open(log, "a") as fh:
        procs = []
        for lane in lanes:
            script = " && ".join(shlex.join(cmd) for cmd in lane)
            fh.write(f"$ {script}\n")
            fh.flush()
            procs.append(subprocess.Popen(["bash", "-c", script], env=env, stdout=fh, stderr=subprocess.STDOUT))
        codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a command failed (exit codes {codes}); its output is in {log}; run the same command "
                         "again to resume from this step")


def _append_record(weights: Path, step: Step, lanes, seconds: float) -> None:
    path = weights / "mini.json"
    manifest = json.loads(path.read_text())
    manifest.setdefault("training", {}).setdefault("recipe", {})[step.name] = {
        "reproduces": step.record, "seconds": round(seconds, 1),
        "commands": [shlex.join(cmd) for lane in lanes for cmd in lane]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)


def run_recipe(out: str | Path, *, device: str = "auto", smoke: bool = False, dry_run: bool = False,
               stop_after: str | None = None) -> list[str]:
    """Run (or with ``dry_run`` print) the chain, up to and including the step ``stop_after`` (default: all of
    it). Returns the names of the steps run."""
    out = Path(out)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    done_dir, ran = out / "steps", []
    names = [step.name for step in RECIPE]
    if stop_after is not None and stop_after not in names:
        raise SystemExit(f"no step {stop_after!r} in the chain; the steps are {', '.join(names)}")
    last = names.index(stop_after) + 1 if stop_after else len(RECIPE)
    for step in RECIPE[:last]:
        lanes, export = step_commands(step, out, device, smoke)
        if dry_run:
            print(f"# {step.name} (reproduces {_names(step.record)})")
            for lane in lanes:
                print(" && ".join(shlex.join(cmd) for cmd in lane) + (" &" if len(lanes) > 1 else ""))
            if len(lanes) > 1:
                print("wait")
            for cmd in export:
                print(shlex.join(cmd))
            continue
        marker = done_dir / step.name
        if marker.exists():
            print(f"[shipped] {step.name}: already done", flush=True)
            continue
        print(f"[shipped] {step.name} (reproduces {_names(step.record)}) ...", flush=True)
        done_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        _run_lanes(lanes, device, out / "recipe.log")
        if export:
            for stage in ("clip", "transmitter"):  # left by an export that was cut off: export seeds them again
                shutil.rmtree(out / step.name / stage, ignore_errors=True)
            _run_lanes([export], device, out / "recipe.log")
        _append_record(out / "weights", step, lanes + ([export] if export else []), time.time() - t0)
        marker.write_text(f"{time.time() - t0:.1f}\n")
        ran.append(step.name)
        print(f"[shipped] {step.name}: {time.time() - t0:.0f} s", flush=True)
    return ran


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engine.training shipped", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/shipped", help="run folder; the weights end up in OUT/weights")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (the decoder fine-tunes run on the CPU)")
    ap.add_argument("--scale", choices=["full", "smoke"], default="full",
                    help="smoke: the same commands at toy sizes (useless weights; checks the chain)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    ap.add_argument("--stop-after", choices=[step.name for step in RECIPE], default=None,
                    help="run the chain up to and including this step")
    a = ap.parse_args(argv)
    run_recipe(a.out, device=a.device, smoke=a.scale == "smoke", dry_run=a.dry_run, stop_after=a.stop_after)
