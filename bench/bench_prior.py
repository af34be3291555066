"""Benchmark: full-size Shap-E latent prior forward (ours vs diffusers.PriorTransformer), random weights.

Each measurement runs in its own subprocess (build + one warm-up + timed forwards), so peak RSS / VRAM are clean.
Ours: engine.models.latent_transformer.LatentPrior (official layout). Reference: diffusers' PriorTransformer at the
Shap-E configuration (16 heads x 64, 24 layers, width 1024, 1024 latent tokens, GELU time MLP of width 4096,
LayerNorm in, output 2048 channels; image prior: 256 grid tokens of 1024 with LayerNorm projection).

FLOPs per forward = 2 * (weights of every matmul x tokens it is applied to) + attention (QK^T and AV:
4 * B * T^2 * width per layer). Biases, norms and activations are not counted.

    python bench/bench_prior.py                         # CPU fp32, text prior, batch 2
    python bench/bench_prior.py --cond image
    python bench/bench_prior.py --device cuda           # fp16 autocast; adds 64-step sampling at batch 1 and 4
    python bench/bench_prior.py --sampling --sampling-calls 2   # CPU: time 2 guided calls, extrapolate to 2n-1

On CPU the full 64-step sampling (127 network calls on a batch of 2B) takes far too long to run: with
``--sampling`` the script times ``--sampling-calls`` guided Heun network calls and reports the extrapolated total,
labelled as such. On CUDA the full sampling loop runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIFFUSERS_CONFIG = {
    "text": dict(num_attention_heads=16, attention_head_dim=64, num_layers=24, embedding_dim=1024,
                 num_embeddings=1024, additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer",
                 embedding_proj_norm_type="layer", encoder_hid_proj_type=None, added_emb_type=None,
                 time_embed_dim=4096, embedding_proj_dim=768, clip_embed_dim=2048),
    "image": dict(num_attention_heads=16, attention_head_dim=64, num_layers=24, embedding_dim=1024,
                  num_embeddings=1024, additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer",
                  embedding_proj_norm_type="layer", encoder_hid_proj_type=None, added_emb_type=None,
                  time_embed_dim=4096, embedding_proj_dim=1024, clip_embed_dim=2048),
}


# ---------------------------------------------------------------------------------------------------------------
# worker side


def _flops(cond: str, batch: int) -> float:
    from engine.config import official_bundle

    cfg = official_bundle("text300M" if cond == "text" else "image300M").prior
    w, ctx, c = cfg.width, cfg.latent_ctx, cfg.token_channels
    n_prefix = 2 if cond == "text" else 1 + cfg.clip_grid_tokens
    tokens = ctx + n_prefix
    per_layer = 12 * w * w * tokens + 2 * tokens * tokens * w  # matmul MACs: qkv+proj+mlp, QK^T + AV
    macs = cfg.layers * per_layer
    macs += ctx * c * w + ctx * w * cfg.output_channels  # input_proj, output_proj
    macs += 2 * 4 * w * w  # time MLP on one token
    macs += (cfg.clip_dim * w) * (1 if cond == "text" else cfg.clip_grid_tokens)
    return 2.0 * macs * batch


def _build(impl: str, cond: str, device):
    import torch

    if impl == "ours":
        from engine.config import official_bundle
        from engine.models.latent_transformer import LatentPrior

        model = LatentPrior(official_bundle("text300M" if cond == "text" else "image300M").prior, device="meta")
        model = model.to_empty(device=device)
        model.init_weights(torch.Generator(device=device).manual_seed(0) if device.type == "cuda" else
                           torch.Generator().manual_seed(0))
        torch.nn.init.normal_(model.wrapped.output_proj.weight, std=0.01)  # non-zero output
        return model.eval()
    from diffusers import PriorTransformer

    torch.manual_seed(0)  # diffusers initialises with the global RNG (bench only)
    return PriorTransformer(**DIFFUSERS_CONFIG[cond]).to(device).eval()


def _inputs(impl: str, cond: str, batch: int, device):
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1024 * 1024, generator=g).to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    c = (torch.randn(batch, 768, generator=g) if cond == "text" else torch.randn(batch, 1024, 256, generator=g))
    c = c.to(device)
    if impl == "ours":
        return lambda m: m(x, t, c)
    emb = c if cond == "text" else c.transpose(1, 2)  # diffusers takes grid tokens as (B, 256, 1024)
    hs = x.view(batch, 1024, 1024)
    return lambda m: m(hs, timestep=t, proj_embedding=emb).predicted_image_embedding


class _DiffusersPrior:
    """Adapter: diffusers' model as a ``predict_x0`` prior for the sampling timing."""

    def __init__(self, model, cond):
        self.model, self.cond = model, cond

    def predict_x0(self, x, t, c):
        emb = c if self.cond == "text" else c.transpose(1, 2)
        out = self.model(x.view(x.shape[0], 1024, 1024), timestep=t, proj_embedding=emb).predicted_image_embedding
        return out[..., :1024].reshape(x.shape[0], -1)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sampling(model, impl, cond, batch, device, steps, calls_limit, autocast):
    """Guided Heun sampling (2n-1 calls on 2B). calls_limit > 0: stop after that many calls and extrapolate."""
    import torch

    from engine.diffusion.denoisers import ClassifierFreeGuidance, KarrasDenoiser
    from engine.diffusion.samplers import network_calls, sample_heun
    from engine.diffusion.schedules import exp_alphas_cumprod, karras_sigmas

    prior = model if impl == "ours" else _DiffusersPrior(model, cond)
    den = ClassifierFreeGuidance(KarrasDenoiser(prior, exp_alphas_cumprod()), 15.0)
    sigmas = karras_sigmas(steps, 1e-3, 160.0).to(device)
    c = torch.randn(batch, 768) if cond == "text" else torch.randn(batch, 1024, 256)
    x = torch.randn(batch, 1024 * 1024, device=device) * 160
    total = network_calls("heun", steps)
    done = []

    def cancel():
        return 0 < calls_limit <= len(done)

    def counted(x_, s_, c_):
        out = den(x_, s_, c_)
        done.append(1)
        return out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
            sample_heun(counted, x, sigmas, cond=c.to(device), should_cancel=cancel)
    except Exception as err:  # GenerationCancelled ends the partial run
        if type(err).__name__ != "GenerationCancelled":
            raise
    _sync(device)
    elapsed = time.perf_counter() - t0
    n = len(done)
    return {"batch": batch, "calls_timed": n, "calls_total": total, "seconds": elapsed * total / n,
            "extrapolated": n < total,
            "peak_vram_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    t0 = time.perf_counter()
    model = _build(args.impl, args.cond, device)
    _sync(device)
    load_s = time.perf_counter() - t0
    run = _inputs(args.impl, args.cond, args.batch, device)
    times, cpu_times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
        for i in range(args.warmup + args.repeats):
            _sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            out = run(model)
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t1)
                cpu_times.append(time.process_time() - c1)
    res = {
        "impl": args.impl, "cond": args.cond, "device": str(device), "batch": args.batch,
        "threads": torch.get_num_threads(), "load_s": load_s, "forward_s": times, "cpu_s": cpu_times,
        "out_shape": list(out.shape), "gflop": _flops(args.cond, args.batch) / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_vram_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "loadavg": os.getloadavg()[0],
    }
    if args.sampling or device.type == "cuda":
        limit = 0 if device.type == "cuda" else args.sampling_calls
        batches = [1, 4] if device.type == "cuda" else [1]
        res["sampling"] = [_sampling(model, args.impl, args.cond, b, device, args.steps, limit, autocast)
                           for b in batches]
    return res


