"""The GPU step's logic, held on CPU: which attention unpadded tokens get (one decision, in
engine/precision.py), the dtypes that reach flash attention's kernel (its CPU stand-in,
tests/flash_on_cpu.py, records them), no [T, T] mask anywhere in the unpadded path, pooling and
everything a resume replays free of scatter-adds (whose atomics add in a different order on every
GPU run), and ``training.compile`` against eager. What only the real kernel can show is in
test_cuda.py."""
from __future__ import annotations

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_embed.config import ConfigError
from dist_embed.engine.precision import Precision, varlen_kernel_problem
from dist_embed.model.encoder import Encoder

from conftest import quick_triplets, step_parts
from flash_on_cpu import flash_kernel_on_cpu
from host_reads import HostReads

SEED = int(os.environ.get("DIST_EMBED_FUZZ_SEED", random.randrange(10**6)))
GPU = Precision("bf16", "cuda", (9, 0))  # what an H100/H200 in bf16 decides
AUTO = SimpleNamespace(layout="auto", pack_length="auto", layout_bucket=0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm().clamp(min=1e-12))


def test_whether_the_kernel_runs_is_one_pure_function():
    bf16, fp16 = torch.bfloat16, torch.float16
    assert varlen_kernel_problem("cuda", bf16, 64, (9, 0)) is None
    assert varlen_kernel_problem("cuda", fp16, 256, (8, 0)) is None
    assert varlen_kernel_problem("cuda", bf16, 72, None) is None  # capability unknown: not held against it
    assert "bf16/fp16" in varlen_kernel_problem("cuda", None, 64, (9, 0))
    assert "CUDA only" in varlen_kernel_problem("cpu", bf16, 64)
    assert "compute capability" in varlen_kernel_problem("cuda", fp16, 64, (7, 5))
    for bad in (12, 100, 264):
        assert "head sizes" in varlen_kernel_problem("cuda", bf16, bad, (9, 0))
    config = SimpleNamespace(hidden_size=768, num_attention_heads=12)
    assert GPU.varlen(config).kernel and Precision("fp16", "cuda").varlen(config).kernel
    cpu = Precision("bf16", "cpu").varlen(config)
    assert not cpu.kernel and cpu.refusal is None  # CPU: the reference, whose host reads cost nothing there
    fp32 = Precision("fp32", "cuda", (9, 0)).varlen(config)
    assert not fp32.kernel and "training.layout=unpadded" in fp32.refusal and "\n" not in fp32.refusal


def test_an_unpadded_layout_the_gpu_cannot_run_is_refused_in_one_line(tiny_model):
    """fp32 on CUDA, or heads of a size the kernel does not take: before, such a run silently took
    the per-text reference, with a host read in every layer."""
    from transformers import BertConfig, BertModel

    from dist_embed.model.layout_choice import choose_layout

    enc = Encoder.from_pretrained(str(tiny_model))
    explicit = SimpleNamespace(layout="unpadded", pack_length="auto", layout_bucket=0)
    with pytest.raises(ConfigError, match=r"training.layout=unpadded: .*bf16/fp16") as e:
        choose_layout(enc, explicit, Precision("fp32", "cuda", (9, 0)).varlen(enc.transformer.config))
    assert "\n" not in str(e.value)
    assert choose_layout(enc, AUTO, Precision("fp32", "cuda", (9, 0)).varlen(enc.transformer.config)).kind == "packed"
    odd = Encoder(BertModel(BertConfig(hidden_size=36, num_attention_heads=3, num_hidden_layers=1,
                                       intermediate_size=8)), enc.tokenizer)  # heads of 12
    with pytest.raises(ConfigError, match="head sizes"):
        choose_layout(odd, explicit, GPU.varlen(odd.transformer.config))
    assert choose_layout(odd, AUTO, GPU.varlen(odd.transformer.config)).kind == "packed"
    assert choose_layout(enc, AUTO, GPU.varlen(enc.transformer.config)).kind == "unpadded"


