"""No training step waits for the device: for every loss, layout and precision path of a step
(``forward_backward`` and the backend's optimizer step), and for the whole loop on both data
planes, nothing reads a device value back to the host or copies host memory to the device in a way
that blocks, except on log steps (tests/host_reads.py: what counts and how it is found on CPU).

Unpadded layouts run the flash kernel's path with its CPU stand-in (tests/flash_on_cpu.py), in
bf16 as on a GPU; the per-text reference attention, which reads the text boundaries back in every
layer, must never be what a GPU runs (test_gpu_path.py pins the choice). Dropout is on."""
from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
import torch

from dist_embed.data.rows import Row

from conftest import MULTILINGUAL, quick_triplets, step_parts, tiny_config
from flash_on_cpu import flash_kernel_on_cpu
from host_reads import DEVICE, HostReads

SEED = int(os.environ.get("DIST_EMBED_FUZZ_SEED", random.randrange(10**6)))
LOSSES = {  # name -> step_parts arguments
    "mnrl": dict(), "mnrl_same_text": dict(mask_same_text=True), "mnrl_guide": dict(guide=True),
    "cached_mnrl": dict(mini_batch_size=5), "cached_mnrl_tokens": dict(mini_batch_tokens=60),
    "cosine": dict(), "triplet": dict(), "matryoshka": dict(matryoshka=((32, 1.0), (16, 0.5))),
}
LAYOUTS = {  # name -> (layout, length-sorted chunk, precision)
    "padded": ("padded", 0, "fp32"), "chunks": ("padded", 4, "fp32"), "packed": ("packed", 0, "fp32"),
    "unpadded": ("unpadded", 0, "bf16"),
}


