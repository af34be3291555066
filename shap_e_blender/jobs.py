"""Background jobs: a worker runs engine work, a queue carries its events to Blender's main thread.

Worker thread or worker process?  dream-textures runs its generator in a separate *process*: a crash or a CUDA
out-of-memory there cannot take Blender down, and the GIL is never shared. We use a *thread*, because for Shap-E:
  * the engine caches loaded models per process; a thread keeps them warm between clicks with no IPC, so the
    second Generate starts sampling at once (a process would either reload ~1 GB of weights or need a resident
    server with its own lifecycle, ports/pipes and orphan handling);
  * results are numpy arrays (a 256^3 mesh is ~100 MB): a thread hands them over by reference, a process
    pickles them through a pipe;
  * the heavy work is torch kernels and marching cubes, which release the GIL, so the UI stays responsive
    (bench/bench_addon.py measures the main-thread drain time per tick);
  * cancel is a ``threading.Event`` checked between network calls: no signals, no half-written shared memory;
  * Blender ships its own Python; a child process needs the same interpreter and sys.path set-up, which breaks
    in sandboxed/portable installs, while a thread inherits them.
The cost: a native crash in torch would end Blender too, and Python-heavy engine code competes for the GIL.
The one place we do use a process is the dependency installer (pip), started *from* the worker thread.

Rules: this module imports neither bpy nor torch. Only the main thread touches bpy; it calls ``Job.drain()``
from a ``bpy.app.timers`` function (or directly: tests and ``blender -b`` scripts, where no timer fires).
``sync=True`` runs the task in the calling thread with the same events, for batch scripting.
"""

from __future__ import annotations

import itertools
import logging
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
_ids = itertools.count(1)


class Cancelled(Exception):
    """Raised inside a task when the user pressed Cancel (the engine raises its own GenerationCancelled)."""


@dataclass
class Progress:
    fraction: float = 0.0
    text: str = ""
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    stage: str = ""


class JobContext:
    """What a task sees: report progress, emit engine step events, ask whether to stop."""

    def __init__(self, job: "Job"):
        self._job = job

    def should_cancel(self) -> bool:
        return self._job.cancel_requested.is_set()

    def check_cancel(self) -> None:
        if self.should_cancel():
            raise Cancelled()

    def on_step(self, event: Any) -> None:
        """An engine StepEvent (step, total, elapsed_s, stage, eta_s, preview)."""
        self._job.events.put(("step", event))

    def report(self, fraction: float | None, text: str = "") -> None:
        self._job.events.put(("progress", (fraction, text)))

    def notice(self, text: str) -> None:
        """Something the user should see while the job runs (e.g. "running on the CPU")."""
        self._job.events.put(("notice", text))


