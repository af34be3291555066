"""Embedded model speed: text -> coloured mesh with mini, warm (in one process) and cold (a fresh
``python -m engine generate`` process, as a user runs it), on the CPU unless --device says otherwise.

    python bench/bench_mini.py [--runs 5] [--grid 64] [--device cpu] [--prompt "a red cube"]

Warm rows: the model is loaded and one generation has run; then ``--runs`` generations per sampler (median, min).
Cold rows: ``--runs`` separate processes writing a GLB (median, min, max wall seconds, including interpreter start,
imports, weight hashing and loading), plus one ``-X importtime`` run's biggest top-level imports. Targets
(issue): warm <= 1 s, cold <= 5 s on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLERS = (("heun", 16, "default: Heun, 16 steps"), ("dpmpp_2m", 8, "DPM++ 2M, 8 steps"))


def warm(args) -> list[tuple[str, list[float]]]:
    from engine import pipeline
    from engine.records import GenerationRequest

    rows = []
    for sampler, steps, label in SAMPLERS:
        req = GenerationRequest(prompt=args.prompt, model="mini", grid_size=args.grid, sampler=sampler, steps=steps,
                                device=args.device)
        pipeline.generate(req)  # load + warm-up
        times = []
        for i in range(args.runs):
            t0 = time.perf_counter()
            pipeline.generate(dataclasses.replace(req, seed=i))
            times.append(time.perf_counter() - t0)
        rows.append((label, times))
    return rows


def cold(args) -> tuple[list[float], list[tuple[float, str]]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "engine", "generate", "--prompt", args.prompt, "--grid", str(args.grid),
               "--device", args.device, "--out", os.path.join(tmp, "cold.glb")]
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        r = subprocess.run([sys.executable, "-X", "importtime", *cmd[1:]], cwd=ROOT, env=env, check=True,
                           capture_output=True, text=True)
    top = []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| {1,3}(\S+)$", line)  # top-level (and one level down)
        if m and not line.split("|")[2].startswith("    "):
            top.append((int(m.group(1)) / 1e6, m.group(2)))
    return times, sorted(top, reverse=True)[:6]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--grid", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", default="a red cube")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = warm(args)
    cold_times, imports = cold(args)
    print(f"\nmini text -> coloured mesh, grid {args.grid}, {args.device}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at start; {args.runs} runs each")
    print(f"{'case':<34} {'median s':>9} {'min s':>7} {'max s':>7} {'target':>7} {'ratio':>6}")
    for label, t in rows:
        med = statistics.median(t)
        print(f"{'warm, ' + label:<34} {med:9.2f} {min(t):7.2f} {max(t):7.2f} {'1.0':>7} {med / 1.0:6.2f}")
    med = statistics.median(cold_times)
    print(f"{'cold process, default sampler':<34} {med:9.2f} {min(cold_times):7.2f} {max(cold_times):7.2f} "
          f"{'5.0':>7} {med / 5.0:6.2f}")
    print("cold process, biggest imports (s, cumulative): " + ", ".join(f"{n} {s:.2f}" for s, n in imports))


if __name__ == "__main__":
    main()
