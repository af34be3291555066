"""``python -m engine eval``: the MINI-DATASET.md metrics of a model on the procedural world.

For text and image conditioning, on every held-out (shape, colour) pair x aspect and on a sample of trained kinds,
several seeds each: shape accuracy, mean IoU, colour accuracy and CLIP R-precision (mini CLIP), plus seed
diversity (spread of the fitted yaw for yawed shapes and of the mean colour across seeds of one prompt). Text
prompts can come in several phrasings per kind (``--phrasings``), image prompts are one view per kind and seed.
Every number comes from meshes generated through ``engine.pipeline.generate``: the same path as the CLI.
Diagnostics: ``--ceiling`` (engine.eval.ceiling), the same metrics for encoded-and-decoded instances of each kind,
i.e. with a perfect prior; ``--additive-ceiling``, the latents a prior composing (shape, aspect) + colour
additively from the trained kinds' mean latents would give; ``--prior-error`` (engine.eval.prior_error), each
prior's x0 error per noise level; ``--clip-retrieval`` (engine.eval.clip_retrieval), what the mini CLIP
itself reads off the image prompts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..records import EngineError, GenerationRequest
from ..training.world import ASPECTS, YAWED_SHAPES, ObjectSpec, allowed_kinds, kind_from_index
from .metrics import mean_color_srgb, r_precision, score_mesh


@dataclass
class Tally:
    shape: list = field(default_factory=list)
    iou: list = field(default_factory=list)
    color: list = field(default_factory=list)
    kinds: list = field(default_factory=list)
    meshes: list = field(default_factory=list)
    yaw_spread: list = field(default_factory=list)
    color_spread: list = field(default_factory=list)
    predicted: list = field(default_factory=list)  # (shape, aspect, colour) the metric read off each mesh
    elevations: list = field(default_factory=list)  # image prompts: the view's elevation (degrees), per answer
    phrasing: list = field(default_factory=list)  # text prompts: the index of the prompt's phrasing, per answer
    seconds: float = 0.0

    def add(self, kind: int, mesh, score: dict) -> None:
        self.predicted.append((score["pred_shape"], score["pred_aspect"], score["pred_color"]))
        self.shape.append(score["shape_correct"])
        self.iou.append(score["iou"])
        self.color.append(score["color_correct"])
        self.kinds.append(kind)
        self.meshes.append(mesh)

    def row(self, rprec: float | None) -> dict:
        n = len(self.shape)
        return {"n": n, "shape_acc": float(np.mean(self.shape)) if n else 0.0,
                "mean_iou": float(np.mean(self.iou)) if n else 0.0,
                "color_acc": float(np.mean(self.color)) if n else 0.0, "r_precision": rprec,
                "yaw_spread_deg": float(np.mean(self.yaw_spread)) if self.yaw_spread else None,
                "color_spread": float(np.mean(self.color_spread)) if self.color_spread else None,
                "s_per_item": self.seconds / max(n, 1), **self.error_breakdown(),
                **({"by_elevation": self.by_elevation()} if self.elevations else {}),
                **({"by_phrasing": self.by_phrasing()} if len(set(self.phrasing)) > 1 else {})}

    def by_elevation(self, edges=(-10.0, 10.0, 30.0, 50.0)) -> dict:
        """Shape and colour accuracy of image prompts by the elevation of the view they were rendered from."""
        el = np.asarray(self.elevations)
        return {f"{lo:g} to {hi:g} deg": self._accuracy((el >= lo) & ((el < hi) | (hi == edges[-1])))
                for lo, hi in zip(edges[:-1], edges[1:])}  # the last bin includes its upper edge

    def by_phrasing(self) -> dict:
        """Shape and colour accuracy of text prompts by phrasing (the index into ``text_prompts``)."""
        ph = np.asarray(self.phrasing)
        return {str(j): self._accuracy(ph == j) for j in sorted(set(self.phrasing))}

    def _accuracy(self, m: np.ndarray) -> dict:
        shape, color = np.asarray(self.shape), np.asarray(self.color)
        acc = (lambda v: float(v[m].mean())) if m.any() else (lambda v: None)
        return {"n": int(m.sum()), "shape_acc": acc(shape), "color_acc": acc(color)}

    def error_breakdown(self) -> dict:
        """How the wrong answers are wrong: another shape, the right shape in another aspect, another colour."""
        shape = aspect = color = 0
        misses = []
        for k, (ps, pa, pc), ok_shape, ok_color in zip(self.kinds, self.predicted, self.shape, self.color):
            if ok_shape and ok_color:
                continue
            s, a, c = kind_from_index(k)
            shape += ps != s
            aspect += ps == s and pa != a
            color += pc != c
            got = "empty mesh" if ps < 0 else ObjectSpec(ps, pa, pc).describe()
            misses.append(f"{ObjectSpec(s, a, c).describe()} -> {got}")
        return {"wrong_shape": shape, "wrong_aspect_only": aspect, "wrong_color": color, "misses": misses}


def prompt_for(spec: ObjectSpec) -> str:
    return f"a {spec.describe()}"


def text_prompts(spec: ObjectSpec, n: int = 1) -> list[str]:
    """The first ``n`` phrasings of a text prompt: ``prompt_for`` (what every figure before ``--phrasings`` used),
    then the other caption templates filled with the kind's plain words (``training.captions.phrasings``)."""
    from ..training.captions import phrasings

    prompts = [prompt_for(spec)] + phrasings(spec)[1:]  # phrasings' first is prompt_for with 'an' where due
    if not 1 <= n <= len(prompts):
        raise EngineError(f"--phrasings must be between 1 and {len(prompts)}, got {n}",
                          f"use --phrasings {len(prompts)} for every caption template")
    return prompts[:n]