def gemm_ceiling(device: str, threads: int) -> float:
    """GFLOP/s of one plain fp32 GEMM of the prior's biggest shape (2052 x 1024 @ 1024 x 4096: the MLP's c_fc at
    batch 2), best of 5: the rate neither implementation can beat in fp32 on this machine."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    a, w = torch.randn(2052, 1024, device=dev), torch.randn(4096, 1024, device=dev)
    best = float("inf")
    for _ in range(6):
        _sync(dev)
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * 2052 * 1024 * 4096 / best / 1e9


# ---------------------------------------------------------------------------------------------------------------
# driver side


def _spawn(args, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--device", args.device, "--cond", args.cond,
           "--batch", str(args.batch), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--sampling-calls", str(args.sampling_calls), "--threads", str(args.threads)]
    if args.sampling:
        cmd.append("--sampling")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"worker {impl} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(results: dict[str, dict], args) -> str:
    rows = []
    head = (f"{'impl':<10} {'s/forward':>10} {'CPU s':>8} {'GFLOP/s':>9} {'peak RSS MB':>12} {'peak VRAM MB':>13} "
            f"{'load s':>7}")
    rows.append(head)
    for impl, r in results.items():
        if impl == "_ceiling":
            continue
        best = min(r["forward_s"])
        vram = f"{r['peak_vram_mb']:.0f}" if r["peak_vram_mb"] is not None else "-"
        rows.append(f"{impl:<10} {best:>10.3f} {min(r['cpu_s']):>8.2f} {r['gflop'] / best:>9.1f} "
                    f"{r['peak_rss_mb']:>12.0f} {vram:>13} "
                    f"{r['load_s']:>7.1f}")
    ceiling = results.get("_ceiling")
    if ceiling:
        rows.append(f"fp32 GEMM ceiling on this machine (one {ceiling['shape']} GEMM): {ceiling['gflops']:.1f} GFLOP/s; "
                    + ", ".join(f"{impl} at {r['gflop'] / min(r['forward_s']) / ceiling['gflops']:.0%} of it"
                                for impl, r in results.items() if impl != "_ceiling"))
    if {"ours", "diffusers"} <= results.keys():
        ratio = min(results["ours"]["forward_s"]) / min(results["diffusers"]["forward_s"])
        cpu = min(results["ours"]["cpu_s"]) / min(results["diffusers"]["cpu_s"])
        rows.append(f"ratio ours/diffusers: wall time {ratio:.3f}, process CPU time {cpu:.3f}")
    for impl, r in results.items():
        for s in (r.get("sampling", []) if impl != "_ceiling" else []):
            label = (f"EXTRAPOLATED from {s['calls_timed']} of {s['calls_total']} calls" if s["extrapolated"]
                     else f"measured, {s['calls_total']} calls")
            vram = f", peak VRAM {s['peak_vram_mb']:.0f} MB" if s["peak_vram_mb"] is not None else ""
            rows.append(f"{impl:<10} sampling {args.steps} Heun steps, batch {s['batch']} (CFG, net batch "
                        f"{2 * s['batch']}): {s['seconds']:.1f} s [{label}]{vram}")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cond", choices=["text", "image"], default="text")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--impl", choices=["ours", "diffusers", "both"], default="both")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards per subprocess")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="alternate subprocesses this many times (noisy hosts)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--sampling", action="store_true", help="also time guided Heun sampling (always on for CUDA)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--sampling-calls", type=int, default=2, help="CPU: network calls to time before extrapolating")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.impl = args.worker
        print(json.dumps(worker(args)))
        return
    impls = ["ours", "diffusers"] if args.impl == "both" else [args.impl]
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for impl in impls:
            r = _spawn(args, impl)
            if impl in results:  # keep every timing, the table reports the best
                results[impl]["forward_s"] += r["forward_s"]
                results[impl]["cpu_s"] += r["cpu_s"]
                results[impl]["peak_rss_mb"] = max(results[impl]["peak_rss_mb"], r["peak_rss_mb"])
            else:
                results[impl] = r
    first = next(iter(results.values()))
    if first["device"] == "cpu":
        results["_ceiling"] = {"gflops": gemm_ceiling("cpu", args.threads), "shape": "2052x1024 @ 1024x4096"}
    print(f"Shap-E {args.cond} prior, full size, batch {args.batch}, {first['device']}, "
          f"{'fp16 autocast' if first['device'].startswith('cuda') else 'fp32'}, {first['threads']} threads, "
          f"{first['gflop']:.0f} GFLOP/forward, load avg {first['loadavg']:.1f}; best of "
          f"{len(first['forward_s'])} timed forwards")
    print(_table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
