"""Device and precision choice, the loud CPU notice with a time estimate, and the memory preflight.

CUDA when present, with fp16 autocast like the official ``sample_latents(use_fp16=True)``; CPU fp32 otherwise.
The time estimate counts the FLOPs of one guided network call and divides by a throughput measured once on this
machine (a 0.1 s matmul probe), so it is a real estimate rather than a constant.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

from .config import PriorConfig
from .records import EngineError


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # autocast dtype for the networks (float32 = no autocast)

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32

    def autocast_context(self):
        if not self.autocast:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve(device: str = "auto", precision: str = "auto") -> Placement:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> Placement; an unusable choice is an EngineError with a hint."""
    device = (device or "auto").lower()
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise EngineError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("CUDA was requested but no CUDA GPU is usable by this PyTorch build",
                              "install a CUDA build of PyTorch with a matching NVIDIA driver, or use --device cpu")
        if dev.type not in ("cpu", "cuda"):
            raise EngineError(f"unsupported device {device!r}", "use auto, cpu, cuda or cuda:N")
    if precision == "fp16" and dev.type == "cpu":
        raise EngineError("fp16 is only supported on CUDA", "use --precision auto or fp32 on the CPU")
    dtype = torch.float16 if dev.type == "cuda" and precision in ("auto", "fp16") else torch.float32
    return Placement(dev, dtype)


@functools.lru_cache(maxsize=1)
def cpu_gflops() -> float:
    """Measured fp32 matmul throughput of this CPU (GFLOP/s), about 0.1 s to probe."""
    a = torch.randn(512, 512)
    b = torch.randn(512, 512)
    a @ b  # warm up the BLAS threads
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.1:
        a @ b
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t0) / 1e9


def prior_call_flops(cfg: PriorConfig, batch: int) -> float:
    """FLOPs of one prior forward on ``batch`` sequences (matmuls + attention)."""
    cond_tokens = 1 if cfg.cond == "text" else cfg.clip_grid_tokens
    tokens = cfg.latent_ctx + cond_tokens + 1
    w = cfg.width
    per_token = cfg.layers * (12 * w * w) * 2  # qkv 3w², proj w², mlp 8w² -> 2 FLOPs per MAC
    attention = cfg.layers * 2 * 2 * tokens * tokens * w
    io = 2 * cfg.latent_ctx * (cfg.token_channels * w + w * cfg.output_channels)
    return float(batch * (tokens * per_token + attention + io))


def estimate_sampling_seconds(cfg: PriorConfig, *, batch: int, calls: int, guided: bool) -> float:
    flops = prior_call_flops(cfg, batch * (2 if guided else 1)) * calls
    return flops / (cpu_gflops() * 1e9 * 0.6)  # transformer layers reach ~60 % of a plain matmul


def cpu_notice(cfg: PriorConfig, *, batch: int, calls: int, guided: bool) -> float:
    """Warn loudly (logger 'shap_e': the CLI prints it, the add-on shows it in its panel) that sampling runs on
    the CPU, with an estimate; returns the estimate in seconds. Quiet when the estimate is a few seconds."""
    seconds = estimate_sampling_seconds(cfg, batch=batch, calls=calls, guided=guided)
    if seconds > 5:
        logging.getLogger("shap_e").warning(
            "NOTICE: no CUDA GPU in use - running on the CPU in fp32. Estimated sampling time: %s (%d network "
            "calls).", _fmt(seconds), calls)
    return seconds


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def available_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def preflight(cfg: PriorConfig, *, batch: int, placement: Placement, weight_bytes: int) -> None:
    """Refuse a batch whose estimated peak memory exceeds what the device has free (before any work starts)."""
    cond_tokens = 1 if cfg.cond == "text" else cfg.clip_grid_tokens
    tokens = cfg.latent_ctx + cond_tokens + 1
    elem = 2 if placement.autocast else 4
    seq = 2 * batch  # guided: [cond; uncond]
    activations = seq * tokens * cfg.width * 4 * elem * 3  # MLP hidden (4w) dominates; x3 for live copies
    attention = seq * max(1, cfg.heads) * tokens * tokens * 4  # fp32 softmax scores when SDPA falls back
    state = seq * cfg.d_latent * 4 * 6  # x, denoised, derivatives of the sampler
    need = weight_bytes + activations + attention + state
    free = available_memory_bytes(placement.device)
    if free is not None and need > free:
        per_item = max(1, (need - weight_bytes) // max(batch, 1))
        fits = max(0, (free - weight_bytes) // per_item)
        raise EngineError(
            f"a batch of {batch} needs about {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free "
            f"on {placement.device}",
            f"use a batch of at most {fits}" if fits else "close other programs or use a smaller model")
