"""Command line: ``python -m engine {generate,sample,decode,encode,render,download,models,eval}``.

Thin over the pipeline. Every failure the user can fix is an EngineError printed as two lines (what, what to do)
with exit status 2; outputs are written atomically, so an error never leaves a partial file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from . import variety
from .records import EngineError, GenerationCancelled, GenerationRequest

MESH_SUFFIXES = (".ply", ".obj", ".glb")


def _add_request_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt")
    src.add_argument("--image", type=Path, help="conditioning image (PNG/JPEG)")
    p.add_argument("--model", default="mini", help="mini (default, embedded), text300M, image300M")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--part-weight", type=float, default=None,
                   help="text: composed guidance over the prompt's colour and the rest, 0 (off) to 1 (default: the"
                        " model's)")
    p.add_argument("--sampler", default="heun", choices=["heun", "euler", "dpmpp_2m"])
    p.add_argument("--batch", type=int, default=1, help="number of results (seeds seed..seed+N-1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16"])
    p.add_argument("--clip-weights", type=Path, default=None,
                   help="an existing OpenAI ViT-L-14.pt for the official models (default: the weights cache)")


def _request(args, grid: int = 64) -> GenerationRequest:
    if getattr(args, "clip_weights", None) is not None:
        os.environ["SHAP_E_CLIP_WEIGHTS"] = str(args.clip_weights)
    image = name = None
    if args.image is not None:
        from .conditioning.clip import load_image

        image, name = load_image(args.image), args.image.name
    return GenerationRequest(prompt=args.prompt, image=image, image_name=name, model=args.model, seed=args.seed,
                             steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, grid_size=grid,
                             part_weight=getattr(args, "part_weight", None),
                             batch_size=args.batch, device=args.device, precision=args.precision,
                             vertex_colors=getattr(args, "vertex_colors", "auto"))


def _check_out(path: Path, suffixes: tuple[str, ...]) -> Path:
    if path.suffix.lower() not in suffixes:
        raise EngineError(f"unsupported output file type {path.suffix or '(none)'!r} for {path}",
                          f"use one of {', '.join(suffixes)}")
    if not path.parent.exists():
        raise EngineError(f"the output folder {path.parent} does not exist", "create it first")
    return path


def _numbered(path: Path, i: int, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}_{i}{path.suffix}")


def _progress(ev) -> None:
    eta = f", ETA {ev.eta_s:.0f} s" if ev.eta_s is not None else ""
    end = "\n" if ev.step == ev.total else ""
    print(f"\r[shap-e] step {ev.step}/{ev.total} (sigma {ev.sigma:.3g}){eta}   ", end=end, file=sys.stderr)


def save_latents(path: Path, latents, metadata: dict) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    tmp = Path(tempfile.mkstemp(dir=path.parent, suffix=".tmp")[1])
    try:
        save_file({"latent": np.ascontiguousarray(latents, dtype=np.float32)}, str(tmp),
                  metadata={k: str(v) for k, v in metadata.items() if v is not None})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_latents(path: Path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise EngineError(f"latent file {path} does not exist", "check the path")
    try:
        from safetensors import safe_open

        data = load_file(str(path))
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise EngineError(f"{path} is not a readable latent file ({err})",
                          "give a .safetensors file written by 'python -m engine sample'") from err
    if "latent" not in data:
        raise EngineError(f"{path} has no 'latent' tensor", "give a file written by 'python -m engine sample'")
    lat = data["latent"]
    return lat.reshape(1, -1) if lat.ndim == 1 else lat, meta


def cmd_sample(args) -> int:
    from .pipeline import generate_latents

    out = _check_out(args.out, (".safetensors",))
    req = _request(args)
    latents, seeds = generate_latents(req, on_step=_progress)
    save_latents(out, latents, {"model": req.model, "seeds": ",".join(map(str, seeds)), "prompt": req.prompt,
                                "image": req.image_name, "steps": args.steps, "guidance": args.guidance})
    print(f"[shap-e] wrote {out} (seeds {', '.join(map(str, seeds))})")
    return 0


def cmd_generate(args) -> int:
    from .geometry.mesh_io import write_mesh
    from .pipeline import generate

    out = _check_out(args.out, MESH_SUFFIXES)
    t0 = time.perf_counter()
    records = generate(_request(args, args.grid), on_step=_progress)
    for i, rec in enumerate(records):
        path = _numbered(out, i, len(records))
        if rec.empty:
            print(f"[shap-e] seed {rec.seed}: the field has no surface; nothing written for {path}", file=sys.stderr)
            continue
        write_mesh(path, rec)
        print(f"[shap-e] wrote {path}: {len(rec.vertices)} vertices, {len(rec.faces)} faces, seed {rec.seed}")
    alike = variety.repeats([r.latent for r in records if not r.empty])
    if alike:
        print(f"[shap-e] note: {alike} of the {len(records)} results are the same object as another: {variety.HINT}")
    print(f"[shap-e] done in {time.perf_counter() - t0:.1f} s")
    return 0 if any(not r.empty for r in records) else 1


def cmd_decode(args) -> int:
    from .geometry.mesh_io import write_mesh
    from .pipeline import decode_latent

    out = _check_out(args.out, MESH_SUFFIXES)
    latents, meta = load_latents(args.latent)
    model = args.model or meta.get("model", "mini")
    for i, lat in enumerate(latents):
        rec = decode_latent(lat, model=model, grid_size=args.grid, device=args.device,
                            vertex_colors=args.vertex_colors)
        path = _numbered(out, i, len(latents))
        if rec.empty:
            print(f"[shap-e] latent {i}: no surface; nothing written", file=sys.stderr)
            continue
        write_mesh(path, rec)
        print(f"[shap-e] wrote {path}: {len(rec.vertices)} vertices, {len(rec.faces)} faces")
    return 0


def cmd_encode(args) -> int:
    from .geometry.mesh_io import read_mesh
    from .pipeline import encode_mesh

    out = _check_out(args.out, (".safetensors",))
    mesh = read_mesh(args.mesh)
    latent = encode_mesh(mesh, model=args.model, device=args.device, seed=args.seed)
    save_latents(out, latent[None], {"model": args.model, "source": args.mesh.name})
    print(f"[shap-e] wrote {out}")
    return 0


def cmd_render(args) -> int:
    from .pipeline import render_latent

    out = _check_out(args.out, (".png",))
    latents, meta = load_latents(args.latent)
    image = render_latent(latents[0], model=args.model or meta.get("model", "mini"), size=args.size,
                          device=args.device)
    from PIL import Image

    tmp = out.with_name(out.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, out)
    print(f"[shap-e] wrote {out}")
    return 0


def cmd_download(args) -> int:
    from .weights import ensure_files_for

    for path in ensure_files_for(args.name, offline=args.offline):
        print(f"[shap-e] ok {path}")
    return 0


def cmd_models(args) -> int:
    from .registry import available_models

    for info in available_models():
        state = "present" if info.present else f"missing: {', '.join(info.missing)}"
        print(f"{info.name:10s} {info.kind:6s} {state:40s} {info.description}")
    return 0


def cmd_eval(args) -> int:
    from .eval.run import main as eval_main

    return eval_main(args)


def _add_vertex_colors_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vertex-colors", default="auto", choices=["auto", "query", "interpolate"],
                   help="query: the colour field at every vertex (official); interpolate: from the grid corners "
                        "(one MLP pass less); auto: interpolate from grid 128 up")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine", description="Shap-E: text or image to coloured 3D mesh")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="prompt/image -> coloured mesh file")
    _add_request_args(p)
    p.add_argument("--grid", type=int, default=64, help="marching-cubes grid: 64, 128 or 256")
    _add_vertex_colors_arg(p)
    p.add_argument("--out", type=Path, required=True, help="output .ply, .obj or .glb")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("sample", help="prompt/image -> latent (.safetensors)")
    _add_request_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("decode", help="latent -> coloured mesh file")
    p.add_argument("latent", type=Path)
    p.add_argument("--model", default=None)
    p.add_argument("--grid", type=int, default=128)
    _add_vertex_colors_arg(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=cmd_decode)

    p = sub.add_parser("encode", help="mesh (.ply/.obj/.glb) -> latent")
    p.add_argument("mesh", type=Path)
    p.add_argument("--model", default="mini")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=cmd_encode)

    p = sub.add_parser("render", help="latent -> NeRF preview PNG")
    p.add_argument("latent", type=Path)
    p.add_argument("--model", default=None)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=cmd_render)

    p = sub.add_parser("download", help="download the official weights (SHA-256 verified)")
    p.add_argument("name", help="text300M, image300M, decoder, transmitter, clip, or all")
    p.add_argument("--offline", action="store_true", help="only print manual download instructions")
    p.set_defaults(fn=cmd_download)

    p = sub.add_parser("models", help="list the models and whether their weights are present")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("eval", help="evaluate the embedded model on the procedural world")
    p.add_argument("--model", default="mini")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--trained-sample", type=int, default=24, help="number of trained kinds to sample")
    p.add_argument("--phrasings", type=int, default=1,
                   help="text prompts per kind: 1 is 'a {aspect} {colour} {shape}'; up to 11 adds the other caption"
                        " templates ('a {shape} that is {colour}', ...), each with every seed")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default="heun")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    p.add_argument("--part-weight", type=float, default=None,
                   help="text: composed guidance over the prompt's parts, 0 to 1 (default: the model's)")
    p.add_argument("--weights", type=Path, default=None,
                   help="evaluate another exported mini folder (a training run's export) instead of the shipped one")
    p.add_argument("--mode", default="both", choices=["text", "image", "both", "none"],
                   help="conditioning to evaluate ('none': only the diagnostics)")
    p.add_argument("--image-scale", type=float, default=1.0,
                   help="pad (> 1) or crop (< 1) every image prompt's canvas by this factor about its centre, to "
                        "measure how the framing of a picture matters (1.5: the object at 2/3 of its size)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--ceiling", action="store_true",
                   help="also score encoded-and-decoded instances of each kind (the metrics of a perfect prior) and"
                        " the target meshes themselves (the R-precision of perfect meshes)")
    p.add_argument("--additive-ceiling", action="store_true",
                   help="also score latents composed additively, (shape, aspect) + colour, from trained kinds' means")
    p.add_argument("--prior-error", action="store_true",
                   help="also print each prior's x0 error per noise level on encoded instances")
    p.add_argument("--clip-retrieval", action="store_true",
                   help="also retrieve each image prompt's CLIP embedding among the kind captions, and probe the"
                        " held-out text prompts' CLIP vectors linearly (what the conditioning itself tells)")
    p.set_defaults(fn=cmd_eval)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="[shap-e] %(message)s",
                        stream=sys.stderr)
    try:
        return args.fn(args)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except GenerationCancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