@pytest.mark.parametrize("causal,kv_heads", [(False, 4), (True, 4), (True, 2)])
def test_the_kernel_path_computes_the_reference(causal, kv_heads):
    """kernel_attention (cast, contiguous inputs, the ops' autograd) in bf16 against the fp32
    reference, forward and backward: also what makes the CPU stand-in trustworthy."""
    from dist_embed.model.varlen import kernel_attention, reference_attention

    torch.manual_seed(SEED)
    lengths = [13, 1, 40, 7, 22]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), h, 16, requires_grad=True) for h in (4, kv_heads, kv_heads))
    with flash_kernel_on_cpu() as calls:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = kernel_attention(q, k, v, cu, max(lengths), causal=causal)
        g = torch.randn_like(out, dtype=torch.float32)
        got = torch.autograd.grad(out, (q, k, v), g)
    ref = reference_attention(q, k, v, cu, 0.0, causal)
    want = torch.autograd.grad(ref, (q, k, v), g)
    assert [c["op"] for c in calls] == ["fwd", "bwd"] and calls[0]["dtypes"] == (torch.bfloat16,) * 3
    for a, b in ((out, ref), *zip(got, want)):
        assert rel(a, b) < 1e-2, (SEED, rel(a, b))


def decoder_rows(n: int) -> list:
    from dist_embed.data.rows import Row

    return [Row(i, (r["anchor"], r["positive"], r["negative"]), None) for i, r in enumerate(quick_triplets(n))]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoders_reach_the_kernel_with_half_precision_qkv(tmp_path, monkeypatch, arch):
    """Under autocast with fp32 weights, rotary embeddings hand the attention fp32 q and k (half
    precision q/k times fp32 cos/sin): cast at the kernel's entry, every layer's q, k and v reach
    it in bf16, contiguous, causal, forward and backward; the per-text reference never runs."""
    from dist_embed.model import varlen
    from dist_embed.model.layout_choice import choose_layout
    from test_decoder import make_decoder

    path, _ = make_decoder(tmp_path / "m", arch, "right")
    enc = Encoder.from_pretrained(str(path), dropout=0.1).train()
    spec = choose_layout(enc, AUTO, GPU.varlen(enc.transformer.config))
    assert spec.kind == "unpadded"
    monkeypatch.setattr(varlen, "reference_attention", lambda *a, **k: pytest.fail("the reference ran"))
    arrived = []
    real_cast = varlen.kernel_dtype
    monkeypatch.setattr(varlen, "kernel_dtype", lambda q: arrived.append(q.dtype) or real_cast(q))
    case = step_parts("mnrl", layout="unpadded")
    case.embedder = type(case.embedder)("unpadded", 0, Precision("bf16", "cpu").autocast)
    batch = case.batch(enc, decoder_rows(8), "cuda", "bf16")
    with flash_kernel_on_cpu() as calls:
        loss, _ = case.step(enc, batch)
    layers = enc.transformer.config.num_hidden_layers
    assert [c["op"] for c in calls] == ["fwd"] * layers + ["bwd"] * layers
    assert all(c["dtypes"] == (torch.bfloat16,) * 3 and c["contiguous"] and c["causal"] for c in calls[:layers])
    assert all(c["dtypes"] == (torch.bfloat16, torch.bfloat16) for c in calls[layers:])
    assert all(c["cu"] == torch.int32 and isinstance(c["max_len"], int) for c in calls[:layers])
    assert torch.float32 in arrived  # what the cast is for: rotary embeddings upcast q and k
    assert torch.isfinite(loss) and all(p.grad is not None for p in enc.transformer.layers[0].parameters())


