"""Stage (a): contrastive training of the mini CLIP on renders + captions of the mini world (Radford et al. 2021).

Symmetric InfoNCE with a learnable temperature, made *kind-aware*: every caption names exactly one kind, and the
targets of an image are all captions of its kind in the (all-gathered) batch, uniformly (multi-positive soft
targets); each rank also draws distinct kinds. Held-out (shape, colour) pairs never appear in training.

Output (rank 0): ``clip.safetensors`` (fp32, the open_clip / OpenAI key layout that
``open_clip.model.build_model_from_openai_state_dict`` reads) + ``clip_config.json`` (ClipConfig), ``metrics.jsonl``
and a resumable ``checkpoint.pt``.

    python -m engine.training.train_clip --out DIR --steps N --batch B [--device auto|cpu|cuda] [--resume]
        [--init engine/weights/mini/clip.safetensors]
    torchrun --nproc_per_node 2 -m engine.training.train_clip --out DIR ...
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.config import ClipConfig, to_dict
from engine.mini_config import MINI_CLIP

from . import loop, render_world
from .captions import all_kind_captions, caption, partial_caption
from .world import allowed_kinds, COLORS, kind_from_index, ObjectSpec, YAWED_SHAPES
from engine.render.cameras import look_at_cameras

MINI_CLIP_CONFIG = MINI_CLIP  # the mini CLIP's sizes: engine/mini_config.py is the single source of truth
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(cfg: ClipConfig):
    """The open_clip model for ``cfg`` (the conditioner module's builder when it is available)."""
    try:
        from engine.conditioning.clip import build_open_clip  # type: ignore

        return build_open_clip(cfg)
    except ImportError:
        import open_clip
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        vision = CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width, patch_size=cfg.vision_patch_size,
                               image_size=cfg.image_size)
        text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                           heads=cfg.text_heads, layers=cfg.text_layers)
        return open_clip.CLIP(cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=cfg.quick_gelu)


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    import open_clip

    return open_clip.tokenize(texts, context_length=context_length)