@dataclass(eq=False)
class Job:
    """One unit of background work; its fields are only updated by ``drain()`` on the main thread."""

    label: str
    kind: str = "generate"
    payload: dict = field(default_factory=dict)  # whatever the main thread needs when the result arrives
    id: int = field(default_factory=lambda: next(_ids))
    status: str = RUNNING
    progress: Progress = field(default_factory=Progress)
    preview: Any = None  # latest (H, W, 3) uint8 preview or None
    preview_serial: int = 0
    notices: list = field(default_factory=list)
    result: Any = None
    error: BaseException | None = None
    started: float = field(default_factory=time.perf_counter)
    events: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue, repr=False)
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.status != RUNNING

    def cancel(self) -> None:
        self.cancel_requested.set()

    def join(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True

    def drain(self, budget_s: float = 0.010) -> str | None:
        """Apply queued events (main thread). Returns the final status once the job ended, else None.

        Stops after ``budget_s`` so a burst of events never stalls a UI tick; the rest waits for the next tick.
        """
        t0 = time.perf_counter()
        while True:
            try:
                kind, value = self.events.get_nowait()
            except queue.Empty:
                return None
            if kind == "step":
                self._apply_step(value)
            elif kind == "notice":
                if value not in self.notices:
                    self.notices.append(value)
            elif kind == "progress":
                frac, text = value
                if frac is not None:
                    self.progress.fraction = max(0.0, min(1.0, float(frac)))
                self.progress.text = text
            else:  # terminal
                self.status = kind
                if kind == DONE:
                    self.result = value
                    self.progress.fraction = 1.0
                elif kind == FAILED:
                    self.error = value
                return self.status
            if time.perf_counter() - t0 > budget_s:
                return None

    def _apply_step(self, ev: Any) -> None:
        p = self.progress
        p.step, p.total = int(ev.step), int(ev.total)
        p.stage = getattr(ev, "stage", "sample")
        p.eta_s = getattr(ev, "eta_s", None)
        p.fraction = p.step / p.total if p.total else 0.0
        eta = f", ETA {p.eta_s:.0f} s" if p.eta_s is not None else ""
        p.text = f"{p.stage.capitalize()} step {p.step}/{p.total}{eta}"
        if getattr(ev, "preview", None) is not None:
            self.preview = ev.preview
            self.preview_serial += 1


def _is_cancel(err: BaseException) -> bool:
    return isinstance(err, Cancelled) or type(err).__name__ == "GenerationCancelled"


def _run(job: Job, task: Callable[[JobContext], Any]) -> None:
    ctx = JobContext(job)
    try:
        result = task(ctx)
    except BaseException as err:  # noqa: BLE001 - everything must reach the main thread, never vanish
        job.events.put((CANCELLED, None) if _is_cancel(err) else (FAILED, err))
        return
    # A cancel that arrives after the last network call still wins: the scene must stay unchanged.
    job.events.put((CANCELLED, None) if ctx.should_cancel() else (DONE, result))


class JobRunner:
    """Runs at most one job at a time (the engine's models are shared, a second job would only queue)."""

    def __init__(self) -> None:
        self.active: Job | None = None

    @property
    def busy(self) -> bool:
        return self.active is not None and not self.active.finished

    def start(self, task: Callable[[JobContext], Any], *, label: str, kind: str = "generate",
              payload: dict | None = None, sync: bool = False) -> Job:
        if self.busy:
            raise RuntimeError("another Shap-E job is still running")
        job = Job(label=label, kind=kind, payload=payload or {})
        self.active = job
        if sync:
            _run(job, task)
        else:
            job.thread = threading.Thread(target=_run, args=(job, task), name=f"shap-e-{kind}-{job.id}",
                                          daemon=True)
            job.thread.start()
        return job

    def cancel(self) -> None:
        if self.active is not None:
            self.active.cancel()

    def clear(self) -> None:
        self.active = None


class NoticeHandler(logging.Handler):
    """Forwards WARNING+ records logged by the worker's own thread (the engine's 'shap_e' logger) as notices."""

    def __init__(self, ctx: JobContext):
        super().__init__(logging.WARNING)
        self.ctx, self.thread_id = ctx, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread_id:
            self.ctx.notice(record.getMessage())


def capture_notices(ctx: JobContext, logger_name: str = "shap_e"):
    """Context manager for use inside a task: engine warnings become panel notices while it runs."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        logger = logging.getLogger(logger_name)
        handler = NoticeHandler(ctx)
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)

    return cm()


def run_subprocess(cmd: list[str], ctx: JobContext, *, env: dict | None = None,
                   on_line: Callable[[str], None] | None = None) -> int:
    """Run ``cmd`` from a worker, streaming its output lines; Cancel terminates it. Returns the exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            bufsize=1)
    reader_done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line and on_line is not None:
                on_line(line)
        reader_done.set()

    threading.Thread(target=read, daemon=True).start()
    while proc.poll() is None:
        if ctx.should_cancel():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise Cancelled()
        time.sleep(0.1)
    reader_done.wait(5)
    return proc.returncode
