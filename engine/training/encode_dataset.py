"""Encode the training split of the mini world into latents for stage (c) (SHAP-E.md §3.1 latent layout, §10).

For every TRAIN kind (held-out (shape, colour) pairs are never encoded) ``per_kind`` objects with random yaw and
value jitter are rendered into an ``ObjectBank`` chunk and encoded by the trained transmitter in eval mode (tanh
bottleneck, no noise). Alongside each latent the file keeps its spec, ``cond_views`` conditioning renders (random
view, plain white background, like the evaluation's image prompts) and, per kind, a bank of distinct captions
(templates and synonyms vary). With a CLIP given, the frozen conditioner's outputs are stored as well:
``caption_emb`` = embed_text (unit, (M, embed_dim)) and ``image_grids`` = embed_image_grid ((N, Vc, width, tokens)
fp16), so the prior trainer needs no CLIP at all.

    python -m engine.training.encode_dataset --transmitter DIR --clip DIR --out DIR/latents.pt [--per-kind 16]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from engine.config import DecoderConfig, EncoderConfig, from_dict
from engine.models.transmitter import Transmitter

from . import render_world
from .object_bank import build_bank
from .captions import caption, partial_caption_bank
from .world import YAWED_SHAPES, ObjectSpec, allowed_kinds, is_held_out, kind_from_index


def train_specs(per_kind: int, generator: torch.Generator, jitter: float = 0.05, kind_stride: int = 1
                ) -> list[ObjectSpec]:
    """``per_kind`` random instances of every train kind (every ``kind_stride``-th for quick checks)."""
    return [spec for k in allowed_kinds("train")[::kind_stride]
            for spec in random_instances(k, per_kind, generator, jitter)]


def random_instances(kind: int, n: int, generator: torch.Generator, jitter: float = 0.05) -> list[ObjectSpec]:
    """``n`` instances of one kind with a random yaw (yawed shapes) and shade jitter in ±``jitter``."""
    s, a, c = kind_from_index(kind)
    specs = []
    for _ in range(n):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        specs.append(ObjectSpec(s, a, c, yaw=u[0] * torch.pi / 2 if s in YAWED_SHAPES else 0.0,
                                value_jitter=(2 * u[1] - 1) * jitter))
    return specs


def caption_bank(kinds: list[int], generator: torch.Generator, draws: int = 160) -> tuple[list[str], torch.Tensor]:
    """Distinct captions per kind (from ``draws`` random draws each) and their kind index (M,)."""
    texts, owner = [], []
    for k in kinds:
        spec = ObjectSpec(*kind_from_index(k))
        seen = sorted({caption(spec, generator) for _ in range(draws)})
        texts += seen
        owner += [k] * len(seen)
    return texts, torch.tensor(owner)


def load_transmitter(directory: str, device) -> Transmitter:
    """Transmitter from ``train_transmitter``'s output folder (fp32 EMA weights + config JSON)."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads(open(os.path.join(directory, "transmitter_config.json")).read())
    model = Transmitter(from_dict(EncoderConfig, cfg["encoder"]), from_dict(DecoderConfig, cfg["decoder"]),
                        device=device)
    model.load_state_dict(load_file(os.path.join(directory, "transmitter.safetensors"), device=str(device)))
    return model.eval()


