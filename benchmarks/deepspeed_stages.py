#!/usr/bin/env python3
"""Step time and peak memory per process: our DDP path vs DeepSpeed ZeRO-1/2/3 on the quickstart.

    python benchmarks/deepspeed_stages.py [--nproc 2] [--steps 30] [--repeats 1] [--backends ddp,zero1,zero2,zero3]

Each run is a real `dist-embed train configs/quickstart.yaml --nproc N` (MiniLM, 32 triplets per
process per step, seq 64, fp32 on CPU), evaluation and checkpoints off. The first logging window
(start-up, first steps) is left out of the step time; peak memory is the largest worker's peak RSS
(and peak GPU memory allocated on CUDA), as the trainer logs it in metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(backend: str, nproc: int, steps: int, out: Path, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "launch.cli", "train", str(REPO / "configs" / "quickstart.yaml"),
            f"output_dir={out}", f"training.max_steps={steps}", "training.log_steps=5", "eval.steps=0",
            "eval.sts=[]", "eval.before_training=false", "checkpoint.steps=0", *extra]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    if backend != "ddp":
        args += ["distributed.backend=deepspeed",
                 f"distributed.deepspeed_config={REPO / 'configs' / 'deepspeed' / backend}.json"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        sys.exit(f"{backend}: exit {r.returncode}\n{r.stderr[-3000:]}")
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if "seconds_per_step" in l]
    timed = train[1:] or train
    return {"s_per_step": statistics.median(l["seconds_per_step"] for l in timed),
            "rss": max(l.get("mem/peak_rss_mib", 0) for l in train),
            "gpu": max((l.get("mem/peak_gpu_mib", 0) for l in train), default=0),
            "loss": train[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--backends", default="ddp,zero1,zero2,zero3")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides, e.g. training.precision=bf16")
    a = ap.parse_args()
    backends = a.backends.split(",")
    results: dict[str, list[dict]] = {b: [] for b in backends}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):  # alternate backends within each repeat
            for b in backends:
                results[b].append(run(b, a.nproc, a.steps, Path(tmp) / f"{b}-{rep}", a.overrides))
                print(f"  {b} repeat {rep + 1}: {results[b][-1]}", file=sys.stderr, flush=True)
    base = statistics.median(r["s_per_step"] for r in results[backends[0]])
    print(f"{a.nproc} processes, {a.steps} steps, quickstart (MiniLM, batch 32/process, seq 64) {' '.join(a.overrides)}")
    print(f"| backend | s/step (median) | vs {backends[0]} | peak RSS/process MiB | peak GPU MiB | last loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for b in backends:
        s = statistics.median(r["s_per_step"] for r in results[b])
        print(f"| {b} | {s:.3f} | {s / base:.2f}x | {max(r['rss'] for r in results[b]):,.0f} | "
              f"{max(r['gpu'] for r in results[b]):,.0f} | {results[b][-1]['loss']:.4f} |")


if __name__ == "__main__":
    main()
