"""prompt | image -> CLIP condition -> guided Karras sampling of the latent -> STF mesh (SHAP-E.md §3-§6).

``generate`` is the one entry point the CLI and the Blender add-on share. It validates the request before any
heavy work (so bad input costs nothing and leaves nothing behind), picks the device, loads the named model once
per process, samples one latent per batch item (item i uses seed + i, so any variant can be regenerated alone)
and decodes each latent into a coloured mesh.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Callable

import numpy as np
import torch

from . import device as devices
from . import registry
from .records import EngineError, GenerationCancelled, GenerationRequest, MeshRecord, StepEvent

log = logging.getLogger("shap_e")

GRID_SIZES = (16, 32, 48, 64, 96, 128, 192, 256)
MAX_BATCH = 64
MAX_STEPS = 1024


def validate(req: GenerationRequest) -> GenerationRequest:
    """Reject bad input with a message that says what to do; return the request with the prompt stripped."""
    if req.image is None:
        prompt = (req.prompt or "").strip()
        if not prompt:
            raise EngineError("the prompt is empty", "type what to generate, e.g. 'a red cube', or give an image")
        req = dataclasses.replace(req, prompt=prompt)
    elif req.prompt:
        raise EngineError("give either a prompt or an image, not both", "clear one of the two inputs")
    else:
        img = np.asarray(req.image)
        if img.ndim != 3 or img.shape[2] not in (3, 4) or min(img.shape[:2]) < 8:
            raise EngineError(f"the image must be an (H, W, 3|4) array of at least 8x8 pixels, got {img.shape}",
                              "use an RGB or RGBA picture")
    if req.steps is not None and not 1 <= req.steps <= MAX_STEPS:
        raise EngineError(f"steps must be between 1 and {MAX_STEPS}, got {req.steps}", "64 is the official value")
    if req.guidance_scale is not None and (req.guidance_scale < 0 or not np.isfinite(req.guidance_scale)):
        raise EngineError(f"the guidance scale must be >= 0, got {req.guidance_scale}",
                          "use 0 or 1 for no guidance, 15 (text) / 3 (image) as the official notebooks")
    if req.part_weight is not None and not 0.0 <= req.part_weight <= 1.0:
        raise EngineError(f"the part weight must be between 0 and 1, got {req.part_weight}",
                          "0 turns composed guidance off, 1 uses the prompt's parts alone")
    if req.grid_size not in GRID_SIZES:
        raise EngineError(f"grid size {req.grid_size} is not supported", f"choose one of {GRID_SIZES}")
    if not 1 <= req.batch_size <= MAX_BATCH:
        raise EngineError(f"batch size must be between 1 and {MAX_BATCH}, got {req.batch_size}", "use 1-4")
    if req.vertex_colors not in ("auto", "query", "interpolate"):
        raise EngineError(f"unknown vertex colour mode {req.vertex_colors!r}", "use auto, query or interpolate")
    if req.sampler not in ("heun", "euler", "dpmpp_2m"):
        raise EngineError(f"unknown sampler {req.sampler!r}", "choose heun, euler or dpmpp_2m")
    if req.model not in registry.model_names():
        raise EngineError(f"unknown model {req.model!r}", f"choose one of: {', '.join(registry.model_names())}")
    return req


def _network_calls(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def condition(model: registry.LoadedModel, req: GenerationRequest) -> torch.Tensor:
    """The CLIP condition of one item: text (1, D) unit vector or image grid (1, C, T)."""
    if req.mode == "text":
        tokens, truncated = model.clip.tokenize([req.prompt])
        if truncated[0]:
            log.warning("the prompt is longer than CLIP's 77 tokens; only its beginning is used")
        if req.model == "mini":
            _warn_out_of_vocabulary(req.prompt)
        return model.clip.embed_text([req.prompt])
    if req.model == "mini":
        from .conditioning.framing import framing_advice

        advice = framing_advice(req.image, model.clip.cfg.alpha_background)
        if advice:
            log.warning("%s", advice)
    return model.clip.embed_image_grid([np.asarray(req.image)])


def prompt_parts(model: registry.LoadedModel, prompt: str) -> torch.Tensor | None:
    """The CLIP conditions (P, D) of the parts of a text prompt for composed guidance (``prompt_parts``), or None
    when it has none."""
    from .conditioning.prompt_parts import split_color

    parts = split_color(prompt)
    if parts is None:
        return None
    log.debug("composed guidance over %s", parts)
    return model.clip.embed_text(list(parts))


def _warn_out_of_vocabulary(prompt: str) -> None:
    from .training.world import SHAPES

    words = prompt.lower()
    if not any(shape in words for shape in SHAPES):
        log.warning("%s", registry.OFFICIAL_HINT)


def sample_latents(model: registry.LoadedModel, cond: torch.Tensor, *, seeds: list[int], steps: int,
                   guidance: float, sampler: str, placement: devices.Placement,
                   on_step: Callable[[StepEvent], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None,
                   preview_every: int = 0, parts: torch.Tensor | None = None,
                   part_weight: float = 0.0) -> torch.Tensor:
    """Guided Karras sampling of ``len(seeds)`` latents sharing one condition (composed over ``parts`` with
    ``part_weight`` when both are given). Returns (B, d_latent) float32."""
    from .diffusion.denoisers import ClassifierFreeGuidance, KarrasDenoiser, PartsGuidance
    from .diffusion.samplers import get_sampler
    from .diffusion.schedules import exp_alphas_cumprod, karras_sigmas

    bundle = model.bundle
    dev = placement.device
    sigmas = karras_sigmas(steps, bundle.sampler.sigma_min, bundle.sampler.sigma_max, bundle.sampler.rho).to(dev)
    # x_T = sigma_max * N(0, I), one generator per item so a variant is reproducible from its own seed.
    noise = [torch.randn(bundle.prior.d_latent, generator=torch.Generator().manual_seed(s)) for s in seeds]
    x = torch.stack(noise).to(dev) * sigmas[0]
    cond = cond.to(dev).expand(len(seeds), *cond.shape[1:])
    denoiser = KarrasDenoiser(model.prior, exp_alphas_cumprod(bundle.diffusion.timesteps),
                              clip_denoised=bundle.sampler.clip_denoised)
    if parts is not None and part_weight > 0:
        guided = PartsGuidance(denoiser, guidance, parts.to(dev), part_weight)
    else:
        guided = ClassifierFreeGuidance(denoiser, guidance)

    last = {}

    def recording(x_, sigma_, cond_):
        out = guided(x_, sigma_, cond_)
        last["x0"] = out
        return out

    def step_hook(ev: StepEvent) -> None:
        if on_step is None:
            return
        if preview_every and (ev.step % preview_every == 0 or ev.step == ev.total) and "x0" in last:
            ev = dataclasses.replace(ev, preview=_preview(model, last["x0"][0]))
        on_step(ev)

    with torch.inference_mode(), placement.autocast_context():
        x = get_sampler(sampler)(recording, x, sigmas, cond=cond, on_step=step_hook, should_cancel=should_cancel)
    return x.float()


def _preview(model: registry.LoadedModel, latent: torch.Tensor) -> np.ndarray | None:
    try:
        from .render.preview import latent_preview

        return latent_preview(model.decoder, latent.float(), size=64)
    except Exception as err:  # a preview is a nicety: never let it break a generation
        log.debug("preview failed: %s", err)
        return None


def decode(model: registry.LoadedModel, latent: torch.Tensor, *, grid_size: int,
           placement: devices.Placement, vertex_colors: str = "auto") -> MeshRecord:
    from .geometry.extract import extract_mesh

    latent = latent.to(placement.device)
    if latent.numel() != model.bundle.decoder.d_latent:
        raise EngineError(f"latent has {latent.numel()} numbers but model {model.name!r} expects "
                          f"{model.bundle.decoder.d_latent}", "decode it with the model that made it")
    if not torch.isfinite(latent).all():
        raise EngineError("the latent contains NaN or infinite values", "regenerate it (try fp32 precision)")
    with torch.inference_mode():
        return extract_mesh(model.decoder, latent.reshape(-1).float(), grid_size=grid_size,
                            device=placement.device, vertex_colors=vertex_colors)


def _prepare(request: GenerationRequest):
    req = validate(request)
    placement = devices.resolve(req.device, req.precision)
    model = registry.load(req.model, req.mode, placement.device)
    steps = req.steps or model.bundle.sampler.steps
    guidance = model.bundle.sampler.guidance_scale if req.guidance_scale is None else req.guidance_scale
    part_weight = None if req.mode != "text" else \
        model.bundle.sampler.part_weight if req.part_weight is None else req.part_weight
    seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2**31)
    seeds = [seed + i for i in range(req.batch_size)]
    # composed guidance runs the whole prompt, two parts and the unconditional branch: twice a guided batch
    rows = req.batch_size * (2 if part_weight else 1)
    devices.preflight(model.bundle.prior, batch=rows, placement=placement, weight_bytes=model.weight_bytes)
    if placement.device.type == "cpu":
        devices.cpu_notice(model.bundle.prior, batch=rows, calls=_network_calls(req.sampler, steps),
                           guided=bool(part_weight) or guidance not in (0.0, 1.0))
    req = dataclasses.replace(req, steps=steps, guidance_scale=guidance, part_weight=part_weight)
    return req, placement, model, seeds


def _sample(req, placement, model, seeds, on_step, should_cancel) -> torch.Tensor:
    t0 = time.perf_counter()
    with torch.inference_mode(), placement.autocast_context():
        cond = condition(model, req).float()
        parts = prompt_parts(model, req.prompt) if req.mode == "text" and req.part_weight else None
    latents = sample_latents(model, cond, seeds=seeds, steps=req.steps, guidance=req.guidance_scale,
                             sampler=req.sampler, placement=placement, on_step=on_step,
                             should_cancel=should_cancel, preview_every=req.preview_every,
                             parts=None if parts is None else parts.float(), part_weight=req.part_weight or 0.0)
    log.debug("sampled %d latent(s) in %.2f s", len(seeds), time.perf_counter() - t0)
    return latents


def generate_latents(request: GenerationRequest, *, on_step: Callable[[StepEvent], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, list[int]]:
    """Sample only: (B, d_latent) float32 latents and the seed of each."""
    req, placement, model, seeds = _prepare(request)
    return _sample(req, placement, model, seeds, on_step, should_cancel).cpu().numpy(), seeds


def generate(request: GenerationRequest, *, on_step: Callable[[StepEvent], None] | None = None,
             should_cancel: Callable[[], bool] | None = None) -> list[MeshRecord]:
    """Run one request end to end; returns one MeshRecord per batch item (colours linear, Z up)."""
    req, placement, model, seeds = _prepare(request)
    latents = _sample(req, placement, model, seeds, on_step, should_cancel)
    final = dataclasses.replace(req, image=None)
    records = []
    for i, latent in enumerate(latents):
        if should_cancel is not None and should_cancel():
            raise GenerationCancelled()
        rec = decode(model, latent, grid_size=req.grid_size, placement=placement, vertex_colors=req.vertex_colors)
        rec.latent = latent.cpu().numpy().astype(np.float32)
        rec.request = dataclasses.replace(final, seed=seeds[i], batch_size=1)
        rec.seed, rec.model, rec.grid_size = seeds[i], req.model, req.grid_size
        records.append(rec)
    return records


def decode_latent(latent: np.ndarray, *, model: str = "mini", grid_size: int = 64,
                  device: str = "auto", vertex_colors: str = "auto") -> MeshRecord:
    """Decode a stored latent at another grid size (re-decode in Blender, ``python -m engine decode``)."""
    if grid_size not in GRID_SIZES:
        raise EngineError(f"grid size {grid_size} is not supported", f"choose one of {GRID_SIZES}")
    placement = devices.resolve(device)
    # Any mode shares the decoder; the text bundle is present for every model that has a decoder.
    mode = "image" if model == "image300M" else "text"
    loaded = registry.load(model, mode, placement.device)
    arr = np.asarray(latent, dtype=np.float32)
    rec = decode(loaded, torch.from_numpy(arr.reshape(-1).copy()), grid_size=grid_size, placement=placement,
                 vertex_colors=vertex_colors)
    rec.latent, rec.model, rec.grid_size = arr.reshape(-1), model, grid_size
    return rec


def encode_mesh(mesh: MeshRecord, *, model: str = "mini", device: str = "auto", seed: int = 0) -> np.ndarray:
    """Mesh -> latent with the transmitter encoder (point cloud + multiview renders of the mesh)."""
    from .render.pointcloud import mesh_to_encoder_inputs

    if mesh.empty or len(mesh.faces) == 0:
        raise EngineError("the mesh has no faces", "give a mesh with at least one triangle")
    placement = devices.resolve(device)
    transmitter = registry.load_transmitter(model, placement.device)
    cfg = transmitter.encoder.cfg
    inputs = mesh_to_encoder_inputs(mesh, n_points=cfg.n_points, n_views=cfg.n_views, image_size=cfg.image_size,
                                    generator=torch.Generator().manual_seed(seed))
    keys = ("points", "views", "depths", "alphas", "rays", "camera_z")
    with torch.inference_mode():
        latent = transmitter.encode_to_latent(*(inputs[k].to(placement.device) for k in keys), training=False)
    return latent.reshape(-1).float().cpu().numpy()


def render_latent(latent: np.ndarray, *, model: str = "mini", size: int = 128, device: str = "auto") -> np.ndarray:
    """Official NeRF render (pan view 0, black background) of a latent: (size, size, 3) uint8."""
    from .render.cameras import pan_cameras
    from .render.nerf import render_nerf

    placement = devices.resolve(device)
    mode = "image" if model == "image300M" else "text"
    loaded = registry.load(model, mode, placement.device)
    lat = torch.from_numpy(np.asarray(latent, dtype=np.float32).reshape(1, -1)).to(placement.device)
    if lat.shape[1] != loaded.bundle.decoder.d_latent:
        raise EngineError(f"latent has {lat.shape[1]} numbers but model {model!r} expects "
                          f"{loaded.bundle.decoder.d_latent}", "render it with the model that made it")
    with torch.inference_mode():
        field = loaded.decoder.field_fn(lat[0], outputs=("density_coarse", "density_fine", "nerf_rgb_coarse",
                                                         "nerf_rgb_fine"))
        pan = pan_cameras(20, size, device=placement.device)  # the official 20-view pan; its first view
        cam = dataclasses.replace(pan, origin=pan.origin[:1], x=pan.x[:1], y=pan.y[:1], z=pan.z[:1])
        out = render_nerf(field, cam)
    return out["image_u8"][0].cpu().numpy()
