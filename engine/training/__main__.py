"""Training commands: reproduce (every stage of one run), shipped (the shipped weights' whole chain), export.

``reproduce`` runs stages a -> b -> encode -> c (text, image) -> export in one call; ``shipped`` runs the chain
that made the shipped weights (one such call, then the CPU fine-tunes; ``recipe``).

    python -m engine.training shipped --out runs/shipped --device auto                 # the shipped weights' chain
    python -m engine.training reproduce --out runs/mini --device auto --preset gpu   # one H100: ~13 min in all
    python -m engine.training reproduce --out runs/mini --device cuda --preset gpu --time-budget 480  # 8 min
    python -m engine.training reproduce --out runs/mini --device cpu --preset cpu    # 2-core CPU: see PRESETS
    python -m engine.training export --out runs/mini                                 # only re-export
    python -m engine.training reproduce --out runs/priors --preset gpu-priors --from-weights engine/weights/mini
        # keep an exported CLIP + transmitter (e.g. after finetune_decoder) and retrain only encode + priors
    python -m engine.training export --out runs/ft --from-weights engine/weights/mini --export-to runs/ft/export
        # a run with only text_prior/ and/or image_prior/ (train_prior --init fine-tunes) + that folder's rest

Each stage writes into its own folder under --out and is skipped when its final output already exists, so an
interrupted reproduction resumes where it stopped (the running stage resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

DEFAULT_EXPORT = Path(__file__).resolve().parents[1] / "weights" / "mini"

# Step counts / batch sizes of the shipped weights ("gpu") and a CPU fallback. Batches are per process.
PRESETS: dict[str, dict] = {
    "gpu": {  # one H100, from the costs below: CLIP 3.5 min, transmitter 5.3 min, encoding 20 s, priors 2 min
        # each -> about 13 min in all; with --time-budget every stage is cut to fit
        "clip": {"steps": 3000, "batch": 256, "bank": 8192},
        "transmitter": {"steps": 3000, "batch": 64, "bank": 4096, "eval_every": 1000},
        "encode": {"per_kind": 24, "cond_views": 4},
        # condition noise: what lifted held-out accuracy most in the CPU cycles (docs/MINI-MODEL.md)
        "text_prior": {"steps": 8000, "batch": 256, "cond_noise": 0.04},
        "image_prior": {"steps": 8000, "batch": 256, "cond_noise": 0.05},
    },
    "gpu-short": {  # what one H100 call of ~4.5 min can do: CLIP from a render bank, short EMA horizons
        "clip": {"steps": 1000, "batch": 256, "bank": 4096},
        "transmitter": {"steps": 750, "batch": 64, "bank": 3072, "eval_every": 0, "ema_decay": 0.99,
                        "warmup": 80, "lr": 1e-3},
        "encode": {"per_kind": 12, "cond_views": 3},
        "text_prior": {"steps": 1500, "batch": 256, "ema_decay": 0.995, "warmup": 100},
        "image_prior": {"steps": 1500, "batch": 256, "ema_decay": 0.995, "warmup": 100},
    },
    "gpu-priors": {  # with --from-weights: one H100 call of ~8 min (encode ~30 s, priors 0.017 s/step each)
        "encode": {"per_kind": 32, "cond_views": 4},
        # condition noise: what lifted held-out accuracy in the CPU cycles (docs/MINI-MODEL.md) at the milder level
        # snapshots: more CPU training fitted the trained kinds better and the held-out ones worse (docs), so
        # the run keeps one every 1,500 steps for the evaluation to choose from
        "text_prior": {"steps": 12000, "batch": 256, "ema_decay": 0.999, "warmup": 300, "cond_noise": 0.03,
                       "snapshot_every": 1500},
        "image_prior": {"steps": 12000, "batch": 256, "ema_decay": 0.999, "warmup": 300, "cond_noise": 0.05,
                        "snapshot_every": 1500},
    },
    "cpu-priors": {  # with --from-weights: fine-tune both exported priors on a 2-core CPU (encoding 2952 objects
        # 14 min; text 1.9 s per step, 20 min; image 2.9 s per step, 31 min), a step of the shipped weights
        "encode": {"per_kind": 12, "cond_views": 3},
        "text_prior": {"steps": 650, "batch": 64, "ema_decay": 0.99, "warmup": 20, "lr": 3e-4},
        "image_prior": {"steps": 650, "batch": 64, "ema_decay": 0.99, "warmup": 20, "lr": 3e-4},
        "init_from_weights": True,
    },
    "smoke-priors": {  # with --from-weights: the cpu-priors chain at toy sizes (the recipe's smoke test)
        "encode": {"per_kind": 1, "cond_views": 1, "kind_stride": 41, "supersample": 1},
        "text_prior": {"steps": 2, "batch": 4},
        "image_prior": {"steps": 2, "batch": 4},
        "init_from_weights": True,
    },
    "cpu": {  # ~3.5 h on the 2-core CPU from measured per-step costs (CLIP 1.4 s at b64, transmitter 2.0 s at b8,
        # encoding 0.28 s per object, prior 1.9 s at b64, so ~1 s at b32); not run end to end
        "clip": {"steps": 1500, "batch": 64},
        "transmitter": {"steps": 2000, "batch": 8, "bank": 384, "eval_every": 500, "eval_objects": 16},
        "encode": {"per_kind": 4, "cond_views": 2},
        "text_prior": {"steps": 2500, "batch": 32},
        "image_prior": {"steps": 2500, "batch": 32},
    },
    "probe": {  # timing probe: per-step costs of every stage at the gpu preset's batch sizes
        "clip": {"steps": 100, "batch": 256},
        "transmitter": {"steps": 300, "batch": 64, "bank": 4096, "eval_every": 0},
        "encode": {"per_kind": 24, "cond_views": 4},
        "text_prior": {"steps": 300, "batch": 256},
        "image_prior": {"steps": 300, "batch": 256},
    },
    "smoke": {  # seconds-scale plumbing check (tests); the weights are useless
        "clip": {"steps": 2, "batch": 8, "bank": 16, "partial_captions": 0.3},
        "transmitter": {"steps": 2, "batch": 2, "bank": 4, "eval_every": 0, "eval_objects": 2,
                        "bank_surface": 256, "n_surface": 64, "n_near": 64, "n_uniform": 64},
        "encode": {"per_kind": 1, "cond_views": 1, "kind_stride": 41, "supersample": 1},
        "text_prior": {"steps": 2, "batch": 4},
        "image_prior": {"steps": 2, "batch": 4},
    },
}


STAGES = ("clip", "transmitter", "encode", "text_prior", "image_prior")
EXPORT_RESERVE_S = 20.0  # what --time-budget keeps for the export after the last stage


def estimated_seconds(stage: str, cfg: dict) -> float:
    """A stage's time on one H100 from the costs the shipped weights' GPU run measured (mini.json, ``gpu-short``):
    CLIP 0.07 s per step at batch 256 plus 4 ms per banked render, transmitter 0.1 s per step at batch 64 plus
    3.5 ms per banked object, encoding 3.3 ms per object, a prior 15 ms per step at batch 256. ``--time-budget``
    shares the time by these (only their ratios matter: every trainer times its own steps)."""
    if stage == "clip":
        return cfg["steps"] * 0.07 * cfg["batch"] / 256 + cfg.get("bank", 0) * 0.004
    if stage == "transmitter":
        return cfg["steps"] * 0.1 * cfg["batch"] / 64 + cfg.get("bank", 2048) * 0.0035
    if stage == "encode":
        from .world import allowed_kinds

        return 0.0033 * cfg["per_kind"] * len(allowed_kinds("train"))
    return cfg["steps"] * 0.015 * cfg["batch"] / 256


def stage_seconds(preset: dict, stage: str, pending: list[str], seconds_left: float) -> float:
    """``stage``'s share of ``seconds_left`` (minus the export's reserve) by the estimates of the stages still to
    run, ``stage`` first among ``pending``."""
    est = {s: estimated_seconds(s, preset[s]) for s in pending}
    return max(1.0, (seconds_left - EXPORT_RESERVE_S) * est[stage] / sum(est.values()))


def _stage(name: str, done: Path, fn, record: dict) -> None:
    if done.exists():
        print(f"[reproduce] {name}: already done ({done})", flush=True)
        record.setdefault(name, {"skipped": True})
        return
    print(f"[reproduce] {name} ...", flush=True)
    t0 = time.time()
    result = fn()
    record[name] = {"seconds": round(time.time() - t0, 1), "result": _jsonable(result)}
    print(f"[reproduce] {name}: {record[name]['seconds']} s", flush=True)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if not isinstance(v, torch.Tensor) and k != "caption_texts"}
    return x if isinstance(x, (int, float, str, bool, type(None), list)) else str(x)


def seed_from_weights(weights: str | Path, root: Path, *, missing_priors: bool = False) -> dict:
    """Write an exported folder's CLIP and transmitter as finished stage outputs of the run in ``root``.

    The priors are trained on latents of exactly this encoder, so the result stays consistent with the decoder
    (fine-tuned or not) that ships next to them. With ``missing_priors`` (``export --from-weights``) a prior the
    run did not train (no ``<mode>_prior/prior.safetensors``) is taken over from the folder unchanged, so a run may
    fine-tune one prior only. Returns the exported folder's training record.
    """
    from safetensors.torch import save_file

    from engine.config import to_dict
    from engine.mini_weights import bundles, load_mini

    parts = load_mini("cpu", weights)  # verifies every SHA-256 first
    manifest = parts["manifest"]
    cfg = bundles(manifest)["text"]
    for stage, module, name, extra in (
            ("clip", parts["clip"], "clip", {"clip_config.json": to_dict(cfg.clip)}),
            ("transmitter", parts["transmitter"], "transmitter",
             {"transmitter_config.json": {"encoder": to_dict(cfg.encoder), "decoder": to_dict(cfg.decoder),
                                          "training": {"from_weights": str(weights)}}})):
        folder = root / stage
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous() for k, v in module.state_dict().items()},
                  str(folder / f"{name}.safetensors"))
        for fname, blob in extra.items():
            (folder / fname).write_text(json.dumps(blob, indent=2))
        _mark(folder, {"from_weights": str(weights)})
    for mode in ("text", "image") if missing_priors else ():
        target = root / f"{mode}_prior" / "prior.safetensors"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().float().contiguous() for k, v in parts[f"{mode}_prior"].state_dict().items()},
                      str(target))
    return manifest.get("training", {})


def reproduce(out: str, *, device: str = "auto", preset: str = "gpu", export_to: str | None = None,
              seed: int = 0, from_weights: str | None = None, time_budget: float = 0.0) -> dict:
    from . import train_clip
    from .encode_dataset import ClipEmbedder, clip_conditioner, encode_dataset, load_transmitter
    from .export import export_mini
    from .loop import resolve_device
    from .train_prior import PriorTrainConfig, train_prior
    from .train_transmitter import TransmitterTrainConfig, train_transmitter

    p = PRESETS[preset]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rec_path = root / "reproduce.json"
    record = json.loads(rec_path.read_text()) if rec_path.exists() else {}
    record.update({"preset": preset, "device": device, "seed": seed})
    dev = resolve_device(device)
    if dev.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(dev)
    record["host"] = platform.node()
    t_all, deadline = time.time(), time.monotonic() + time_budget
    if from_weights:
        previous = seed_from_weights(from_weights, root)
        record["from_weights"] = str(from_weights)
        retrained = ("encode", "text_prior", "image_prior", "total_seconds_this_invocation", "torch", "export",
                     "gpu")
        for key, value in previous.items():  # the records of the steps that made those weights (clip, decoder
            if key not in retrained and key not in record:  # fine-tunes, the recipe's log) stay in the manifest
                record[key] = value

    def save_record():
        rec_path.write_text(json.dumps(record, indent=2, default=str))

    if not from_weights and not {"clip", "transmitter"} <= set(p):
        raise SystemExit(f"preset {preset!r} trains only the priors: pass --from-weights")
    if time_budget:
        record["time_budget_s"] = time_budget

    def budget(stage: str) -> float:  # the stage's seconds under --time-budget (0: none)
        if not time_budget:
            return 0.0
        pending = [s for s in STAGES[STAGES.index(stage):] if s in p and not (root / s / "done").exists()]
        seconds = stage_seconds(p, stage, pending, deadline - time.monotonic())
        print(f"[reproduce] {stage}: {seconds:.0f} s of the time budget", flush=True)
        return seconds

    c = p.get("clip", {})
    _stage("clip", root / "clip" / "done", lambda: _mark(root / "clip", train_clip.main(
        ["--out", str(root / "clip"), "--steps", str(c["steps"]), "--batch", str(c["batch"]), "--device", device,
         "--seed", str(seed), "--bank", str(c.get("bank", 0)), "--max-seconds", str(budget("clip")),
         "--partial-captions", str(c.get("partial_captions", 0.0))]
        + (["--resume"] if (root / "clip" / "checkpoint.pt").exists() else []))), record)
    save_record()
    tcfg = TransmitterTrainConfig(seed=seed, **p.get("transmitter", {}))
    _stage("transmitter", root / "transmitter" / "done", lambda: _mark(root / "transmitter", train_transmitter(
        str(root / "transmitter"), replace(tcfg, max_seconds=budget("transmitter")), device=device, resume=True)),
        record)
    save_record()
    e = p["encode"]

    def encode():
        model = load_transmitter(str(root / "transmitter"), dev)
        clip = ClipEmbedder(clip_conditioner(str(root / "clip"), dev))
        blob = encode_dataset(model, str(root / "latents.pt"), clip=clip, device=dev, seed=seed, **e)
        return _mark(root / "encode", {"n_latents": len(blob["latents"]), "n_captions": len(blob["caption_texts"]),
                                       "seconds": blob["seconds"]})

    _stage("encode", root / "encode" / "done", encode, record)
    save_record()
    for mode in ("text", "image"):
        init = str(Path(from_weights) / f"{mode}_prior.safetensors") if from_weights and p.get("init_from_weights") \
            else ""
        pc = PriorTrainConfig(cond=mode, seed=seed, init=init, **p[f"{mode}_prior"])
        folder = root / f"{mode}_prior"
        _stage(f"{mode}_prior", folder / "done", lambda pc=pc, folder=folder, mode=mode: _mark(folder, train_prior(
            str(root / "latents.pt"), str(folder), replace(pc, max_seconds=budget(f"{mode}_prior")), device=device,
            resume=True)), record)
        save_record()
    record["total_seconds_this_invocation"] = round(time.time() - t_all, 1)
    record["torch"] = torch.__version__
    meta = export_mini(root, export_to or DEFAULT_EXPORT, training=record)
    record["export"] = {"dir": str(export_to or DEFAULT_EXPORT), "total_bytes": meta["total_bytes"]}
    save_record()
    print(f"[reproduce] exported {meta['total_bytes'] / 1e6:.2f} MB to {export_to or DEFAULT_EXPORT}", flush=True)
    return record


def _mark(folder: Path, result):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done").write_text(json.dumps(_jsonable(result), default=str))
    return result


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["shipped"]:
        from .recipe import main as shipped

        return shipped(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m engine.training", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("shipped", add_help=False, help="the whole chain of the shipped weights (--help for its options)")
    r = sub.add_parser("reproduce", help="run every stage and export the weights")
    r.add_argument("--out", default="runs/mini")
    r.add_argument("--device", default="auto")
    r.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    r.add_argument("--export-to", default=None, help=f"default: {DEFAULT_EXPORT}")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--from-weights", default=None,
                   help="exported mini folder whose CLIP + transmitter are kept (only encode + priors are trained)")
    r.add_argument("--time-budget", type=float, default=0.0,
                   help="finish within this many seconds (e.g. one GPU session's call): each training stage gets "
                        "its share of the time left by its estimated cost and cuts its steps to fit (0: off)")
    x = sub.add_parser("export", help="export a finished run")
    x.add_argument("--out", default="runs/mini")
    x.add_argument("--export-to", default=None)
    x.add_argument("--from-weights", default=None,
                   help="exported mini folder that supplies the CLIP + transmitter (and the training record) of a "
                        "run that only trained priors (its text_prior/ and/or image_prior/ folders; a prior it lacks"
                        " is taken over from that folder unchanged)")
    a = ap.parse_args(argv)
    if a.cmd == "reproduce":
        reproduce(a.out, device=a.device, preset=a.preset, export_to=a.export_to, seed=a.seed,
                  from_weights=a.from_weights, time_budget=a.time_budget)
    else:
        from .export import export_mini

        rec = Path(a.out) / "reproduce.json"
        info = json.loads(rec.read_text()) if rec.exists() else {}
        if a.from_weights:
            root = Path(a.out)
            if any((root / stage).exists() for stage in ("clip", "transmitter")):
                raise SystemExit(f"{root} has its own clip/ or transmitter/ stage: export without --from-weights")
            info = {**seed_from_weights(a.from_weights, root, missing_priors=True), **info}
        meta = export_mini(a.out, a.export_to or DEFAULT_EXPORT, training=info)
        print(f"exported {meta['total_bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