def condition_view(kind: int, seed: int) -> tuple[float, torch.Tensor]:
    """The target's yaw (radians) and the camera direction of the image prompt for (kind, seed).

    Seeded per (kind, seed), so every prompt of the evaluation gets its own view; one view per seed shared by all
    kinds would score the image prior on a handful of views only.
    """
    from ..training.render_world import CONDITION_ELEV_DEG, random_view_directions

    g = torch.Generator().manual_seed(10_000 + 1_000 * seed + kind)
    yaw = float(torch.rand(1, generator=g)) * np.pi / 2
    return (yaw if kind_from_index(kind)[0] in YAWED_SHAPES else 0.0), \
        random_view_directions(1, g, elev_deg=CONDITION_ELEV_DEG)


def condition_image(spec: ObjectSpec, seed: int, size: int = 128, scale: float = 1.0) -> np.ndarray:
    """A render of the target from a random view and yaw on a plain background, as 8-bit sRGB (what a PNG holds);
    ``scale`` != 1 pads (> 1) or crops (< 1) its canvas about the centre (``framing.reframe``)."""
    from ..conditioning.framing import reframe
    from ..training.render_world import condition_images, to_srgb8

    yaw, direction = condition_view(spec.kind, seed)
    target = ObjectSpec(spec.shape, spec.aspect, spec.color, yaw=yaw)
    img = to_srgb8(condition_images([target], torch.Generator(), size=size, directions=direction)[0])
    return img if scale == 1.0 else reframe(img, scale)


def view_elevation_deg(kind: int, seed: int) -> float:
    return float(torch.rad2deg(torch.asin(condition_view(kind, seed)[1][0, 2])))


