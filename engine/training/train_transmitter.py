"""Stage (b): train the mini transmitter (encoder + STF decoder) on the procedural world (SHAP-E.md §5, §10).

The official transmitter learns from NeRF renders first and distils SDF/colour heads afterwards; the mini model
has exact analytic SDFs, so it trains the STF heads directly (the paper's "SDF regression" distillation):

* encoder inputs from an ``ObjectBank`` (point cloud with FPS-first order + RGB-D views, built once on the device);
* the official noisy tanh bottleneck (``PointCloudEncoder.bottleneck`` with training noise);
* query points per object: exact surface samples, Gaussian near-surface offsets (several scales) and uniform points
  in [-1, 1]³, with exact distances d (POSITIVE INSIDE) computed on the device;
* SDF loss: L1 between the decoder's tanh output and tanh(k·d) (k = ``sdf_scale``) — linear in d across the
  marching-cubes band, so the zero set and its interpolation are both supervised, saturated (sign only) far away;
* colour loss: MSE between the STF colour slot (sigmoid, sRGB, before the official sRGB -> linear conversion) and
  the object's sRGB colour at points within ``color_band`` of the surface (mesh vertices are queried there, shrunk
  by (G-1)/(G+1), i.e. slightly inside).
Validation (eval mode, no bottleneck noise) on fixed train-split objects and on HELD-OUT (shape, colour) pairs that
training never sees: sign accuracy at near/uniform points, occupancy IoU on a 32³ grid, colour L1.

    python -m engine.training.train_transmitter --out DIR --steps N --batch B --bank 2048 [--device auto] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

from engine.config import DecoderConfig, EncoderConfig, to_dict
from engine.mini_config import MINI_DECODER, MINI_ENCODER
from engine.models.transmitter import Transmitter

from . import loop
from .object_bank import ObjectBank, build_bank, sample_specs
from .world import signed_distance_tensors


@dataclass(frozen=True)
class TransmitterTrainConfig:
    steps: int = 4000
    batch: int = 32  # objects per step and rank
    bank: int = 2048  # objects in the training bank
    bank_points: int = 0  # points stored per object (0: encoder n_points; more -> random subsets per step)
    bank_views: int = 0  # views stored per object (0: encoder n_views; more -> random subsets per step)
    bank_surface: int = 4096  # surface samples stored per object for the losses
    n_surface: int = 1024  # query points per object and step
    n_near: int = 2048
    n_uniform: int = 1024
    near_sigmas: tuple[float, ...] = (0.005, 0.02, 0.06)
    sdf_scale: float = 10.0
    color_weight: float = 4.0
    color_band: float = 0.05
    lr: float = 7e-4
    weight_decay: float = 0.01
    warmup: int = 200
    ema_decay: float = 0.998
    grad_clip: float = 1.0
    seed: int = 0
    amp: str = "auto"
    eval_objects: int = 48
    eval_every: int = 1000
    log_every: int = 50
    ckpt_every: int = 1000
    bank_chunk: int = 256
    max_seconds: float = 0.0  # >0: fit the step count into this wall-clock budget, bank included (loop.StepBudget)


def device_generator(g: torch.Generator, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))


def query_points(bank: ObjectBank, idx: torch.Tensor, tcfg: TransmitterTrainConfig,
                 dgen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """points (B, N, 3) and exact sdf (B, N) (positive inside): surface, near-surface and uniform samples."""
    dev = bank.device
    B, S = idx.shape[0], bank.surface.shape[1]
    ns, nn_ = tcfg.n_surface, tcfg.n_near
    pick = torch.randint(0, S, (B, ns + nn_), generator=dgen, device=dev)
    surf = torch.gather(bank.surface[idx], 1, pick[..., None].expand(-1, -1, 3))  # (B, ns + nn, 3)
    sig = torch.tensor(tcfg.near_sigmas, device=dev)
    scale = sig[torch.randint(0, len(sig), (B, nn_, 1), generator=dgen, device=dev)]
    near = surf[:, ns:] + torch.randn(B, nn_, 3, generator=dgen, device=dev) * scale
    uni = torch.rand(B, tcfg.n_uniform, 3, generator=dgen, device=dev) * 2 - 1
    shape, prm, yaw = bank.params(idx)
    off = torch.cat([near, uni], 1)
    sdf_off = -signed_distance_tensors(shape, prm, yaw, off)
    pts = torch.cat([surf[:, :ns], off], 1)
    sdf = torch.cat([torch.zeros(B, ns, device=dev), sdf_off], 1)  # surface samples are exact (projected)
    return pts, sdf


def field_losses(model: Transmitter, bank: ObjectBank, idx: torch.Tensor, tcfg: TransmitterTrainConfig,
                 dgen: torch.Generator, *, training: bool = True) -> dict[str, torch.Tensor]:
    batch = bank.encoder_batch(idx)
    with loop.autocast_context(bank.device, tcfg.amp):
        latent = model.encode_batch(batch, training=training, generator=dgen)  # (B, d_latent)
        pts, sdf = query_points(bank, idx, tcfg, dgen)
        out = model.decoder(latent, pts, outputs=("sdf", "stf_rgb"))
    target = torch.tanh(sdf * tcfg.sdf_scale)
    sdf_loss = (out["sdf"] - target).abs().mean()
    band = (sdf.abs() < tcfg.color_band).float()  # (B, N)
    diff = out["stf_rgb"] - bank.srgb[idx][:, None]  # (B, N, 3)
    nb = band.sum().clamp(min=1)
    # MSE, not L1: L1 drives the sigmoid to the per-channel median (0 or 1 for a palette), where it saturates and
    # the latent's gradient vanishes (measured: an L1-trained colour head never leaves the median).
    color_loss = (diff.square().mean(-1) * band).sum() / nb
    color_l1 = (diff.detach().abs().mean(-1) * band).sum() / nb
    sign_acc = ((out["sdf"] > 0) == (sdf > 0)).float()[:, tcfg.n_surface:].mean()
    return {"loss": sdf_loss + tcfg.color_weight * color_loss, "sdf_l1": sdf_loss, "color_mse": color_loss,
            "color_l1": color_l1, "sign_acc": sign_acc}


def grid_points(res: int, device) -> torch.Tensor:
    lin = torch.linspace(-1, 1, res, device=device)
    return torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(1, -1, 3)


@torch.no_grad()
def evaluate(model: Transmitter, bank: ObjectBank, tcfg: TransmitterTrainConfig, *, seed: int = 1234,
             grid: int = 32) -> dict[str, float]:
    """Eval-mode metrics on every object of ``bank``: sign accuracy, grid IoU, colour L1 (no bottleneck noise)."""
    was = model.training
    model.eval()
    dev = bank.device
    dgen = torch.Generator(device=dev).manual_seed(seed)
    acc, iou, col = [], [], []
    gp = grid_points(grid, dev)
    for s in range(0, len(bank), 16):
        idx = torch.arange(s, min(s + 16, len(bank)), device=dev)
        m = field_losses(model, bank, idx, tcfg, dgen, training=False)
        acc.append(float(m["sign_acc"]) * len(idx))
        col.append(float(m["color_l1"]) * len(idx))
        latent = model.encode_batch(bank.encoder_batch(idx), training=False)
        pts = gp.expand(len(idx), -1, -1)
        pred = model.decoder(latent, pts, outputs=("sdf",))["sdf"] > 0
        shape, prm, yaw = bank.params(idx)
        true = signed_distance_tensors(shape, prm, yaw, pts) < 0
        inter, union = (pred & true).sum(1).float(), (pred | true).sum(1).float().clamp(min=1)
        iou.append(float((inter / union).sum()))
    model.train(was)
    n = len(bank)
    return {"sign_acc": sum(acc) / n, "iou": sum(iou) / n, "color_l1": sum(col) / n}


def save_transmitter(state: dict[str, torch.Tensor], enc: EncoderConfig, dec: DecoderConfig, out_dir: str,
                     info: dict | None = None) -> str:
    """transmitter.safetensors (fp32, official transmitter keys) + transmitter_config.json, atomically."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "transmitter.safetensors")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    cpath = os.path.join(out_dir, "transmitter_config.json")
    with open(cpath + ".tmp", "w") as fh:
        json.dump({"encoder": to_dict(enc), "decoder": to_dict(dec), "training": info or {}}, fh, indent=2)
    os.replace(cpath + ".tmp", cpath)
    return path


