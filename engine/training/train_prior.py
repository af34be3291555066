"""Stage (c): train the mini latent diffusion prior (text or image conditioned) on encoder latents (SHAP-E.md §3-§4).

Objective (the official ``GaussianDiffusion`` with ``mean_type x_start``, ``loss_type mse``, exp schedule): draw an
integer t ~ U{0..1023}, σ_t = sqrt(1/ᾱ_t − 1), x_t = x0 + σ_t ε, feed the network c_in(σ_t)·x_t with the integer t
(c_in = 1/sqrt(σ²+1), so the input equals the VP ``q_sample`` sqrt(ᾱ) x0 + sqrt(1−ᾱ) ε, exactly what the Karras
sampler feeds at inference), and regress the x0 half of the output onto x0 (MSE; optional min-SNR-γ weighting).
The variance half is not trained (the Karras sampler ignores it; ``output_proj`` starts at zero).

Conditions come from the frozen mini CLIP, precomputed by ``encode_dataset``: text = unit ``embed_text`` of a
caption drawn per sample and step from the object's caption bank (templates vary); image = the pre-ln_post grid of
a random one of the object's conditioning renders. Each condition is zeroed with probability ``cond_drop_prob``
(0.1) so that classifier-free guidance has an unconditional branch. EMA weights are what gets exported.

    python -m engine.training.train_prior --data DIR/latents.pt --cond text --out DIR/text_prior --steps N
    torchrun --nproc_per_node 2 -m engine.training.train_prior ...      (DDP, gloo on CPU / nccl on CUDA)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

from engine.config import PriorConfig, to_dict
from engine.diffusion.schedules import c_in, exp_alphas_cumprod, sigmas_from_alphas_cumprod
from engine.mini_config import MINI_IMAGE_PRIOR, MINI_TEXT_PRIOR
from engine.models.latent_transformer import LatentPrior
from engine.records import EngineError
from engine.training.world import N_KINDS, analogies

from . import loop
from .captions import N_PART_KEYS, part_key_of_kind

DIFFUSION_STEPS = 1024  # DiffusionConfig.timesteps of every Shap-E prior


@dataclass(frozen=True)
class PriorTrainConfig:
    cond: str = "text"
    steps: int = 2000
    batch: int = 64  # per rank
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 200
    ema_decay: float = 0.999
    cond_drop_prob: float = 0.1
    cond_noise: float = 0.0  # Gaussian noise on the condition (text: per unit-vector component, renormalised)
    analogy_frac: float = 0.0  # text: fraction of each batch made of analogies of trained kinds (LatentSet.analogy)
    partial_frac: float = 0.0  # text: fraction of rows conditioned on a caption of their shape only or colour only
    min_snr_gamma: float = 0.0  # 0: plain x0 MSE (official); >0: weight min(SNR, γ) / normalisation
    grad_clip: float = 1.0
    seed: int = 0
    amp: str = "auto"
    log_every: int = 50
    ckpt_every: int = 1000
    snapshot_every: int = 0  # >0: also keep the EMA weights every N steps in snapshots/step_NNNNNN/ (to score each)
    max_seconds: float = 0.0  # >0: fit the step count into this wall-clock budget (loop.StepBudget)
    init: str = ""  # a prior.safetensors to start from (fine-tuning) instead of the random init


class LatentSet:
    """The encoded dataset on one device, with vectorised per-sample condition draws."""

    def __init__(self, blob: dict, cond: str, device: torch.device):
        self.latents = blob["latents"].to(device, torch.float32)  # (N, d_latent)
        self.kind = blob["kind"].to(device)  # (N,)
        self.cond = cond
        if cond == "text":
            if blob.get("caption_emb") is None:
                raise EngineError("the encoded dataset has no caption embeddings",
                                  "run encode_dataset with the trained CLIP (--clip)")
            self.caption_emb = blob["caption_emb"].to(device, torch.float32)  # (M, clip_dim)
            ck = blob["caption_kind"]
            n_kinds = max(int(ck.max()) + 1, int(self.kind.max()) + 1, N_KINDS)
            table, counts = _index_table(ck, n_kinds)
            if bool((counts[self.kind.cpu().unique()] == 0).any()):
                raise EngineError("some encoded kinds have no captions", "re-run encode_dataset")
            self.caption_table, self.caption_count = table.to(device), counts.to(device)
            self.object_table, self.object_count = _index_table(self.kind.cpu(), n_kinds)
            self._analogies: tuple[torch.Tensor, torch.Tensor] | None = None  # built on first use (analogy)
            self.partial_emb = None
            if blob.get("partial_emb") is not None:  # shape-only / colour-only captions (encode_dataset)
                self.partial_emb = blob["partial_emb"].to(device, torch.float32)
                self.partial_table, self.partial_count = _index_table(blob["partial_key"], N_PART_KEYS)
                self.partial_table, self.partial_count = self.partial_table.to(device), self.partial_count.to(device)
        else:
            if blob.get("image_grids") is None:
                raise EngineError("the encoded dataset has no image grids",
                                  "run encode_dataset with the trained CLIP (--clip)")
            self.grids = blob["image_grids"].to(device)  # (N, Vc, width, tokens) fp16

    def __len__(self) -> int:
        return self.latents.shape[0]

    def _caption(self, k: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The embedding of a random caption of each kind in ``k``."""
        u = torch.rand(len(k), generator=generator).to(k.device)
        j = (u * self.caption_count[k]).long().clamp(max=self.caption_table.shape[1] - 1)
        return self.caption_emb[self.caption_table[k, j]]

    def _instance(self, k: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The latent of a random encoded object of each kind in ``k`` (a kind with none gives object 0)."""
        kc = k.cpu()
        j = (torch.rand(len(k), generator=generator) * self.object_count[kc]).long()
        return self.latents[self.object_table[kc, j.clamp(max=self.object_table.shape[1] - 1)].to(k.device)]

    def partial(self, k: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The embedding of a random partial caption of each kind in ``k``: of its shape (with aspect) or of its
        colour, one or the other with even odds. Trained on the kind's own objects, such a condition's x0 target
        averages to the latent mean over every trained kind sharing that part: E[z | shape], E[z | colour]."""
        if self.partial_emb is None:
            raise EngineError("the encoded dataset has no partial captions",
                              "run encode_dataset --augment FILE --clip DIR to add them")
        shape_part = torch.rand(len(k), generator=generator).to(k.device) < 0.5
        key = torch.where(shape_part, part_key_of_kind(k, "shape"), part_key_of_kind(k, "color"))
        j = (torch.rand(len(k), generator=generator).to(k.device) * self.partial_count[key]).long()
        return self.partial_emb[self.partial_table[key, j.clamp(max=self.partial_table.shape[1] - 1)]]

    def batch(self, n: int, generator: torch.Generator, analogy_frac: float = 0.0, partial_frac: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 (n, d_latent), cond) drawn with the CPU ``generator``; text rows are replaced by analogies
        (``analogy``) with probability ``analogy_frac`` and their caption by a partial one (``partial``) with
        probability ``partial_frac``."""
        dev = self.latents.device
        idx = torch.randint(len(self), (n,), generator=generator).to(dev)
        x0 = self.latents[idx]
        if self.cond == "text":
            cond = self._caption(self.kind[idx], generator)
            if partial_frac > 0:
                use = (torch.rand(n, generator=generator) < partial_frac).to(dev)
                cond = torch.where(use[:, None], self.partial(self.kind[idx], generator), cond)
            if analogy_frac > 0:
                use = (torch.rand(n, generator=generator) < analogy_frac).to(dev)
                a_cond, a_x0, ok = self.analogy(self.kind[idx], generator)
                use = use & ok
                cond = torch.where(use[:, None], a_cond, cond)
                x0 = torch.where(use[:, None], a_x0, x0)
        else:
            u = torch.rand(n, generator=generator).to(dev)
            v = (u * self.grids.shape[1]).long().clamp(max=self.grids.shape[1] - 1)
            cond = self.grids[idx, v].float()
        return x0, cond

    def analogy(self, result: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Analogies that land on the kinds ``result``: for r = (shape-aspect g, colour c), one of the triples of
        dataset kinds A = (g, c'), B = (g', c'), C = (g', c) (``world.analogies``), drawn uniformly; condition =
        unit(e_A - e_B + e_C) of random captions, target = z_A - z_B + z_C of random encoded objects. Returns
        (cond, x0, ok); ok is False where the dataset has no triple for r (those rows are unusable).

        A (shape, colour) pair's CLIP text vector is close to such sums (the mini CLIP's text space is nearly
        additive) and the transmitter's latents add up the same way, so these rows ask the prior to map sums of
        conditions to sums of latents: composition, taught on trained kinds only. Every kind involved, the
        result included, is one the dataset has, so no held-out pair is ever formed."""
        if self._analogies is None:  # (n_kinds, max triples, 3) kind indices, padded with 0; counts (n_kinds,)
            have = frozenset(self.kind.unique().tolist())
            rows = [analogies(k, have) if k in have else [] for k in range(len(self.object_count))]
            table = torch.zeros(len(rows), max(1, max(map(len, rows))), 3, dtype=torch.long)
            for k, r in enumerate(rows):
                if r:
                    table[k, :len(r)] = torch.tensor(r)
            self._analogies = table, torch.tensor([len(r) for r in rows])
        table, count = self._analogies
        r = result.cpu()
        j = (torch.rand(len(r), generator=generator) * count[r]).long().clamp(max=table.shape[1] - 1)
        ka, kb, kc = table[r, j].to(result.device).unbind(-1)
        cond = self._caption(ka, generator) - self._caption(kb, generator) + self._caption(kc, generator)
        x0 = self._instance(ka, generator) - self._instance(kb, generator) + self._instance(kc, generator)
        return torch.nn.functional.normalize(cond, dim=-1), x0, (count[r] > 0).to(result.device)


def _index_table(keys: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table (n, max count) of the positions of each key in ``keys``, padded with 0; counts (n,))."""
    counts = torch.bincount(keys, minlength=n)
    table = torch.zeros(n, max(int(counts.max()), 1), dtype=torch.long)
    order = torch.argsort(keys, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    for k in range(n):
        table[k, :counts[k]] = order[starts[k]:starts[k] + counts[k]]
    return table, counts


def perturb_condition(cond: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Condition augmentation: Gaussian noise of std ``scale`` per component, relative to the rows' RMS for image
    grids; text vectors are renormalised to unit length, as CLIP gives them. It smooths the map from condition to
    latent between the trained kinds, which is what an unseen (shape, colour) pair's embedding falls into."""
    if scale <= 0:
        return cond
    eps = torch.randn(cond.shape, generator=generator).to(cond.device, cond.dtype)
    if cond.dim() == 2:  # text: (B, clip_dim) unit vectors
        return torch.nn.functional.normalize(cond + scale * eps, dim=-1)
    rms = cond.float().square().mean(dim=tuple(range(1, cond.dim())), keepdim=True).sqrt().to(cond.dtype)
    return cond + scale * rms * eps


def drop_condition(cond: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each row with probability p (classifier-free guidance's unconditional branch)."""
    keep = (torch.rand(cond.shape[0], generator=generator) >= p).to(cond.device, cond.dtype)
    return cond * keep.view(-1, *([1] * (cond.dim() - 1)))


def diffusion_loss(model, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator, *,
                   sigma_table: torch.Tensor, min_snr_gamma: float = 0.0, amp: str = "auto") -> torch.Tensor:
    """Mean x0-MSE at random integer timesteps; the network sees c_in(σ)·(x0 + σ ε) and the integer t."""
    b, dev = x0.shape[0], x0.device
    t = torch.randint(0, sigma_table.shape[0], (b,), generator=generator)
    dgen = torch.Generator(device=dev).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    noise = torch.randn(x0.shape, generator=dgen, device=dev)
    sigma = sigma_table[t].to(dev)  # (B,) float32
    x_in = (x0 + sigma[:, None] * noise) * c_in(sigma)[:, None]
    with loop.autocast_context(dev, amp):
        out = model(x_in, t.to(dev), cond)
    pred = out[:, :x0.shape[1]].float()
    per = (pred - x0).square().mean(1)  # (B,)
    if min_snr_gamma > 0:
        snr = sigma.double().pow(-2)
        per = per * (snr.clamp(max=min_snr_gamma) / min_snr_gamma).float()
    return per.mean()


def prior_config_for(cond: str, override: PriorConfig | None = None) -> PriorConfig:
    if override is not None:
        return override
    if cond not in ("text", "image"):
        raise EngineError(f"unknown condition {cond!r}", "use --cond text or --cond image")
    return MINI_TEXT_PRIOR if cond == "text" else MINI_IMAGE_PRIOR


def save_prior(state: dict[str, torch.Tensor], cfg: PriorConfig, out_dir: str, info: dict | None = None) -> str:
    """prior.safetensors (fp32 EMA weights, official ``wrapped.*`` keys) + prior_config.json, atomically."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "prior.safetensors")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    cpath = os.path.join(out_dir, "prior_config.json")
    with open(cpath + ".tmp", "w") as fh:
        json.dump({"prior": to_dict(cfg), "training": info or {}}, fh, indent=2)
    os.replace(cpath + ".tmp", cpath)
    return path


def snapshot_dir(out_dir: str, step: int) -> str:
    """Where ``snapshot_every`` keeps the EMA weights after ``step`` steps: a folder like the run's own output, so
    it can stand in for the prior's stage folder of an export."""
    return os.path.join(out_dir, "snapshots", f"step_{step:06d}")


def train_prior(data: str | dict, out_dir: str, tcfg: PriorTrainConfig, *, device: str = "auto",
                resume: bool = False, prior_cfg: PriorConfig | None = None) -> dict:
    """Train and write ``out_dir``/prior.safetensors; returns a summary (losses, steps, seconds, device)."""
    t_start = loop.StepBudget.clock()
    info = loop.setup_distributed(device)
    dev = info.device
    pcfg = replace(prior_config_for(tcfg.cond, prior_cfg), cond_drop_prob=tcfg.cond_drop_prob)
    blob = torch.load(data, map_location="cpu", weights_only=False) if isinstance(data, str) else data
    if blob["latents"].shape[1] != pcfg.d_latent:
        raise EngineError(f"latents have {blob['latents'].shape[1]} values, the prior expects {pcfg.d_latent}",
                          "encode the dataset with the matching transmitter")
    if tcfg.partial_frac > 0 and tcfg.cond != "text":
        raise EngineError("partial captions are text conditions", "drop --partial-frac for --cond image")
    if tcfg.analogy_frac > 0 and tcfg.cond != "text":
        raise EngineError("analogies are built from text conditions only", "drop --analogy-frac for --cond image")
    ds = LatentSet(blob, tcfg.cond, dev)
    init = torch.Generator().manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = LatentPrior(pcfg)  # initialised on the CPU (CPU generator), then moved
    model.init_weights(init)
    if tcfg.init:  # continue from trained weights (the EMA starts from them too)
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(tcfg.init).items()}, strict=True)
    model.to(dev)
    st = loop.start_stage(model, out_dir, info, steps=tcfg.steps, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                          warmup=tcfg.warmup, ema_decay=tcfg.ema_decay, amp=tcfg.amp, log_every=tcfg.log_every,
                          resume=resume, max_seconds=tcfg.max_seconds, t_start=t_start)
    sigma_table = sigmas_from_alphas_cumprod(exp_alphas_cumprod(DIFFUSION_STEPS)).float()  # (T,)
    losses: list[float] = []
    t0 = time.time()
    for step in range(st.start, tcfg.steps):
        if step >= st.budget.total:
            break
        g = loop.step_generator(tcfg.seed, info.rank, step)
        x0, cond = ds.batch(tcfg.batch, g, tcfg.analogy_frac, tcfg.partial_frac)
        cond = perturb_condition(cond, tcfg.cond_noise, g)
        cond = drop_condition(cond, tcfg.cond_drop_prob, g)
        loss = diffusion_loss(st.ddp, x0, cond, g, sigma_table=sigma_table, min_snr_gamma=tcfg.min_snr_gamma,
                              amp=tcfg.amp)
        st.step(loss, model, tcfg.grad_clip)
        end = st.budget.update(step + 1)
        lv = float(loop.all_reduce_mean(loss.detach(), info))
        losses.append(lv)
        st.log.add(loss=lv)
        st.log.maybe_log(step + 1, force=step + 1 == end, lr=st.sched.get_last_lr()[0])
        st.bar.update(1)
        if info.is_main and ((step + 1) % tcfg.ckpt_every == 0 or step + 1 == end):
            st.save(step + 1, model)
        if info.is_main and tcfg.snapshot_every > 0 and (step + 1) % tcfg.snapshot_every == 0:
            save_prior(dict(st.ema.shadow), pcfg, snapshot_dir(out_dir, step + 1), {"step": step + 1})
    st.bar.close()
    seconds = time.time() - t0
    summary = {"cond": tcfg.cond, "steps": st.budget.total, **st.budget.record(), "start_step": st.start,
               "batch_per_rank": tcfg.batch, "world_size": info.world_size, "seconds": round(seconds, 1),
               "device": str(dev),
               "first_loss": losses[0] if losses else None,
               "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])) if losses else None,
               "n_latents": len(ds), "config": asdict(tcfg), "diffusion_steps": DIFFUSION_STEPS}
    if info.is_main:
        shadow = {k: v for k, v in st.ema.shadow.items()}
        save_prior(shadow, pcfg, out_dir, summary)
        with open(os.path.join(out_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    loop.cleanup_distributed()
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="latents.pt written by encode_dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--cond", choices=["text", "image"], default="text")
    d = PriorTrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch, help="per-rank batch")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--cond-noise", type=float, default=d.cond_noise,
                   help="std of Gaussian noise added to the condition in training (text: per component of the unit"
                        " CLIP vector, e.g. 0.05; image: relative to the grid's RMS)")
    p.add_argument("--analogy-frac", type=float, default=d.analogy_frac,
                   help="text: fraction of each batch replaced by analogies of trained kinds (condition e_A - e_B +"
                        " e_C, target z_A - z_B + z_C, landing on a trained kind), to teach composition (off: as a CPU"
                        " fine-tune it cost held-out accuracy, docs/MINI-MODEL.md)")
    p.add_argument("--partial-frac", type=float, default=d.partial_frac,
                   help="text: fraction of rows conditioned on a caption naming only their shape or only their colour"
                        " (needs the dataset's partial captions), so the prior learns E[z | shape] and E[z | colour]"
                        " for composed guidance (SamplerConfig.part_weight)")
    p.add_argument("--min-snr-gamma", type=float, default=d.min_snr_gamma)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--snapshot-every", type=int, default=d.snapshot_every,
                   help="also keep the EMA weights every N steps in OUT/snapshots/step_NNNNNN/ (0: off), to score"
                        " each and keep the best rather than the last")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds,
                   help="fit the run into this many seconds: after a few timed steps the step count (and the end of"
                        " the cosine schedule) is cut to what the time left allows (0: run every step)")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init", default="", help="prior.safetensors to fine-tune from")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    tcfg = PriorTrainConfig(cond=a.cond, steps=a.steps, batch=a.batch, lr=a.lr, warmup=a.warmup,
                            ema_decay=a.ema_decay, cond_noise=a.cond_noise, analogy_frac=a.analogy_frac,
                            partial_frac=a.partial_frac,
                            min_snr_gamma=a.min_snr_gamma, seed=a.seed, amp=a.amp,
                            log_every=a.log_every, ckpt_every=a.ckpt_every, snapshot_every=a.snapshot_every,
                            init=a.init, max_seconds=a.max_seconds)
    return train_prior(a.data, a.out, tcfg, device=a.device, resume=a.resume)


if __name__ == "__main__":
    main()
