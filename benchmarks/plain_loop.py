#!/usr/bin/env python3
"""The ceiling side of benchmarks/gpu.py: a plain PyTorch loop on the same rows in the same batches.

Batches are tokenized before the clock starts and each column is padded to its longest text (what a
hand-written loop does); Hugging Face's model with SDPA attention, mean pooling, MNRL (scale 20),
fused AdamW, autocast (fp16 with a GradScaler), gradient clipping at 1.0. No data loading, no
checkpoints, no logging: what a step costs the chip at best. Writes JSON to --out.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from transformers import AutoModel, AutoTokenizer

    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, attn_implementation="sdpa").to(device).train()
    rows = [json.loads(line) for line in open(args.data)]
    total = args.warmup + args.steps
    batches = []
    for s in range(total):
        part = rows[s * args.batch:(s + 1) * args.batch]
        batches.append([tok([r[c] for r in part], padding=True, truncation=True, max_length=128, return_tensors="pt")
                        for c in ("anchor", "positive", "negative")])
    real = [sum(int(f["attention_mask"].sum()) for f in b) for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01, fused=True)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def embed(f):
        f = {k: v.to(device, non_blocking=True) for k, v in f.items()}
        states = model(**f).last_hidden_state
        mask = f["attention_mask"].unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1)

    start = None
    for i, b in enumerate(batches):
        if i == args.warmup:
            sync()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            a, p, n = (embed(f) for f in b)
            scores = F.normalize(a.float(), dim=-1) @ F.normalize(torch.cat([p, n]).float(), dim=-1).T * 20.0
            loss = F.cross_entropy(scores, torch.arange(len(a), device=device))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    json.dump({"step_s": seconds, "real_tokens": sum(real[args.warmup:]) / args.steps, "peak_gib": peak,
               "params": sum(p.numel() for p in model.parameters()),
               "embedding_params": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))},
              open(args.out, "w"))


if __name__ == "__main__":
    main()