def evaluate(kinds: list[int], *, mode: str, model: str, seeds: int, steps: int | None, sampler: str,
             device: str, grid: int = 64, guidance: float | None = None, phrasings: int = 1,
             image_scale: float = 1.0, part_weight: float | None = None) -> Tally:
    from ..pipeline import generate

    tally = Tally()
    for k in kinds:
        s, a, c = kind_from_index(k)
        spec = ObjectSpec(s, a, c)
        t0 = time.perf_counter()
        common = dict(model=model, steps=steps, guidance_scale=guidance, sampler=sampler, grid_size=grid,
                      device=device)
        if mode == "text":  # one group of seeds per phrasing
            groups = []
            for j, prompt in enumerate(text_prompts(spec, phrasings)):
                groups.append(generate(GenerationRequest(prompt=prompt, seed=0, batch_size=seeds,
                                                         part_weight=part_weight, **common)))
                tally.phrasing += [j] * seeds
        else:
            records = []
            for seed in range(seeds):  # one image (view) per kind and seed
                records += generate(GenerationRequest(image=condition_image(spec, seed, scale=image_scale), seed=seed,
                                                      **common))
                tally.elevations.append(view_elevation_deg(k, seed))
            groups = [records]
        tally.seconds += time.perf_counter() - t0
        for records in groups:  # seed diversity: the spread across the seeds of one prompt
            yaws, cols = [], []
            for rec in records:
                sc = score_mesh(rec, spec)
                tally.add(k, rec, sc)
                if not rec.empty and len(rec.faces):
                    cols.append(mean_color_srgb(rec))
                    if s in YAWED_SHAPES and sc["shape_correct"]:
                        yaws.append(sc["yaw_deg"])
            if len(yaws) > 1:
                tally.yaw_spread.append(float(np.std(yaws)))
            if len(cols) > 1:
                tally.color_spread.append(float(np.linalg.norm(np.std(np.stack(cols), 0))))
    return tally


def _rprec(tally: Tally, clip) -> float | None:
    if clip is None or not tally.meshes:
        return None
    return r_precision(tally.meshes, tally.kinds, clip)["r_precision"]


def _fmt(x, pct=True):
    if x is None:
        return "-"
    return f"{100 * x:5.1f} %" if pct else f"{x:.3f}"


def print_table(rows: dict[str, dict]) -> None:
    print(f"{'set':28s} {'n':>4s} {'shape acc':>10s} {'mean IoU':>9s} {'colour acc':>11s} {'R-prec':>8s} "
          f"{'yaw sd':>7s} {'col sd':>7s} {'s/item':>7s}")
    for name, r in rows.items():
        yaw = "-" if r["yaw_spread_deg"] is None else f"{r['yaw_spread_deg']:.1f}"
        col = "-" if r["color_spread"] is None else f"{r['color_spread']:.3f}"
        print(f"{name:28s} {r['n']:4d} {_fmt(r['shape_acc']):>10s} {r['mean_iou']:9.3f} "
              f"{_fmt(r['color_acc']):>11s} {_fmt(r['r_precision']):>8s} {yaw:>7s} {col:>7s} "
              f"{r['s_per_item']:7.2f}")


