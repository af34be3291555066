"""Shared training-loop utilities: single process (CPU/GPU) or torchrun DDP.

* ``setup_distributed``: reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and initialises gloo (CPU) or nccl (CUDA);
  without them it is a single process.
* Per-rank randomness through ``step_generator(seed, rank, step)`` (a fresh torch.Generator per step), so a resumed
  run draws exactly the batches an uninterrupted run would have drawn.
* ``Checkpointer``: model + optimizer + scheduler + EMA + step in one file, written atomically (temp + os.replace).
* ``MetricLogger``: every N steps to stdout and a jsonl file (rank 0 only); tqdm progress bar on rank 0.
* AdamW with linear warmup + cosine decay (Loshchilov & Hutter), optional EMA of the weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.records import EngineError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when available, else cpu; 'cuda' picks the local rank's GPU under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EngineError("--device cuda was requested but no CUDA device is available",
                              "use --device cpu or --device auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise torch.distributed from torchrun's environment (or stay single-process)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def set_cpu_threads(threads: int, info: DistInfo) -> None:
    """Intra-op threads: ``threads`` if > 0; for CPU DDP, the cores split between the local ranks (oversubscribed
    OpenMP threads spin and can make a step 10-100x slower)."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif info.distributed and info.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def step_generator(seed: int, rank: int = 0, step: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator unique to (seed, rank, step, stream); splitmix-style mixing keeps streams unrelated."""
    x = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB + stream * 0x2545F491)
    x &= (1 << 63) - 1
    return torch.Generator().manual_seed(x)


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= info.world_size
    return x


# ----------------------------------------------------------------------------------------------------------------
# Optimisation


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.05,
                    betas: tuple[float, float] = (0.9, 0.98)) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, embeddings and scalars (params with < 2 dims or named *embedding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.1
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base lr over ``warmup`` steps, then cosine down to ``min_ratio`` x base at ``total``.

    The end is the lr function's attribute ``total``, so that a time budget (``StepBudget``) can move it and a
    shortened run still anneals to its floor. (A plain function, so LambdaLR does not save it: a resumed run
    plans its steps anew, from its own arguments.)"""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        prog = min(1.0, (step - warmup) / max(1, f.total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    f.total = total
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


class StepBudget:
    """Fits a stage's step count into a wall-clock budget (``seconds``; 0: no budget, ``total`` stays ``steps``).

    After ``skip`` warm-up steps (CUDA kernels load, caches fill) it times the steps and, every ``check_every``
    steps, sets ``total`` to as many steps as the time left allows (never more than planned, never fewer than
    are done), and moves the cosine schedule's end there: a shortened run still anneals to its floor rather than
    stopping at a high learning rate. The time counts from ``t_start`` (default: now), so what a trainer does
    before its loop (building a bank) is inside the budget. Under DDP the slowest rank's pace decides, so that
    every rank stops at the same step."""

    clock = staticmethod(time.monotonic)
    skip, check_every = 5, 25

    def __init__(self, steps: int, seconds: float = 0.0, *, start: int = 0, sched=None, info: DistInfo | None = None,
                 t_start: float | None = None):
        self.planned = self.total = steps
        self.seconds, self.start, self.sched, self.info = seconds, start, sched, info
        self.t_start = self.clock() if t_start is None else t_start
        self.t_skip: float | None = None

    def update(self, done: int) -> int:
        """Call after each step with the number of steps done; returns ``total``."""
        n = done - self.start
        if self.seconds <= 0 or n < self.skip:
            return self.total
        now = self.clock()
        if n == self.skip:
            self.t_skip = now
        elif (n - self.skip) % self.check_every == 0:
            pace = torch.tensor([(now - self.t_skip) / (n - self.skip)])
            left = torch.tensor([self.seconds - (now - self.t_start)])
            if self.info is not None and self.info.distributed:
                pace, left = pace.to(self.info.device), left.to(self.info.device)
                dist.all_reduce(pace, op=dist.ReduceOp.MAX)
                dist.all_reduce(left, op=dist.ReduceOp.MIN)
            fit = done + max(0, int(float(left) / max(float(pace), 1e-9)))
            self.total = max(done, min(self.planned, fit))
            if self.sched is not None and hasattr(self.sched.lr_lambdas[0], "total"):
                self.sched.lr_lambdas[0].total = self.total
        return self.total

    def record(self) -> dict:
        """What a stage's summary says of it."""
        return {"planned_steps": self.planned, "time_budget_s": self.seconds} if self.seconds > 0 else {}


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, sd: dict) -> None:
        self.decay = sd["decay"]
        self.shadow = {k: v.clone() for k, v in sd["shadow"].items()}

    def copy_to(self, model: torch.nn.Module) -> None:
        sd = model.state_dict()
        model.load_state_dict({k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in sd.items()})