def make_bank(n: int, split: str, seed: int, enc: EncoderConfig, tcfg: TransmitterTrainConfig, device
              ) -> ObjectBank:
    g = torch.Generator().manual_seed(seed)
    specs = sample_specs(n, g, split=split)
    return build_bank(specs, g, n_points=tcfg.bank_points or enc.n_points, data_ctx=enc.data_ctx,
                      n_surface=tcfg.bank_surface, n_views=tcfg.bank_views or enc.n_views,
                      image_size=enc.image_size, max_depth=enc.max_depth, device=device, chunk=tcfg.bank_chunk)


def train_transmitter(out_dir: str, tcfg: TransmitterTrainConfig, *, device: str = "auto", resume: bool = False,
                      encoder_cfg: EncoderConfig = MINI_ENCODER, decoder_cfg: DecoderConfig = MINI_DECODER) -> dict:
    """Train and write ``out_dir``/transmitter.safetensors (EMA weights); returns a summary dict."""
    info = loop.setup_distributed(device)
    dev = info.device
    t_start, t_budget = time.time(), loop.StepBudget.clock()
    # Each rank holds its own bank (different objects); validation banks are the same everywhere.
    bank = make_bank(tcfg.bank, "train", tcfg.seed * 1000 + info.rank, encoder_cfg, tcfg, dev)
    val_train = make_bank(tcfg.eval_objects, "train", 777_777, encoder_cfg, tcfg, dev)
    val_held = make_bank(tcfg.eval_objects, "heldout", 888_888, encoder_cfg, tcfg, dev)
    bank_seconds = time.time() - t_start
    torch.manual_seed(tcfg.seed)  # module init draws from the global RNG; identical initial weights on every rank
    model = Transmitter(encoder_cfg, decoder_cfg, device=dev)
    st = loop.start_stage(model, out_dir, info, steps=tcfg.steps, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                          warmup=tcfg.warmup, ema_decay=tcfg.ema_decay, amp=tcfg.amp, log_every=tcfg.log_every,
                          resume=resume, max_seconds=tcfg.max_seconds, t_start=t_budget)
    history: list[dict] = []
    first = None
    t0 = time.time()
    for step in range(st.start, tcfg.steps):
        if step >= st.budget.total:
            break
        g = loop.step_generator(tcfg.seed, info.rank, step)
        idx = torch.randint(len(bank), (tcfg.batch,), generator=g).to(dev)
        m = field_losses(model if not info.distributed else _DDPView(st.ddp, model), bank, idx, tcfg,
                         device_generator(g, dev))
        st.step(m["loss"], model, tcfg.grad_clip)
        end = st.budget.update(step + 1)
        vals = {k: float(loop.all_reduce_mean(v.detach(), info)) for k, v in m.items()}
        first = first or vals
        st.log.add(**vals)
        rec = st.log.maybe_log(step + 1, force=step + 1 == end, lr=st.sched.get_last_lr()[0])
        if rec:
            history.append(rec)
        st.bar.update(1)
        if info.is_main and ((step + 1) % tcfg.ckpt_every == 0 or step + 1 == end):
            st.save(step + 1, model)
        if info.is_main and tcfg.eval_every and (step + 1) % tcfg.eval_every == 0 and step + 1 < end:
            st.log.write({"step": step + 1, **_eval_both(model, val_train, val_held, tcfg)})
    st.bar.close()
    train_seconds = time.time() - t0
    summary: dict = {"steps": st.budget.total, **st.budget.record(), "start_step": st.start,
                     "world_size": info.world_size, "device": str(dev),
                     "bank_seconds": round(bank_seconds, 1), "train_seconds": round(train_seconds, 1),
                     "first": first, "last": history[-1] if history else None, "config": asdict(tcfg)}
    if info.is_main:
        ema_model = Transmitter(encoder_cfg, decoder_cfg, device=dev)
        ema_model.load_state_dict(model.state_dict())
        st.ema.copy_to(ema_model)
        summary["eval_ema"] = _eval_both(ema_model, val_train, val_held, tcfg)
        st.log.write({"step": st.budget.total, "ema": True, **summary["eval_ema"]})
        save_transmitter(ema_model.state_dict(), encoder_cfg, decoder_cfg, out_dir, summary)
        with open(os.path.join(out_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2, default=str)
    loop.cleanup_distributed()
    return summary


class _DDPView:
    """Routes the encoder call through DDP (gradient sync) while keeping the Transmitter's methods."""

    def __init__(self, ddp, model: Transmitter):
        self._ddp, self._model = ddp, model

    def encode_batch(self, batch, **kw):
        return self._ddp(*batch.tensors(), **kw)

    @property
    def decoder(self):
        return self._model.decoder


def _eval_both(model, val_train, val_held, tcfg) -> dict[str, float]:
    tr, ho = evaluate(model, val_train, tcfg), evaluate(model, val_held, tcfg)
    return {**{f"val_{k}": v for k, v in tr.items()}, **{f"heldout_{k}": v for k, v in ho.items()}}


def parse_args(argv=None) -> argparse.Namespace:
    d = TransmitterTrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    for name in ("steps", "batch", "bank", "bank_points", "bank_views", "bank_surface", "n_surface", "n_near",
                 "n_uniform", "warmup", "eval_objects", "eval_every", "log_every", "ckpt_every", "seed",
                 "bank_chunk"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "sdf_scale", "color_weight", "color_band", "ema_decay", "max_seconds"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    fields = {k: v for k, v in vars(a).items() if k in TransmitterTrainConfig.__dataclass_fields__}
    return train_transmitter(a.out, replace(TransmitterTrainConfig(), **fields), device=a.device, resume=a.resume)


if __name__ == "__main__":
    main()