class ClipEmbedder:
    """Batched text / grid embeddings of a frozen conditioner (``embed_text``, ``embed_image_grid``)."""

    def __init__(self, conditioner):
        self.cond = conditioner

    @torch.no_grad()
    def text(self, texts: list[str], batch: int = 1024) -> torch.Tensor:
        return torch.cat([self.cond.embed_text(texts[i:i + batch]).float().cpu() for i in range(0, len(texts), batch)])

    @torch.no_grad()
    def grid(self, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """images (N, S, S, 3) float sRGB in [0, 1] -> (N, width, tokens) fp16."""
        from engine.conditioning.clip import CLIP_MEAN, CLIP_STD

        # Renders are already at the CLIP size: preprocessing reduces to the mean/std normalisation.
        mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
        return torch.cat([self.cond.embed_image_grid((images[i:i + batch].permute(0, 3, 1, 2) - mean) / std)
                          .half().cpu() for i in range(0, len(images), batch)])


def clip_conditioner(clip_dir: str, device):
    """The inference conditioner (engine.conditioning.clip) on a trained mini CLIP folder."""
    import json

    from engine.conditioning.clip import ClipConditioner, build_open_clip
    from engine.config import ClipConfig
    from safetensors.torch import load_file

    cfg = from_dict(ClipConfig, json.loads(open(os.path.join(clip_dir, "clip_config.json")).read()))
    model = build_open_clip(cfg)
    model.load_state_dict(load_file(os.path.join(clip_dir, "clip.safetensors")))
    return ClipConditioner(cfg, model, device=device)


@torch.no_grad()
def encode_dataset(transmitter: Transmitter, out_path: str, *, per_kind: int = 16, cond_views: int = 4,
                   clip: ClipEmbedder | None = None, device="cpu", seed: int = 0, chunk: int = 256,
                   cond_size: int = 64, supersample: int = 2, kind_stride: int = 1) -> dict:
    """Write the dataset file (torch.save dict, atomically) and return it."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    enc = transmitter.encoder.cfg
    specs = train_specs(per_kind, g, kind_stride=kind_stride)
    assert not any(is_held_out(s.shape, s.color) for s in specs)
    t0 = time.time()
    latents, images = [], []
    for start in range(0, len(specs), chunk):
        part = specs[start:start + chunk]
        bank = build_bank(part, g, n_points=enc.n_points, data_ctx=enc.data_ctx, n_surface=0, n_views=enc.n_views,
                          image_size=enc.image_size, max_depth=enc.max_depth, device=dev, chunk=chunk)
        idx = torch.arange(len(part), device=dev)
        latents.append(transmitter.encode_batch(bank.encoder_batch(idx), training=False).float().cpu())
        rgb = render_world.condition_images(part * cond_views, g, size=cond_size, supersample=supersample,
                                            device=dev)  # (Vc·B, S, S, 3), view-major
        rgb = rgb.view(cond_views, len(part), cond_size, cond_size, 3).transpose(0, 1)
        images.append((rgb * 255).round().clamp(0, 255).to(torch.uint8).cpu())
    kinds = sorted({s.kind for s in specs})
    texts, owner = caption_bank(kinds, g)
    blob = {
        "latents": torch.cat(latents).half(),  # (N, d_latent); tanh-bounded, fp16 is exact to ~5e-4
        "kind": torch.tensor([s.kind for s in specs]), "shape": torch.tensor([s.shape for s in specs]),
        "aspect": torch.tensor([s.aspect for s in specs]), "color": torch.tensor([s.color for s in specs]),
        "yaw": torch.tensor([s.yaw for s in specs]), "jitter": torch.tensor([s.value_jitter for s in specs]),
        "cond_images": torch.cat(images),  # (N, Vc, S, S, 3) uint8 sRGB
        "caption_texts": texts, "caption_kind": owner, "caption_emb": None, "image_grids": None,
        "split": "train", "per_kind": per_kind, "seed": seed,
    }
    if clip is not None:
        blob["caption_emb"] = clip.text(texts)
        add_partial_captions(blob, clip)
        flat = blob["cond_images"].flatten(0, 1).to(dev).float() / 255
        grids = clip.grid(flat)  # (N·Vc, width, tokens)
        blob["image_grids"] = grids.view(len(specs), cond_views, *grids.shape[1:])
    blob["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    torch.save(blob, out_path + ".tmp")
    os.replace(out_path + ".tmp", out_path)
    return blob


def add_partial_captions(blob: dict, clip: ClipEmbedder) -> dict:
    """Store the partial captions of the dataset's kinds (``captions.partial_caption_bank``: shape only, colour
    only), their part keys and their CLIP text vectors (``partial_texts``, ``partial_key``, ``partial_emb``)."""
    texts, keys = partial_caption_bank(sorted(set(blob["kind"].tolist())))
    blob.update(partial_texts=texts, partial_key=keys, partial_emb=clip.text(texts))
    return blob


def add_zoomed_views(blob: dict, clip: ClipEmbedder, views: int, max_scale: float, seed: int = 0) -> dict:
    """Append ``views`` conditioning views per object, each one of its renders with the canvas scaled by a factor
    drawn log-uniformly in [1/max_scale, max_scale] (``framing.reframe``: padded with the background or cropped,
    then resized back to the render size), with their CLIP grids: the image prior then learns to read a shape
    whatever its size in the picture. Latents and captions are unchanged; ``zoom_scales`` (N, views) records the
    factors (1 for the original views)."""
    import math

    import torch.nn.functional as F

    from engine.conditioning.framing import reframe

    if blob.get("image_grids") is None:
        raise ValueError("the dataset has no image grids to extend: encode it with --clip")
    g = torch.Generator().manual_seed(seed)
    imgs = blob["cond_images"]  # (N, Vc, S, S, 3) uint8
    n, vc, size = imgs.shape[0], imgs.shape[1], imgs.shape[2]
    src = torch.randint(vc, (n, views), generator=g)
    scales = torch.exp((torch.rand(n, views, generator=g) * 2 - 1) * math.log(max_scale))
    out = torch.empty(n, views, size, size, 3, dtype=torch.uint8)
    for i in range(n):
        for v in range(views):
            pic = torch.from_numpy(reframe(imgs[i, src[i, v]].numpy(), float(scales[i, v])))
            pic = F.interpolate(pic.permute(2, 0, 1)[None].float(), size=(size, size), mode="bilinear",
                                antialias=True, align_corners=False)
            out[i, v] = pic[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)
    grids = clip.grid(out.flatten(0, 1).float() / 255)
    blob["cond_images"] = torch.cat([imgs, out], 1)
    blob["image_grids"] = torch.cat([blob["image_grids"], grids.view(n, views, *grids.shape[1:])], 1)
    blob["zoom_scales"] = torch.cat([torch.ones(n, vc), scales], 1)
    return blob


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--transmitter", default=None, help="folder written by train_transmitter")
    p.add_argument("--clip", default=None, help="folder written by train_clip (stores CLIP conditions)")
    p.add_argument("--out", required=True)
    p.add_argument("--per-kind", type=int, default=16)
    p.add_argument("--cond-views", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--zoom-views", type=int, default=0,
                   help="add this many conditioning views per object with the picture padded or cropped (needs --clip)")
    p.add_argument("--zoom-max", type=float, default=1.6, help="largest pad / crop factor of --zoom-views")
    p.add_argument("--augment", default=None,
                   help="add partial captions (if missing) and --zoom-views to this existing dataset file instead of "
                        "encoding (written to --out)")
    a = p.parse_args(argv)
    from .loop import resolve_device

    dev = resolve_device(a.device)
    if a.augment:
        if not a.clip:
            p.error("--augment needs --clip")
        blob = torch.load(a.augment, map_location="cpu", weights_only=False)
        clip = ClipEmbedder(clip_conditioner(a.clip, dev))
        if blob.get("partial_emb") is None:
            add_partial_captions(blob, clip)
        if a.zoom_views > 0:
            add_zoomed_views(blob, clip, a.zoom_views, a.zoom_max)
        torch.save(blob, a.out + ".tmp")
        os.replace(a.out + ".tmp", a.out)
        print(f"{len(blob['latents'])} objects, {len(blob['partial_texts'])} partial captions, "
              f"{a.zoom_views} zoomed views added -> {a.out}")
        return blob
    if not a.transmitter:
        p.error("--transmitter is required to encode")
    model = load_transmitter(a.transmitter, dev)
    clip = ClipEmbedder(clip_conditioner(a.clip, dev)) if a.clip else None
    blob = encode_dataset(model, a.out, per_kind=a.per_kind, cond_views=a.cond_views, clip=clip, device=dev,
                          seed=a.seed)
    print(f"encoded {len(blob['latents'])} objects, {len(blob['caption_texts'])} captions in {blob['seconds']} s")
    return blob


if __name__ == "__main__":
    main()
