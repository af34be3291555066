"""Stage (b2): fine-tune the decoder (params_proj + NeRSTF MLP) on latents of the FROZEN encoder.

The priors are trained on encoder latents, so the encoder must not change after stage (c); the decoder may: this
stage sharpens latent -> field on the same latents (SDF + STF colour losses of stage b) and keeps every latent the
priors produce meaningful. It is cheap (no encoder in the loop), so it also runs on a CPU:

    python -m engine.training.finetune_decoder --weights engine/weights/mini --seconds 900 --objects 768

``--color-head-only`` trains nothing but the STF colour rows of the field's last layer (3 of its 12 output rows,
a static layer no latent projects): the SDF and every other output stay bit-identical, so the meshes keep their
shape and only their colours can change.

``--prior-mix F`` draws a fraction F of every batch from the priors' own samples for train objects (text and
image, ``prior_targets``), each paired with its object, so that the decoder also learns to decode what generation
actually feeds it; the held-out check then scores the priors' samples for held-out objects as well.

The updated transmitter is written back (fp16) and mini.json's SHA-256 and training record are updated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..models.implicit_decoder import OUTPUT_SLOTS
from .train_transmitter import TransmitterTrainConfig, grid_points, make_bank, query_points
from .world import signed_distance_tensors


@torch.no_grad()
def encode_bank(transmitter, bank, batch: int = 16) -> torch.Tensor:
    out = []
    for s in range(0, len(bank), batch):
        idx = torch.arange(s, min(s + batch, len(bank)), device=bank.device)
        out.append(transmitter.encode_batch(bank.encoder_batch(idx), training=False))
    return torch.cat(out)  # (N, d_latent)


def losses(decoder, latents, bank, idx, tcfg, gen, noise_sd: float = 0.0, anchor=None,
           sdf_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """noise_sd: standard deviation of Gaussian noise added to the latents, so that the decoder maps a
    neighbourhood of each encoder latent (where a prior's samples land) to its object. ``anchor``: a frozen decoder
    whose SDF output replaces the object's true SDF as the target (``--keep-sdf``), so that the shapes every
    latent decodes to stay where they were while the colour learns."""
    pts, sdf = query_points(bank, idx, tcfg, gen)
    z = latents[idx]
    if noise_sd > 0:
        z = z + torch.randn(z.shape, generator=gen) * noise_sd
    out = decoder(z, pts, outputs=("sdf", "stf_rgb"))
    if anchor is None:
        target = torch.tanh(sdf * tcfg.sdf_scale)
    else:
        with torch.no_grad():
            target = anchor(z, pts, outputs=("sdf",))["sdf"]
    sdf_loss = (out["sdf"] - target).square().mean() + (out["sdf"] - target).abs().mean()
    band = (sdf.abs() < tcfg.color_band).float()
    diff = out["stf_rgb"] - bank.srgb[idx][:, None]
    color = (diff.square().mean(-1) * band).sum() / band.sum().clamp(min=1)
    return {"loss": sdf_weight * sdf_loss + tcfg.color_weight * color, "sdf": sdf_loss, "color": color}


@torch.no_grad()
def grid_iou(decoder, latents, bank, grid: int = 32) -> float:
    gp = grid_points(grid, "cpu")
    ious = []
    for s in range(0, len(latents), 8):
        idx = torch.arange(s, min(s + 8, len(latents)))
        pts = gp.expand(len(idx), -1, -1)
        pred = decoder(latents[idx], pts, outputs=("sdf",))["sdf"] > 0
        true = signed_distance_tensors(*bank.params(idx), pts) < 0
        ious.append(((pred & true).sum(1).float() / (pred | true).sum(1).float().clamp(min=1)))
    return float(torch.cat(ious).mean())


@torch.no_grad()
def surface_color_accuracy(decoder, latents, bank, points: int = 256) -> float:
    """Fraction of objects whose mean decoded colour on exact surface samples is nearest (CIELAB) their palette
    colour: the eval's colour metric without marching cubes."""
    from ..eval.metrics import nearest_palette_color

    hits = []
    for s in range(0, len(latents), 8):
        idx = torch.arange(s, min(s + 8, len(latents)))
        rgb = decoder(latents[idx], bank.surface[idx][:, :points], outputs=("stf_rgb",))["stf_rgb"]
        for i, mean in zip(idx.tolist(), rgb.float().mean(1).clamp(0, 1).numpy()):
            hits.append(nearest_palette_color(mean) == int(bank.color[i]))
    return sum(hits) / max(len(hits), 1)


def field_metrics(decoder, latents, bank, held_latents, held, held_prior=None) -> dict[str, float]:
    """IoU and surface colour of encoder latents (train, held-out), and of the priors' samples for held-out
    objects when ``held_prior`` = (latents, bank) is given."""
    out = {"train_iou": grid_iou(decoder, latents[:48], bank), "heldout_iou": grid_iou(decoder, held_latents, held),
           "train_color_acc": surface_color_accuracy(decoder, latents[:96], bank),
           "heldout_color_acc": surface_color_accuracy(decoder, held_latents, held)}
    if held_prior is not None:
        out["heldout_prior_iou"] = grid_iou(decoder, *held_prior)
        out["heldout_prior_color_acc"] = surface_color_accuracy(decoder, *held_prior)
    return out


def restrict_to_color_head(decoder) -> list[torch.nn.Parameter]:
    """Freeze the decoder except the STF colour rows of the last layer; returns the parameters left to train.

    The last layer's other rows (SDF, densities, NeRF colours) get zero gradients through a hook, so AdamW without
    weight decay leaves them exactly as they were."""
    lo, hi = OUTPUT_SLOTS["stf_rgb"]
    last = decoder.renderer.nerstf.mlp[-1]
    for p in decoder.parameters():
        p.requires_grad_(False)
    for p in (last.weight, last.bias):
        mask = torch.zeros_like(p)
        mask[lo:hi] = 1
        p.requires_grad_(True)
        p.register_hook(lambda g, m=mask: g * m)
    return [last.weight, last.bias]


def improved(before: dict, after: dict, iou_tolerance: float = 0.005) -> bool:
    """Keep the fine-tune when held-out IoU and colour are no worse (IoU within the tolerance) and one is better;
    with prior samples scored too (``heldout_prior_*``), the same must hold for them."""
    def ok(iou: str, col: str) -> tuple[bool, bool]:
        no_worse = after[iou] >= before[iou] - iou_tolerance and after[col] >= before[col]
        return no_worse, after[iou] > before[iou] or after[col] > before[col]

    checks = [ok("heldout_iou", "heldout_color_acc")]
    if "heldout_prior_iou" in before:
        checks.append(ok("heldout_prior_iou", "heldout_prior_color_acc"))
    return all(no_worse for no_worse, _ in checks) and any(better for _, better in checks)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=str(Path(__file__).resolve().parents[1] / "weights" / "mini"))
    ap.add_argument("--seconds", type=float, default=900)
    ap.add_argument("--steps", type=int, default=0,
                    help="stop after this many steps instead of after --seconds (a reproducible run length)")
    ap.add_argument("--objects", type=int, default=768)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--color-weight", type=float, default=TransmitterTrainConfig.color_weight,
                    help="weight of the surface-band colour MSE against the SDF loss")
    ap.add_argument("--latent-noise", type=float, default=0.0,
                    help="train on latents plus Gaussian noise of this many latent standard deviations")
    ap.add_argument("--prior-mix", type=float, default=0.0,
                    help="fraction of each batch drawn from the priors' own samples for the train objects "
                         "(engine.training.prior_targets) instead of encoder latents")
    ap.add_argument("--prior-modes", default="text,image", help="which priors' samples --prior-mix uses")
    ap.add_argument("--prior-objects", type=int, default=384, help="train objects sampled by each prior")
    ap.add_argument("--prior-steps", type=int, default=8, help="DPM++ 2M steps per prior sample")
    ap.add_argument("--image-prior-guidance", type=float, default=None,
                    help="guidance of the image prior's samples (default: the model's; decoder_finetune_2 used 1.5)")
    ap.add_argument("--keep-sdf", action="store_true",
                    help="fit the SDF to the starting decoder's own SDF instead of the true one: every latent keeps"
                         " its shape (up to the fit) and the colour learns")
    ap.add_argument("--sdf-weight", type=float, default=1.0,
                    help="weight of the SDF loss (with --keep-sdf: how firmly the shapes are held)")
    ap.add_argument("--color-head-only", action="store_true",
                    help="train only the STF colour rows of the field's last layer: shapes stay bit-identical")
    ap.add_argument("--heldout", type=int, default=48, help="held-out objects for the before/after check")
    ap.add_argument("--always-write", action="store_true",
                    help="write the result even when the held-out check says it is worse (for experiments on a copy)")
    ap.add_argument("--record", default="decoder_finetune", help="name of the training record in mini.json")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0.0 <= args.prior_mix <= 1.0:
        ap.error("--prior-mix is a fraction of the batch: give a value from 0 to 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..mini_weights import load_mini
    from .export import sha256_file

    t_start = time.time()
    parts = load_mini("cpu", args.weights)
    transmitter = parts["transmitter"].float()
    cfg = parts["configs"]["text"]
    image_guidance = parts["configs"]["image"].sampler.guidance_scale if args.image_prior_guidance is None \
        else args.image_prior_guidance  # of the image prior's samples for --prior-mix
    tcfg = TransmitterTrainConfig(n_surface=256, n_near=512, n_uniform=256, bank_surface=2048,
                                  color_weight=args.color_weight)
    bank = make_bank(args.objects, "train", args.seed, cfg.encoder, tcfg, "cpu")
    held = make_bank(args.heldout, "heldout", 888_888, cfg.encoder, tcfg, "cpu")
    latents, held_latents = encode_bank(transmitter, bank), encode_bank(transmitter, held)
    decoder = transmitter.decoder
    print(f"[finetune] {len(bank)} objects encoded in {time.time() - t_start:.0f} s", flush=True)
    held_prior = prior_lat = None
    if args.prior_mix > 0:
        from .prior_targets import prior_bank

        modes = tuple(m.strip() for m in args.prior_modes.split(",") if m.strip())
        pg = torch.Generator().manual_seed(args.seed + 1)
        fast = dict(sampler="dpmpp_2m", steps=args.prior_steps, guidance={"image": image_guidance})
        prior_lat, pbank = prior_bank(parts, bank.select(slice(args.prior_objects)), modes, pg, seed=args.seed,
                                      **fast)
        held_prior = prior_bank(parts, held, modes, pg, seed=10_000, training=False, **fast)
        print(f"[finetune] {len(prior_lat)} prior samples ({', '.join(modes)}) ready at "
              f"{time.time() - t_start:.0f} s", flush=True)
    before = field_metrics(decoder, latents, bank, held_latents, held, held_prior)
    print(f"[finetune] before: {before}", flush=True)
    if args.color_head_only:
        params = restrict_to_color_head(decoder)
    else:
        params = [p for p in decoder.parameters() if p.requires_grad]
    anchor = None
    if args.keep_sdf:
        import copy

        anchor = copy.deepcopy(decoder).eval().requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    noise_sd = args.latent_noise * float(latents.std())  # --latent-noise is in latent standard deviations
    n_prior = round(args.batch * args.prior_mix) if prior_lat is not None else 0
    step, t0 = 0, time.time()
    while (step < args.steps) if args.steps > 0 else (time.time() - t0 < args.seconds):
        shares = []  # (weight, losses) of the encoder-latent and the prior-sample share of the batch
        if n_prior < args.batch:
            idx = torch.randint(len(bank), (args.batch - n_prior,), generator=gen)
            shares.append((1 - n_prior / args.batch, losses(decoder, latents, bank, idx, tcfg, gen, noise_sd,
                                                             anchor, args.sdf_weight)))
        if n_prior:
            idx = torch.randint(len(pbank), (n_prior,), generator=gen)
            shares.append((n_prior / args.batch, losses(decoder, prior_lat, pbank, idx, tcfg, gen, anchor=anchor,
                                                        sdf_weight=args.sdf_weight)))
        m = {k: sum(w * part[k] for w, part in shares) for k in shares[0][1]}
        opt.zero_grad(set_to_none=True)
        m["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"[finetune] step {step} loss {m['loss'].item():.4f} sdf {m['sdf'].item():.4f} "
                  f"colour {m['color'].item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    decoder.eval()
    after = field_metrics(decoder, latents, bank, held_latents, held, held_prior)
    print(f"[finetune] {step} steps; after: {after}", flush=True)
    record = {"steps": step, "seconds": round(time.time() - t_start), "objects": len(bank),
              "color_weight": args.color_weight, "latent_noise": args.latent_noise, "lr": args.lr,
              "prior_mix": args.prior_mix, "prior_modes": args.prior_modes if n_prior else "",
              "color_head_only": args.color_head_only, "keep_sdf": args.keep_sdf, "sdf_weight": args.sdf_weight,
              **({"image_prior_guidance": image_guidance} if n_prior else {}),
              "before": before, "after": after, "device": "cpu"}
    if not improved(before, after) and not args.always_write:
        print("[finetune] held-out IoU or colour got worse: weights left unchanged", flush=True)
        return record
    from safetensors.torch import save_file

    wdir = Path(args.weights)
    path = wdir / "transmitter.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().half().contiguous() for k, v in transmitter.state_dict().items()}, str(tmp))
    tmp.replace(path)
    manifest = json.loads((wdir / "mini.json").read_text())
    manifest["files"]["transmitter.safetensors"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest.setdefault("training", {})[args.record] = record
    (wdir / "mini.json.tmp").write_text(json.dumps(manifest, indent=1) + "\n")
    (wdir / "mini.json.tmp").replace(wdir / "mini.json")
    print(f"[finetune] wrote {path}", flush=True)
    return record


if __name__ == "__main__":
    main()