def normalize_images(rgb: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) sRGB in [0, 1] -> (B, 3, H, W) with CLIP's mean/std (images already at the model's size)."""
    x = rgb.permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def render_training_images(specs: list[ObjectSpec], g: torch.Generator, size: int, device, supersample: int
                           ) -> torch.Tensor:
    """Random view (elevation -20..70 deg), plain grey background of random level, jittered Lambert light."""
    B = len(specs)
    dirs = render_world.random_view_directions(B, g, elev_deg=(-20.0, 70.0))
    cams = look_at_cameras(dirs, size, fov=0.7, distance=4.0)
    bg = (0.15 + 0.85 * torch.rand(B, 1, generator=g)).expand(B, 3)
    light = -cams.z + torch.randn(B, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 0.5])
    out = render_world.render(specs, cams, background=bg, light_dirs=light, supersample=supersample, device=device)
    return out["rgb"][:, 0]


def draw_batch(batch: int, g: torch.Generator, jitter: float = 0.05) -> tuple[list[ObjectSpec], list[str]]:
    """Distinct training kinds (cycled when batch > #kinds), random yaw and value jitter, one caption each."""
    kinds = torch.tensor(allowed_kinds("train"))
    reps = math.ceil(batch / len(kinds))
    order = torch.cat([kinds[torch.randperm(len(kinds), generator=g)] for _ in range(reps)])[:batch]
    specs = []
    for k in order.tolist():
        s, a, c = kind_from_index(k)
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        specs.append(ObjectSpec(s, a, c, yaw=u[0] * math.pi / 2 if s in YAWED_SHAPES else 0.0,
                                value_jitter=(2 * u[1] - 1) * jitter))
    return specs, [caption(s, g) for s in specs]


class RenderBank:
    """Training images rendered once (random kinds, yaws, views, backgrounds, lights); batches draw from it and
    get a fresh caption template per draw. Held-out pairs never enter (draw_batch samples the train split)."""

    def __init__(self, n: int, g: torch.Generator, size: int, device, supersample: int, chunk: int = 256):
        self.specs, images = [], []
        for i in range(0, n, chunk):
            specs, _ = draw_batch(min(chunk, n - i), g)
            with torch.no_grad():
                images.append(normalize_images(render_training_images(specs, g, size, device, supersample)))
            self.specs += specs
        self.images = torch.cat(images)  # (n, 3, S, S) normalised, on device
        self.kinds = torch.tensor([s.kind for s in self.specs], device=self.images.device)

    def draw(self, batch: int, g: torch.Generator) -> tuple[torch.Tensor, list[ObjectSpec], list[str], torch.Tensor]:
        idx = torch.randint(len(self.specs), (batch,), generator=g)
        specs = [self.specs[i] for i in idx.tolist()]
        idx_dev = idx.to(self.images.device)
        return self.images[idx_dev], specs, [caption(s, g) for s in specs], self.kinds[idx_dev]


def gather_features(x: torch.Tensor, info: loop.DistInfo) -> torch.Tensor:
    """All ranks' rows; this rank's slice keeps its gradient (open_clip's gather without grad + local swap)."""
    if not info.distributed:
        return x
    parts = [torch.zeros_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[info.rank] = x
    return torch.cat(parts, 0)


PART_FULL, PART_SHAPE, PART_COLOR = 0, 1, 2  # what a caption names: its kind, only the shape, only the colour


def multi_positive_infonce(img: torch.Tensor, txt: torch.Tensor, kinds: torch.Tensor, scale: torch.Tensor,
                           parts: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric cross-entropy with soft targets uniform over the pairs whose caption describes the image
    (``positives``). img, txt: (N, D) unit; kinds (N,); parts (N,) or None (every caption names its kind)."""
    logits = scale * img @ txt.t()  # (N, N)
    same = positives(kinds, parts).float()  # [image i, caption j]
    li = -(same / same.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    lt = -(same.t() / same.t().sum(1, keepdim=True) * F.log_softmax(logits.t(), 1)).sum(1).mean()
    return 0.5 * (li + lt)


def positives(kinds: torch.Tensor, parts: torch.Tensor | None = None) -> torch.Tensor:
    """(N, N) bool [image i, caption j]: caption j (written for image j) describes image i. A full caption describes
    its kind; a PART_SHAPE one every image of its shape and aspect; a PART_COLOR one every image of its colour."""
    same = kinds[:, None] == kinds[None, :]
    if parts is None:
        return same
    geo, col = kinds // len(COLORS), kinds % len(COLORS)  # kind = (shape * 3 + aspect) * 12 + colour
    same = torch.where(parts[None, :] == PART_SHAPE, geo[:, None] == geo[None, :], same)
    return torch.where(parts[None, :] == PART_COLOR, col[:, None] == col[None, :], same)


def partial_captions(specs: list[ObjectSpec], caps: list[str], prob: float, g: torch.Generator
                     ) -> tuple[list[str], torch.Tensor]:
    """Replace a fraction ``prob`` of the captions by ones naming only the shape or only the colour (half each),
    so that the encoders learn shape and colour as separate directions (they meet unseen pairs at test time)."""
    parts = torch.zeros(len(caps), dtype=torch.long)
    if prob <= 0:
        return caps, parts
    u = torch.rand(len(caps), generator=g).tolist()
    caps = list(caps)
    for i, spec in enumerate(specs):
        if u[i] < prob:
            part = PART_SHAPE if u[i] < prob / 2 else PART_COLOR
            caps[i] = partial_caption(spec, g, "shape" if part == PART_SHAPE else "color")
            parts[i] = part
    return caps, parts


@torch.no_grad()
def evaluate(model, device, *, size: int, supersample: int, seed: int = 1234, views: int = 2) -> dict[str, float]:
    """Retrieval over the 288 kinds with canonical captions and fixed renders (white-ish grey background).

    t2i_top1_{train,heldout}: caption -> the right kind's image among all 288 kinds' images;
    i2t_top1_{train,heldout}: image -> its caption among the 288 captions (the R-precision setting).
    """
    model.eval()
    g = torch.Generator().manual_seed(seed)
    caps = all_kind_captions()
    tf = F.normalize(model.encode_text(tokenize(caps).to(device)).float(), dim=-1)  # (288, D)
    specs = [ObjectSpec(*kind_from_index(k), yaw=0.3 if kind_from_index(k)[0] in YAWED_SHAPES else 0.0)
             for k in range(len(caps)) for _ in range(views)]
    feats = []
    for i in range(0, len(specs), 96):
        part = specs[i:i + 96]
        dirs = render_world.random_view_directions(len(part), g, elev_deg=(0.0, 40.0))
        cams = look_at_cameras(dirs, size, fov=0.7, distance=4.0)
        rgb = render_world.render(part, cams, background=(0.7, 0.7, 0.7), supersample=supersample,
                                  device=device)["rgb"][:, 0]
        feats.append(F.normalize(model.encode_image(normalize_images(rgb)).float(), dim=-1))
    imf = torch.cat(feats).view(len(caps), views, -1)  # (288, V, D)
    kinds = torch.arange(len(caps), device=imf.device)
    held = torch.tensor([k in set(allowed_kinds("heldout")) for k in range(len(caps))], device=imf.device)
    i2t = (torch.einsum("kvd,cd->kvc", imf, tf).argmax(-1) == kinds[:, None]).float().mean(1)  # (288,)
    mean_img = F.normalize(imf.mean(1), dim=-1)
    t2i = ((tf @ mean_img.t()).argmax(-1) == kinds).float()
    model.train()
    return {"t2i_top1_train": t2i[~held].mean().item(), "t2i_top1_heldout": t2i[held].mean().item(),
            "i2t_top1_train": i2t[~held].mean().item(), "i2t_top1_heldout": i2t[held].mean().item()}


def save_clip(model, cfg: ClipConfig, out_dir: str) -> str:
    """Write clip.safetensors (fp32, OpenAI/open_clip key layout) and clip_config.json atomically."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in loop.unwrap(model).state_dict().items()}
    path = os.path.join(out_dir, "clip.safetensors")
    save_file(sd, path + ".tmp", metadata={"format": "pt", "layout": "openai-clip"})
    os.replace(path + ".tmp", path)
    cpath = os.path.join(out_dir, "clip_config.json")
    with open(cpath + ".tmp", "w") as fh:
        json.dump(to_dict(cfg), fh, indent=2)
    os.replace(cpath + ".tmp", cpath)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=256, help="per-rank batch")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None, help="default: 5%% of steps (at most 1000)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--supersample", type=int, default=None, help="render supersampling (default 2 on GPU, 1 on CPU)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=0, help="0: only at the end")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="fit the run (its bank included) into this many seconds: after a few timed steps the step "
                        "count and the end of the cosine schedule are cut to what the time left allows (0: off)")
    p.add_argument("--init", default="", help="clip.safetensors to fine-tune from (e.g. the embedded model's)")
    p.add_argument("--partial-captions", type=float, default=0.0,
                   help="fraction of captions that name only the shape or only the colour (positives: every image "
                        "they describe)")
    p.add_argument("--bank", type=int, default=0,
                   help="pre-render this many training images once and draw batches from them (0: render every "
                        "step); sphere tracing dominates a step, so a bank makes steps ~30x cheaper on a GPU")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (0: torch's default; under torchrun on CPU, cores / local ranks)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_budget = loop.StepBudget.clock()
    info = loop.setup_distributed(args.device)
    loop.set_cpu_threads(args.threads, info)
    cfg = MINI_CLIP_CONFIG
    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = build_clip(cfg)
    if args.init:  # continue from trained weights (fp16 files are widened to fp32)
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(args.init).items()}, strict=True)
    model = model.to(info.device)
    ss = args.supersample or (2 if info.device.type == "cuda" else 1)
    opt = loop.build_optimizer(model, args.lr, args.weight_decay)
    warm = args.warmup if args.warmup is not None else min(1000, max(1, args.steps // 20))
    sched = loop.warmup_cosine(opt, warm, args.steps)
    ckpt = loop.Checkpointer(args.out)
    start = 0
    if args.resume:
        start, _ = ckpt.load(model, opt, sched, map_location=info.device)
    ddp = loop.wrap_ddp(model, info)
    scaler = loop.make_grad_scaler(info.device, args.amp)
    log = loop.MetricLogger(os.path.join(args.out, "metrics.jsonl"), args.log_every, enabled=info.is_main)
    bank = None
    if args.bank:
        bank = RenderBank(args.bank, loop.step_generator(args.seed, info.rank, -1), cfg.image_size, info.device, ss)
    bar = loop.progress(args.steps, start, info.is_main)
    budget = loop.StepBudget(args.steps, args.max_seconds, start=start, sched=sched, info=info, t_start=t_budget)
    for step in range(start, args.steps):
        if step >= budget.total:
            break
        g = loop.step_generator(args.seed, info.rank, step)
        if bank is not None:
            images, specs, caps, kinds = bank.draw(args.batch, g)
        else:
            specs, caps = draw_batch(args.batch, g)
            with torch.no_grad():
                images = normalize_images(render_training_images(specs, g, cfg.image_size, info.device, ss))
            kinds = torch.tensor([s.kind for s in specs], device=info.device)
        caps, parts = partial_captions(specs, caps, args.partial_captions, g)
        tokens = tokenize(caps, cfg.context_length).to(info.device)
        with loop.autocast_context(info.device, args.amp):
            img_f, txt_f, scale = ddp(images, tokens)
        img_all, txt_all = gather_features(img_f.float(), info), gather_features(txt_f.float(), info)
        kinds_all = gather_features(kinds, info)
        parts_all = gather_features(parts.to(info.device), info) if args.partial_captions > 0 else None
        loss = multi_positive_infonce(img_all, txt_all, kinds_all, scale.float(), parts_all)
        loop.optimizer_step(loss, model, opt, scaler, sched, grad_clip=1.0)
        end = budget.update(step + 1)
        with torch.no_grad():
            loop.unwrap(ddp).logit_scale.clamp_(0, math.log(100))
        log.add(loss=loss.item(), temperature=1.0 / scale.item())
        log.maybe_log(step + 1, force=step + 1 == end, lr=sched.get_last_lr()[0])
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if info.is_main and ((step + 1) % args.ckpt_every == 0 or step + 1 == end):
            ckpt.save(step + 1, model, opt, sched)
            save_clip(model, cfg, args.out)
        if (info.is_main and not args.no_eval and args.eval_every and (step + 1) % args.eval_every == 0
                and step + 1 != end):
            log.write({"step": step + 1, **evaluate(loop.unwrap(ddp), info.device, size=cfg.image_size,
                                                       supersample=ss)})
    bar.close()
    result: dict = {"steps": budget.total, **budget.record()}
    if info.is_main:
        save_clip(model, cfg, args.out)
        if not args.no_eval:
            result.update(evaluate(loop.unwrap(ddp), info.device, size=cfg.image_size, supersample=ss))
            log.write({"step": budget.total, **result})
    loop.cleanup_distributed()
    return result


if __name__ == "__main__":
    main()
