"""jobs.py: worker thread + queue + cancel, drained like Blender's timer would (no bpy needed)."""

import ast
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shap_e_blender import jobs  # noqa: E402


def _ev(step, total, preview=None):
    return SimpleNamespace(step=step, total=total, stage="sample", eta_s=float(total - step), preview=preview)


def drain_to_end(job, timeout=10.0):
    t_end = time.time() + timeout
    while time.time() < t_end:
        status = job.drain()
        if status is not None:
            return status
        time.sleep(0.001)
    raise AssertionError("job did not finish")


def test_module_imports_neither_bpy_nor_torch():
    tree = ast.parse((ROOT / "shap_e_blender" / "jobs.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"bpy", "torch", "numpy"}


def test_thread_job_reports_steps_then_result_on_the_draining_thread():
    runner = jobs.JobRunner()
    worker_threads = []

    def task(ctx):
        worker_threads.append(threading.current_thread())
        for i in range(1, 4):
            ctx.on_step(_ev(i, 3, preview=b"img" if i == 2 else None))
        return "records"

    job = runner.start(task, label="t")
    assert runner.busy
    assert drain_to_end(job) == jobs.DONE
    assert job.result == "records" and job.progress.step == 3 and job.progress.fraction == 1.0
    assert "step 3/3" in job.progress.text and job.preview == b"img" and job.preview_serial == 1
    assert worker_threads[0] is not threading.current_thread()
    assert not runner.busy


def test_cancel_between_calls_yields_cancelled_and_no_result():
    runner = jobs.JobRunner()
    started = threading.Event()
    calls = []

    def task(ctx):
        for i in range(1000):
            ctx.check_cancel()  # what the engine's sampler does between network calls
            calls.append(i)
            started.set()
            time.sleep(0.002)
        return "never"

    job = runner.start(task, label="t")
    started.wait(5)
    runner.cancel()
    assert drain_to_end(job) == jobs.CANCELLED
    assert job.result is None and len(calls) < 1000


def test_engine_generation_cancelled_counts_as_cancel():
    class GenerationCancelled(Exception):
        pass

    def task(ctx):
        raise GenerationCancelled()

    job = jobs.JobRunner().start(task, label="t", sync=True)
    assert job.drain() == jobs.CANCELLED


def test_cancel_after_last_call_still_discards_result():
    def task(ctx):
        ctx._job.cancel()  # the user pressed Cancel while the last decode was finishing
        return "late result"

    job = jobs.JobRunner().start(task, label="t", sync=True)
    assert job.drain() == jobs.CANCELLED and job.result is None


def test_errors_reach_the_main_thread():
    def task(ctx):
        raise ValueError("boom")

    job = jobs.JobRunner().start(task, label="t")
    assert drain_to_end(job) == jobs.FAILED
    assert isinstance(job.error, ValueError) and str(job.error) == "boom"


def test_sync_mode_runs_in_caller_thread_with_same_events():
    seen = []

    def task(ctx):
        seen.append(threading.current_thread())
        ctx.on_step(_ev(1, 2))
        ctx.report(0.75, "decoding")
        return 42

    runner = jobs.JobRunner()
    job = runner.start(task, label="t", sync=True)
    assert seen == [threading.current_thread()] and job.thread is None
    assert job.drain(budget_s=float("inf")) == jobs.DONE and job.result == 42


def test_one_job_at_a_time():
    gate = threading.Event()
    runner = jobs.JobRunner()
    job = runner.start(lambda ctx: gate.wait(5), label="a")
    with pytest.raises(RuntimeError):
        runner.start(lambda ctx: None, label="b")
    gate.set()
    drain_to_end(job)
    runner.start(lambda ctx: None, label="c", sync=True)


def test_drain_respects_its_time_budget():
    def task(ctx):
        for i in range(20000):
            ctx.on_step(_ev(i + 1, 20000))
        return None

    job = jobs.JobRunner().start(task, label="t", sync=True)
    t0 = time.perf_counter()
    assert job.drain(budget_s=0.002) is None  # stopped early, events left for the next tick
    assert time.perf_counter() - t0 < 0.05
    assert 0 < job.progress.step < 20000


def test_run_subprocess_streams_lines_and_cancel_terminates():
    lines = []
    job = jobs.Job(label="pip")
    ctx = jobs.JobContext(job)
    code = jobs.run_subprocess([sys.executable, "-c", "print('Collecting torch'); print('done')"], ctx,
                               on_line=lines.append)
    assert code == 0 and lines == ["Collecting torch", "done"]
    job.cancel()
    t0 = time.perf_counter()
    with pytest.raises(jobs.Cancelled):
        jobs.run_subprocess([sys.executable, "-c", "import time; time.sleep(30)"], ctx)
    assert time.perf_counter() - t0 < 10


def test_engine_warnings_from_the_worker_become_notices():
    import logging

    def task(ctx):
        with jobs.capture_notices(ctx):
            logging.getLogger("shap_e").warning("running on the CPU")
            logging.getLogger("shap_e").info("not shown")
        return 1

    job = jobs.JobRunner().start(task, label="t")
    assert drain_to_end(job) == jobs.DONE
    assert job.notices == ["running on the CPU"]
    assert not logging.getLogger("shap_e").handlers  # removed again