@pytest.mark.parametrize("arch", ["bert", "llama", "qwen2"])
def test_the_unpadded_path_builds_no_quadratic_mask(tmp_path, tiny_model, monkeypatch, arch):
    """~600 tokens in one unpadded forward and backward (decoders with gradient checkpointing,
    which turns the cache off): no tensor of T x T elements is ever made, and transformers never
    looks for packed sequences (a host read) nor builds a mask."""
    import transformers.masking_utils as masking

    from dist_embed.engine.setup import enable_checkpointing
    from dist_embed.model.layout_choice import choose_layout
    from dist_embed.model.varlen import VARLEN_ATTENTION
    from test_decoder import make_decoder

    path = tiny_model if arch == "bert" else make_decoder(tmp_path / "m", arch, "left")[0]
    enc = Encoder.from_pretrained(str(path), dropout=0.0).train()
    if arch != "bert":
        enable_checkpointing(enc.transformer)
    assert choose_layout(enc, AUTO, GPU.varlen(enc.transformer.config)).kind == "unpadded"
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda *a, **k: pytest.fail("packed detection ran"))
    monkeypatch.setitem(masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, VARLEN_ATTENTION,
                        lambda *a, **k: pytest.fail("a mask was built"))
    case = step_parts("mnrl", layout="unpadded")
    case.embedder = type(case.embedder)("unpadded", 0, Precision("bf16", "cpu").autocast)
    batch = case.batch(enc, decoder_rows(40), "cuda", "bf16")
    tokens = int(batch.layout.cu_seqlens[-1])
    assert tokens > 500, tokens
    with flash_kernel_on_cpu(), HostReads() as reads:
        reads.watch(enc)
        reads.square_at = tokens // 2  # a [T, T] mask or score matrix (the texts are far shorter)
        case.step(enc, batch)
    assert not reads.squares, reads.squares


def test_a_checkpoint_keeps_this_ranks_gpu_random_state_only(tmp_path, monkeypatch):
    """Each rank saves its own GPU's generator state (not every visible GPU's), so a resume where
    the rank sees fewer GPUs, or its GPU under another index, restores it; a checkpoint of the
    earlier format (a list over the GPUs) restores the rank's own entry. CUDA's RNG calls are
    stood in for by a table of per-device states (no GPU here)."""
    from dist_embed.outputs import checkpoint as ckpt

    states = {i: torch.tensor([i, 7], dtype=torch.uint8) for i in range(8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[torch.device(device).index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device.index, s))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("every GPU's state restored"))
    ckpt.save_tensors(ckpt.rng_state(torch.device("cuda", 5)), tmp_path / "rng.pt")  # rank 5 of 8 GPUs
    saved = ckpt.load_tensors(tmp_path / "rng.pt")
    assert torch.equal(saved["cuda"], states[5])
    ckpt.set_rng_state(saved, torch.device("cuda", 1))  # resumed on a node with 2 GPUs: this rank uses cuda:1
    assert torch.equal(restored[1], states[5])
    ckpt.set_rng_state({**saved, "cuda": [states[i] for i in range(8)]}, torch.device("cuda", 3))  # old format
    assert torch.equal(restored[3], states[3])
    restored.clear()
    ckpt.set_rng_state({**saved, "cuda": [states[0]]}, torch.device("cuda", 3))  # older file, fewer GPUs then
    ckpt.set_rng_state(saved, torch.device("cpu"))  # a CPU resume keeps the CPU state only
    assert not restored and "cuda" not in ckpt.rng_state(torch.device("cpu"))


# -- what a resume replays: no scatter-adds (their atomics add in another order on every GPU run) ----

ACCUMULATING = {torch.ops.aten.index_add.default, torch.ops.aten.index_add_.default,
                torch.ops.aten.scatter_add.default, torch.ops.aten.scatter_add_.default,
                torch.ops.aten.scatter_reduce.two, torch.ops.aten.scatter_reduce_.two,
                torch.ops.aten.index_reduce.default, torch.ops.aten.index_reduce_.default,
                torch.ops.aten.put.default, torch.ops.aten.put_.default, torch.ops.aten.embedding_bag.default,
                torch.ops.aten._embedding_bag.default}
INDEX_PUT = {torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
             torch.ops.aten._index_put_impl_.default}


class ScatterSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that adds several values into one place in an order a GPU does not fix:
    index_add, scatter_add/reduce, put, embedding_bag, and index_put with accumulate=True where
    indices repeat (unique indices write each place once: deterministic)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ACCUMULATING:
            self.found.append(str(func))
        elif func in INDEX_PUT and (kwargs.get("accumulate") or (len(args) > 3 and args[3])):
            index = torch.stack([i.reshape(-1) for i in args[1] if i is not None])
            if torch.unique(index, dim=1).shape[1] < index.shape[1]:
                self.found.append(f"{func} with repeated indices")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
@pytest.mark.parametrize("layout", ["padded", "packed", "unpadded"])
def test_a_step_adds_nothing_in_a_run_dependent_order(tiny_model, layout, pooling):
    """Forward, loss and backward of every layout and pooling (cached MNRL replays included, dropout
    on) run no scatter-add: the same RNG state gives the same step bit for bit on a GPU too (flash
    attention's own backward aside: docs/performance.md gives its tolerance). Before, pooling was an
    index_add / scatter_reduce. The step twice from one RNG state: the same bits."""
    rows = decoder_rows(12)

    def step():
        torch.manual_seed(SEED)
        enc = Encoder.from_pretrained(str(tiny_model), dropout=0.1, pooling=pooling).train()
        case = step_parts("cached_mnrl" if pooling == "cls" else "mnrl", layout=layout, mini_batch_size=5)
        if layout == "unpadded":
            case.embedder = type(case.embedder)("unpadded", 0, Precision("bf16", "cpu").autocast)
        batch = case.batch(enc, rows, "cuda" if layout == "unpadded" else "cpu", "bf16" if layout == "unpadded"
                           else "fp32")
        torch.manual_seed(SEED)
        with flash_kernel_on_cpu(), ScatterSpy() as spy:
            loss, _ = case.step(enc, batch)
        return spy.found, loss, [p.grad.clone() for p in enc.parameters() if p.grad is not None]

    found, loss, grads = step()
    assert not found, found
    _, again, regrads = step()
    assert torch.equal(loss, again) and all(torch.equal(a, b) for a, b in zip(grads, regrads))


def test_pooling_of_layouts_equals_pooling_of_padded_columns():
    """``pool_tokens`` (segment reductions over unpadded tokens) and ``pool`` (fixed-shape
    reductions over padded columns, left or right padding): the same embeddings and gradients."""
    from dist_embed.model.pooling import pool, pool_tokens

    rng = np.random.default_rng(SEED)
    for left in (False, True):
        lengths = rng.integers(1, 9, 7)
        width = int(lengths.max())
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        for i, n in enumerate(lengths):
            (mask[i, width - n:] if left else mask[i, :n]).fill_(1)
        states = torch.randn(len(lengths), width, 5, dtype=torch.float64, requires_grad=True)
        for mode in ("mean", "max", "cls", "lasttoken"):
            a = pool(states, mask, mode)
            b = pool_tokens(states[mask.bool()], torch.as_tensor(lengths), mode)
            ga, gb = (torch.autograd.grad((x * torch.arange(5.0, dtype=x.dtype)).sum(), states)[0] for x in (a, b))
            assert torch.allclose(a, b) and torch.allclose(ga, gb), (SEED, mode, left)