def rows_for(loss: str, n: int, rng: random.Random) -> list[Row]:
    texts = [r[c] for r in quick_triplets(100) for c in ("anchor", "positive", "negative")] + MULTILINGUAL
    if loss == "cosine":
        return [Row(i, (rng.choice(texts), rng.choice(texts)), rng.random()) for i in range(n)]
    rows = [Row(i, tuple(rng.choice(texts) for _ in range(3)), None) for i in range(n)]
    if loss == "mnrl_same_text":  # some positives repeat: the mask has work to do
        rows = [Row(r.row_id, (r.texts[0], rows[i // 2].texts[1], r.texts[2]), None) for i, r in enumerate(rows)]
    return rows


def trainer(model_dir, loss: str, layout: str, precision: str, chunk: int, dropout: float = 0.1):
    """A step's parts as set-up builds them, on the sentinel's device: encoder, batch layout,
    all-reduce backend (fused AdamW, clipping, fp16's scaler), loss and embedder."""
    from dist_embed.backends.allreduce import AllReduceBackend
    from dist_embed.backends.optim import param_groups
    from dist_embed.distributed import DistState
    from dist_embed.engine.precision import Precision
    from dist_embed.engine.schedule import lambda_lr
    from dist_embed.engine.step import Embedder
    from dist_embed.model.encoder import Encoder
    from dist_embed.model.layout_choice import choose_layout

    torch.manual_seed(SEED)
    enc = Encoder.from_pretrained(str(model_dir), dropout=dropout).to(DEVICE).train()
    training = SimpleNamespace(layout=layout, pack_length="auto", layout_bucket=0, lr=1e-3, max_grad_norm=1.0)
    # the verdict a GPU gets (kernel for bf16/fp16 on CUDA); the step itself runs on CPU
    varlen = Precision(precision, "cuda", (9, 0)).varlen(enc.transformer.config)
    spec = choose_layout(enc, training, varlen) if layout != "padded" else None
    prec = Precision(precision, "cpu")
    cfg = SimpleNamespace(training=training, distributed=SimpleNamespace(bucket_mb=25.0))
    backend = AllReduceBackend(cfg, DistState(device=DEVICE), enc, prec, param_groups(enc, 0.01),
                               lambda o: lambda_lr(o, lambda: 1.0))
    kw = dict(LOSSES[loss])
    guide = None
    if kw.pop("guide", False):
        guide = Encoder.from_pretrained(str(model_dir)).to(DEVICE).eval().requires_grad_(False)
        kw["guide"] = guide
    name = {"mnrl_same_text": "mnrl", "mnrl_guide": "mnrl", "cached_mnrl_tokens": "cached_mnrl",
            "matryoshka": "mnrl"}.get(loss, loss)
    case = step_parts(name, **kw)
    embedder = Embedder(spec.kind if spec else "padded", chunk, prec.autocast)
    return enc, spec, backend, case.loss, embedder, guide


def batches_for(enc, spec, rows: list[Row], n: int, size: int) -> list:
    """Micro-batches as the loader hands them on a GPU: collated, then pinned."""
    from dist_embed.data.loader import collate

    return [collate(rows[i * size:(i + 1) * size], enc.tokenizer, enc.max_seq_length, spec) for i in range(n)]


def steps_under_sentinel(enc, backend, loss, embedder, batches, guide=None) -> list[str]:
    """The first step outside (lazy optimizer state, as a warm-up), the next watched."""
    from dist_embed.distributed import DistState
    from dist_embed.engine.step import forward_backward
    from dist_embed.outputs.tracking import Window

    state = DistState(device=DEVICE)
    window = Window()
    value, _ = forward_backward(backend.model, batches[0], loss, embedder, state, grads=backend)
    backend.step(value)
    with HostReads() as reads:
        with reads.paused():
            pinned = [b.map_arrays(torch.Tensor, torch.Tensor.pin_memory) for b in batches]  # what the loader does
        reads.watch(enc, backend.optimizer, *[x for x in (guide, backend.scaler) if x is not None])
        for b in pinned[1:]:
            value, info = forward_backward(backend.model, b, loss, embedder, state, grads=backend)
            window.add_batch(b, value)
            result = backend.step(value.detach().clone())
    assert result.grad_norm in reads.device and value in reads.device  # the sentinel saw the step's tensors
    return reads.events


# every loss on padded columns and on unpadded tokens; the layouts that do not change what the loss
# sees (length-sorted chunks, packed rows; cached MNRL embeds padded mini-batches under both) with MNRL
CASES = [(loss, layout) for loss in LOSSES for layout in ("padded", "unpadded")] + \
    [("mnrl", "chunks"), ("mnrl", "packed"), ("mnrl_guide", "chunks")]


@pytest.mark.parametrize("loss,layout", CASES)
def test_no_step_reads_back_from_the_device(tiny_model, loss, layout):
    kind, chunk, precision = LAYOUTS[layout]
    rng = random.Random(SEED + hash((loss, layout)) % 1000)
    enc, spec, backend, loss_obj, embedder, guide = trainer(tiny_model, loss, kind, precision, chunk)
    batches = batches_for(enc, spec, rows_for(loss, 2 * 7, rng), 2, 7)
    with flash_kernel_on_cpu() as calls:
        events = steps_under_sentinel(enc, backend, loss_obj, embedder, batches, guide)
    assert not events, f"seed {SEED}: " + "\n".join(events)
    assert bool(calls) == (kind == "unpadded")  # unpadded layouts ran the kernel path, the others never


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoder_steps_never_read_back(tmp_path, arch):
    """Decoders on the kernel path (rotary positions, causal, grouped-query heads, last-token
    pooling): before the fix transformers' packed-sequence detection read the position ids back in
    every forward (and a [T, T] mask was built)."""
    from test_decoder import make_decoder

    path, _ = make_decoder(tmp_path / "m", arch, "left")
    enc, spec, backend, loss, embedder, _ = trainer(path, "mnrl", "unpadded", "bf16", 0)
    batches = batches_for(enc, spec, rows_for("mnrl", 12, random.Random(SEED)), 2, 6)
    with flash_kernel_on_cpu() as calls:
        events = steps_under_sentinel(enc, backend, loss, embedder, batches)
    assert not events, f"seed {SEED}: " + "\n".join(events)
    assert calls


def test_fp16_loss_scaling_never_reads_back(tiny_model):
    """fp16's GradScaler (unscale, the overflow check, the new scale) stays on the device; a
    non-finite step is skipped by fused AdamW's flag, not by reading it."""
    enc, spec, backend, loss, embedder, _ = trainer(tiny_model, "mnrl", "padded", "fp16", 4)
    assert backend.scaler is not None
    batches = batches_for(enc, spec, rows_for("mnrl", 10, random.Random(SEED)), 2, 5)
    assert not steps_under_sentinel(enc, backend, loss, embedder, batches)


def test_an_empty_slice_never_reads_back(tiny_model):
    """A rank whose slice of a ragged global batch is empty runs placeholder forwards."""
    from dist_embed.data.loader import collate

    enc, spec, backend, loss, embedder, _ = trainer(tiny_model, "mnrl", "padded", "fp32", 4)
    rows = rows_for("mnrl", 6, random.Random(SEED))
    full = collate(rows, enc.tokenizer, enc.max_seq_length, spec)
    empty = collate([], enc.tokenizer, enc.max_seq_length, spec, n_cols=3, global_size=6, sizes=(6,))
    assert not steps_under_sentinel(enc, backend, loss, embedder, [full, empty])


def test_the_sentinel_catches_what_it_should(tiny_model):
    """The reads and copies the sentinel exists for, each caught (and host work left alone)."""
    enc = torch.nn.Linear(4, 4)
    with HostReads() as reads:
        reads.watch(enc)
        y = enc(torch.ones(2, 4)).sum()
        host = torch.arange(3)
        host.tolist(), int(host.sum())  # host values: fine
        y.item()
        bool(y > 0)
        enc.weight[enc.weight > 0]
        torch.tensor([1, 2], device=DEVICE)
        host.to(DEVICE)
        host.to(DEVICE, non_blocking=True)
        host.pin_memory().to(DEVICE, non_blocking=True)  # the one right way
    kinds = [e.split(" at ")[0] for e in reads.events]
    assert kinds == ["read item", "read __bool__", "read aten.index.Tensor with a boolean mask (its output size "
                     "depends on values)", "blocking copy tensor(..., device=...) from host data",
                     "blocking copy to the device without non_blocking=True",
                     "blocking copy to the device from pageable (unpinned) memory"], kinds


@pytest.mark.parametrize("plane,prefetch", [("global", False), ("sharded", True)])
def test_the_loop_reads_back_only_on_log_steps(tmp_path, tiny_model, triplets, plane, prefetch):
    """The whole loop (loader, step, optimizer, hooks, stop checks) with the sentinel on, except
    where it reads on purpose: log steps, evaluations, checkpoints, the end of an epoch. Both data
    planes; the sharded one with batches prefetched in a background thread (as on a GPU)."""
    from dist_embed.config import load_config
    from dist_embed.distributed import DistState
    from dist_embed.engine.setup import build_run

    cfg = load_config(tiny_config(tmp_path, tiny_model, triplets, model={"dropout": 0.1},
                                  data={"plane": plane, "prefetch": prefetch},
                                  loss={"name": "mnrl", "mask_same_text": True},
                                  training={"max_steps": 7, "log_steps": 3, "batch_size": 6}, checkpoint={"steps": 4}))
    run = build_run(cfg, DistState(device=DEVICE))
    assert run.data.plan.specs[0].plane == plane and run.data.prefetch == prefetch
    events = loop_watched(run)
    assert run.pos.step == 7
    assert not events, f"seed {SEED}: " + "\n".join(events)


def loop_watched(run) -> list[str]:
    """``loop(run)`` under the sentinel, paused where the loop reads on purpose."""
    from dist_embed.engine import loop as loop_module
    from dist_embed.engine import resume
    from dist_embed.outputs import tracking

    with HostReads() as reads:
        reads.watch(run.encoder)
        real = {name: getattr(loop_module, name) for name in ("read_steps", "evaluate", "warn_short_batches")}
        real_save = resume.save
        real_losses = tracking.Window.losses  # the window's losses go into a checkpoint: read on purpose

        def paused(fn):
            def call(*args, **kwargs):
                with reads.paused():
                    out = fn(*args, **kwargs)
                reads.watch(run.backend.optimizer)
                return out
            return call

        try:
            for name, fn in real.items():
                setattr(loop_module, name, paused(fn))
            resume.save = paused(real_save)
            tracking.Window.losses = paused(real_losses)
            loop_module.loop(run)
        finally:
            for name, fn in real.items():
                setattr(loop_module, name, fn)
            resume.save = real_save
            tracking.Window.losses = real_losses
    return reads.events


def deepspeed_worker(config: str) -> None:
    """A one-process DeepSpeed run under the sentinel (run by the test below in a process of its
    own: DeepSpeed and accelerate keep process-wide state); prints the events as a JSON line."""
    import json
    from dataclasses import replace

    from dist_embed.config import load_config
    from dist_embed.distributed import init_distributed
    from dist_embed.engine.setup import build_run

    state = replace(init_distributed(group_of_one=True), device=DEVICE)
    run = build_run(load_config(config), state)
    print(json.dumps(loop_watched(run)))


@pytest.mark.slow
def test_a_deepspeed_step_reads_back_only_inside_deepspeed(tmp_path, tiny_model, triplets):
    """The DeepSpeed backend (ZeRO-2; cached MNRL, several backward passes per step): our side of
    its step reads nothing back (before, it read the loss and the norm every step). What DeepSpeed
    reads itself (its overflow check, its norm) is its own."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    cfg = tiny_config(tmp_path, tiny_model, triplets, loss={"name": "cached_mnrl", "mini_batch_size": 3},
                      training={"max_steps": 4, "log_steps": 4, "batch_size": 6, "grad_accum": 2},
                      distributed={"backend": "deepspeed",
                                   "deepspeed_config": str(REPO / "configs" / "deepspeed" / "zero2.json")})
    code = "import sys; sys.path.insert(0, 'tests'); import test_host_reads as t; t.deepspeed_worker(sys.argv[1])"
    r = subprocess.run([sys.executable, "-c", code, str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    events = json.loads(r.stdout.strip().splitlines()[-1])
    ours = [e for e in events if "deepspeed/" not in e.split(" at ", 1)[1]]
    assert not ours, "\n".join(ours)