class _OncePerMessage(logging.Filter):
    """Each distinct message once: the CPU notice would repeat for every evaluated object."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        new = record.getMessage() not in self.seen
        self.seen.add(record.getMessage())
        return new


def main(args) -> int:
    once = _OncePerMessage()
    logging.getLogger("shap_e").addFilter(once)
    try:
        return _evaluate(args)
    finally:
        logging.getLogger("shap_e").removeFilter(once)


def _evaluate(args) -> int:
    from .. import registry

    if args.mode in ("text", "both"):
        text_prompts(ObjectSpec(0, 0, 0), args.phrasings)  # a bad --phrasings fails before any work
    held = [k for k in allowed_kinds("heldout")]
    trained_all = allowed_kinds("train")
    g = torch.Generator().manual_seed(1234)
    trained = [trained_all[i] for i in torch.randperm(len(trained_all), generator=g)[: args.trained_sample]]
    splits = tuple((name, kinds) for name, kinds in (("held-out", held), ("trained", trained)) if kinds)
    modes = {"both": ["text", "image"], "none": []}.get(args.mode, [args.mode])
    if args.weights is not None:
        if args.model != "mini":
            raise EngineError("--weights replaces the embedded model's folder", "use it with --model mini")
        registry.use_mini_weights(args.weights)
    clip = None
    if args.model == "mini":
        clip = registry.load("mini", "text", "cpu").clip.model
    rows, diagnostics = {}, {}
    label = f"{args.sampler}-{args.steps or 'default'}"
    if args.guidance is not None:
        label += f", g{args.guidance:g}"
    if args.part_weight is not None:
        label += f", parts {args.part_weight:g}"
    if args.image_scale != 1.0:
        if not 0.25 <= args.image_scale <= 4.0:
            raise EngineError(f"--image-scale {args.image_scale} is out of range", "give a factor from 0.25 to 4")
        label += f", image x{args.image_scale:g}"
    if args.ceiling:  # a perfect prior's scores (encode + decode instances of each kind), then the targets
        from .ceiling import autoencoder_ceiling, ground_truth_meshes

        for what, score in (("autoencoder ceiling", lambda ks: autoencoder_ceiling(ks, model=args.model,
                                                                                   seeds=args.seeds)),
                            ("ground-truth meshes", ground_truth_meshes)):
            for split, kinds in splits:
                tally = score(kinds)
                name = f"{what} {split}"
                rows[name] = tally.row(_rprec(tally, clip))
                print_table({name: rows[name]})
    if args.additive_ceiling:  # a prior that composes (shape, aspect) + colour additively in latent space
        from .ceiling import additive_ceiling

        for split, kinds in splits:
            tally, fit_mse = additive_ceiling(kinds, model=args.model, instances=args.seeds)
            name = f"additive composition {split}"
            rows[name] = {**tally.row(_rprec(tally, clip)), "fit_mse_train_means": fit_mse}
            print_table({name: rows[name]})
    if args.prior_error:
        from .prior_error import print_prior_error, prior_error

        for split, kinds in splits:
            for mode, res in prior_error(kinds, model=args.model, modes=("text", "image")).items():
                diagnostics[f"{mode} prior x0 error {split}"] = res
                print_prior_error(f"{mode} prior x0 error, {split}", res)
    if args.clip_retrieval:
        from .clip_retrieval import image_prompt_retrieval, print_probe, print_retrieval, text_prompt_probe

        embedder = registry.load(args.model, "image", "cpu").clip
        if args.model == "mini":  # the probe's labels are the mini world's kinds
            diagnostics["text prompt CLIP probe held-out"] = res = text_prompt_probe(embedder)
            print_probe(res)
        for split, kinds in splits:
            res = image_prompt_retrieval(kinds, embedder, seeds=args.seeds)
            diagnostics[f"image prompt CLIP retrieval {split}"] = res
            print_retrieval(f"image prompts' CLIP retrieval, {split}", res)
    for mode in modes:
        for split, kinds in splits:
            tally = evaluate(kinds, mode=mode, model=args.model, seeds=args.seeds, steps=args.steps,
                             sampler=args.sampler, device=args.device, guidance=args.guidance,
                             phrasings=args.phrasings if mode == "text" else 1,
                             image_scale=args.image_scale, part_weight=args.part_weight)
            name = f"{mode} {split} ({label})"
            rows[name] = tally.row(_rprec(tally, clip))
            print_table({name: rows[name]})
            r = rows[name]
            print(f"  wrong answers: another shape {r['wrong_shape']}, the shape in another aspect "
                  f"{r['wrong_aspect_only']}, another colour {r['wrong_color']} (of {r['n']}; --json lists them)")
            if "by_elevation" in r:
                print("  by view elevation (shape / colour acc): " + ", ".join(
                    f"{b} n={v['n']} {_fmt(v['shape_acc'])} / {_fmt(v['color_acc'])}"
                    for b, v in r["by_elevation"].items()))
            if "by_phrasing" in r:
                prompts = text_prompts(ObjectSpec(0, 0, 0), args.phrasings)  # the phrasings, shown for a red cube
                for j, v in r["by_phrasing"].items():
                    print(f"  phrasing {j} ({prompts[int(j)]!r}): n={v['n']} shape {_fmt(v['shape_acc'])}, "
                          f"colour {_fmt(v['color_acc'])}")
    print()
    phr = f", text: {args.phrasings} phrasings x {args.seeds} seeds" if args.phrasings > 1 else ""
    print(f"model {args.model}, {args.seeds} seeds per kind{phr}, {len(held)} held-out kinds "
          f"({len(held) // len(ASPECTS)} pairs x {len(ASPECTS)} aspects), {len(trained)} trained kinds")
    if rows:
        print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({**rows, **diagnostics}, indent=1))
    return 0