# -- training.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["packed", "unpadded"])
def test_compiled_training_matches_eager_in_one_graph(tiny_model, layout):
    """``training.compile`` (dynamo with dynamic shapes and AOT autograd; the aot_eager backend here,
    as inductor's code generation takes minutes on this CPU: test_cuda.py runs inductor on a GPU):
    steps over batches of other sizes, token counts and longest texts give eager's losses and
    weights (to 1e-6 of their norm; dropout off, as compiled dropout draws other random numbers
    than eager by design), from one graph without a break. With dropout on, a forward without
    grad and one with (cached MNRL's replay) draw the same masks from the same RNG state."""
    from torch._dynamo.utils import counters

    from dist_embed.engine.setup import compile_encoder

    rows = decoder_rows(40)
    unpadded = layout == "unpadded"

    def parts(compiled: bool, dropout: float = 0.0):
        torch.manual_seed(SEED)
        enc = Encoder.from_pretrained(str(tiny_model), dropout=dropout).train()
        case = step_parts("mnrl", layout=layout)
        if unpadded:
            case.embedder = type(case.embedder)("unpadded", 0, Precision("bf16", "cpu").autocast)
        batches = [case.batch(enc, rows[a:b], "cuda" if unpadded else "cpu", "bf16" if unpadded else "fp32")
                   for a, b in ((0, 5), (5, 12), (12, 18), (18, 27), (27, 31))]
        if compiled:
            compile_encoder(enc, backend="aot_eager")
        return enc, case, batches

    def train(compiled: bool):
        enc, case, batches = parts(compiled)
        opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
        losses = []
        with flash_kernel_on_cpu():
            for b in batches:
                loss, _ = case.step(enc, b)
                opt.step()
                opt.zero_grad()
                losses.append(float(loss))
        return enc, batches, losses, torch.cat([p.detach().reshape(-1) for p in enc.parameters()])

    torch._dynamo.reset()
    counters.clear()
    _, _, eager_losses, eager = train(False)
    _, batches, compiled_losses, compiled = train(True)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    assert len({b.padded_tokens for b in batches}) >= 3  # several shapes, one graph
    assert np.allclose(eager_losses, compiled_losses, rtol=1e-6), (eager_losses, compiled_losses)
    assert float((eager - compiled).norm() / eager.norm()) < 1e-6
    enc, _, batches = parts(True, dropout=0.1)
    with flash_kernel_on_cpu(), Precision("bf16" if unpadded else "fp32", "cpu").autocast():
        torch.manual_seed(SEED)
        with torch.no_grad():
            first = enc(batches[0].layout)
        torch.manual_seed(SEED)
        replay = enc(batches[0].layout)
    assert torch.equal(first, replay.detach())
    torch._dynamo.reset()


# -- the loader's threads and processes ----------------------------------------------------------------


def test_loader_workers_start_once_from_the_training_thread(tmp_path, tiny_model, triplets, monkeypatch):
    """With loader workers and batches prefetched in a background thread (a GPU's defaults), the
    DataLoader's workers are forked once for the whole run, from the training thread, and live
    across epochs: before, each epoch made a DataLoader inside the prefetch thread and forked its
    workers from there (fork in a process with threads: only the forking thread survives)."""
    import threading

    from torch.utils.data import dataloader

    from dist_embed.config import load_config
    from dist_embed.distributed import DistState
    from dist_embed.engine.loop import loop
    from dist_embed.engine.setup import build_run
    from conftest import tiny_config

    started = []
    real = dataloader._MultiProcessingDataLoaderIter.__init__

    def spy(self, loader):
        started.append(threading.current_thread().name)
        real(self, loader)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", spy)
    cfg = load_config(tiny_config(tmp_path, tiny_model, triplets, data={"num_workers": 1, "prefetch": True},
                                  training={"max_steps": -1, "epochs": 2, "batch_size": 50, "log_steps": 4}))
    run = build_run(cfg, DistState())
    loop(run)
    assert run.pos.epoch == 2 and run.pos.step == 8
    assert started == [threading.main_thread().name], started


# -- the GPU run's script ------------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["pass", "fail", "no gpu"])
def test_device_checks_exit_with_the_outcome_of_the_checks(tmp_path, outcome):
    """benchmarks/device_checks.sh exits 0 only when its tests pass (before: 0 whatever they did),
    and refuses to report success on a machine where torch sees no GPU."""
    import subprocess
    import sys

    from conftest import REPO

    test = tmp_path / "test_probe.py"
    test.write_text(f"def test_probe():\n    assert {outcome != 'fail'}\n")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DEVICE": "cuda" if outcome == "no gpu" else "cpu",
           "TESTS": str(test), "BENCH": "0", "PY": sys.executable}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "device_checks.sh")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert (r.returncode == 0) == (outcome == "pass"), r.stdout[-3000:] + r.stderr[-3000:]
    assert ("nothing checked" in r.stdout) == (outcome == "no gpu")