def autocast_context(device: torch.device, amp: str = "auto"):
    """bf16 autocast on CUDA when supported (fp16 otherwise), nothing on CPU or with amp='none'."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def make_grad_scaler(device: torch.device, amp: str = "auto") -> torch.amp.GradScaler:
    """A GradScaler that is only enabled for fp16 autocast (bf16 and fp32 need no loss scaling)."""
    fp16 = device.type == "cuda" and (amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()))
    return torch.amp.GradScaler("cuda", enabled=fp16)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and logging


class Checkpointer:
    """Save / resume training state as ``<dir>/checkpoint.pt`` (atomic: a temp file in the folder, then replace)."""

    def __init__(self, directory: str, name: str = "checkpoint.pt"):
        self.dir = directory
        self.path = os.path.join(directory, name)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             scheduler=None, ema: EMA | None = None, extra: dict | None = None) -> str:
        os.makedirs(self.dir, exist_ok=True)
        state = {"step": step, "model": unwrap(model).state_dict(),
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "ema": ema.state_dict() if ema is not None else None, "extra": extra or {}}
        tmp = self.path + f".tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        return self.path

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def load(self, model: torch.nn.Module, optimizer=None, scheduler=None, ema: EMA | None = None,
             map_location="cpu") -> tuple[int, dict]:
        """Restore what was saved; returns (step, extra). Raises EngineError when there is nothing to resume."""
        if not self.exists():
            raise EngineError(f"no checkpoint to resume at {self.path}", "start without --resume")
        state = torch.load(self.path, map_location=map_location, weights_only=False)
        unwrap(model).load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        return int(state["step"]), state.get("extra", {})


class MetricLogger:
    """Running means of scalar metrics; every ``every`` steps a line to stdout and a jsonl record (rank 0 only)."""

    def __init__(self, path: str | None, every: int = 10, enabled: bool = True):
        self.path, self.every, self.enabled = path, every, enabled
        self.sums: dict[str, float] = {}
        self.count = 0
        self.t0 = time.time()
        if enabled and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def add(self, **metrics: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def maybe_log(self, step: int, force: bool = False, **extra) -> dict | None:
        if not (force or step % self.every == 0) or self.count == 0:
            return None
        rec = {"step": step, **{k: v / self.count for k, v in self.sums.items()}, **extra,
               "elapsed_s": round(time.time() - self.t0, 2)}
        self.sums, self.count = {}, 0
        if self.enabled:
            self.write(rec)
        return rec

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), flush=True)
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")


def progress(total: int, initial: int, enabled: bool):
    """A tqdm bar on rank 0 (a no-op object elsewhere or when tqdm is missing)."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, dynamic_ncols=True, mininterval=2.0)
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            pass

    return _Null()


# ----------------------------------------------------------------------------------------------------------------
# One stage's optimisation state


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer, scaler, sched,
                   grad_clip: float, ema: EMA | None = None) -> None:
    """Backward (through the grad scaler), clip the gradient norm, step the optimizer and schedule, update the EMA."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
    if ema is not None:
        ema.update(model)


@dataclass
class Stage:
    """What a trainer's loop holds: the DDP-wrapped model, AdamW, its warmup-cosine schedule, the EMA, the
    checkpoint, the grad scaler, the metric log, the progress bar, the step it starts (or resumes) at and its time
    budget (whose ``total`` is the step the loop ends at)."""

    ddp: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: EMA
    ckpt: Checkpointer
    scaler: torch.amp.GradScaler
    log: MetricLogger
    bar: object
    start: int
    budget: StepBudget

    def step(self, loss: torch.Tensor, model: torch.nn.Module, grad_clip: float) -> None:
        optimizer_step(loss, model, self.opt, self.scaler, self.sched, grad_clip, self.ema)

    def save(self, step: int, model: torch.nn.Module) -> None:
        self.ckpt.save(step, model, self.opt, self.sched, self.ema)


def start_stage(model: torch.nn.Module, out_dir: str, info: DistInfo, *, steps: int, lr: float,
                weight_decay: float, warmup: int, ema_decay: float, amp: str, log_every: int,
                resume: bool = False, max_seconds: float = 0.0, t_start: float | None = None) -> Stage:
    """Build a ``Stage`` for ``model`` (already on its device); with ``resume``, continue from ``out_dir``'s
    checkpoint when there is one. The bar shows on rank 0 for runs of more than 50 steps. ``max_seconds`` > 0
    fits the step count into that many seconds from ``t_start`` (``StepBudget``)."""
    opt = build_optimizer(model, lr, weight_decay)
    sched = warmup_cosine(opt, warmup, steps)
    ema = EMA(model, ema_decay)
    ckpt = Checkpointer(out_dir)
    start = 0
    if resume and ckpt.exists():
        start, _ = ckpt.load(model, opt, sched, ema, map_location=info.device)
    return Stage(ddp=wrap_ddp(model, info), opt=opt, sched=sched, ema=ema, ckpt=ckpt,
                 scaler=make_grad_scaler(info.device, amp),
                 log=MetricLogger(os.path.join(out_dir, "metrics.jsonl"), log_every, enabled=info.is_main),
                 bar=progress(steps, start, info.is_main and steps - start > 50), start=start,
                 budget=StepBudget(steps, max_seconds, start=start, sched=sched, info=info, t_start=t_start))
