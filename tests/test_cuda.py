"""What only a GPU can show, each fault CPU tests pin (test_gpu_path.py, test_host_reads.py) held
against the real kernel: flash attention's varlen kernel against the reference attention and its
dropout rate; BERT and the decoders (tiny Llama, Qwen2) reaching the kernel under autocast, the
unpadded step against the padded one; no host sync inside a step for every loss and layout
(CUDA's sync debug mode set to error); no [T, T] mask (memory at ~20k tokens); a non-finite step
skipped on the device; the same RNG state giving the same step; ``training.compile`` with inductor.
Skipped without CUDA; ``bash benchmarks/device_checks.sh`` runs them on a lent GPU.

Tolerances: the kernel and the reference both compute in half precision inputs with fp32
accumulation, but in different orders, so they differ by rounding: relative error ||a - b|| / ||b||
under 1e-2 for bf16 (8 bits of mantissa: ~4e-3 per value) and 3e-3 for fp16 (11 bits), forward
and backward. A whole step (6 layers, pooling, the loss) compounds that: losses within 2e-2 (bf16)
and 5e-3 (fp16) relative, gradients within 5e-2 relative norm. The same RNG state: the forward
(loss) bit for bit; flash attention's backward adds dQ over key blocks with atomics (sequences past
128 tokens), so gradients agree to DQ_TOL of their norm, and bit for bit under
``torch.use_deterministic_algorithms(True)`` (torch then runs the kernel's deterministic backward).
"""
from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS under deterministic algorithms

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dist_embed.data.rows import Row  # noqa: E402

from conftest import minilm_dir, quick_triplets, step_parts  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3}
DQ_TOL = 1e-3  # docs/performance.md: "Exact resume on a GPU"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm().clamp(min=1e-12))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,kv_heads", [(False, 12), (True, 12), (True, 4)])
def test_varlen_kernel_equals_the_reference(dtype, causal, kv_heads):
    from dist_embed.model.varlen import kernel_attention, reference_attention

    torch.manual_seed(0)
    lengths = [13, 1, 40, 7, 128, 22, 300]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device="cuda")
    t = sum(lengths)
    q = torch.randn(t, 12, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(t, kv_heads, 64, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(t, kv_heads, 64, device="cuda", dtype=dtype, requires_grad=True)
    out = kernel_attention(q, k, v, cu, max(lengths), causal=causal)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    ref = reference_attention(q.float(), k.float(), v.float(), cu, 0.0, causal, 64 ** -0.5)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g.float())
    for a, b in ((out, ref), (dq, rq), (dk, rk), (dv, rv)):
        assert rel(a, b) < TOL[dtype], rel(a, b)


def test_kernel_dropout_keeps_its_rate_and_scale():
    from dist_embed.model.varlen import kernel_attention

    torch.manual_seed(0)
    lengths, p, heads = [37, 64, 5, 90], 0.1, 8
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device="cuda")
    width = 128
    q = k = torch.zeros(sum(lengths), heads, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.cat([torch.eye(n, width, device="cuda")[:, None, :64].expand(n, heads, 64) for n in lengths])
    v = v.to(torch.bfloat16)
    out = kernel_attention(q, k, v, cu, max(lengths), dropout=p).float()
    kept = torch.cat([(out[a:a + n, :, :min(n, 64)] * n * (1 - p)).reshape(-1) for a, n in
                      zip(cu[:-1].tolist(), lengths)])
    survivors = kept[kept > 0.5]
    assert (survivors - 1).abs().max() < 2e-2  # scaled by 1 / (1 - p), to bf16 rounding
    rate = float((kept < 0.5).float().mean())
    assert abs(rate - p) < 0.01, rate


def rows(n: int = 64, offset: int = 0) -> list[Row]:
    return [Row(i, (r["anchor"], r["positive"], r["negative"]), None)
            for i, r in enumerate(quick_triplets(n + offset)[offset:])]


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    from test_decoder import make_decoder

    root = tmp_path_factory.mktemp("decoders")
    return {arch: str(make_decoder(root / arch, arch, "left")[0]) for arch in ("llama", "qwen2")}


def model_path(name: str, decoders) -> str:
    return str(minilm_dir()) if name == "minilm" else decoders[name]


@pytest.mark.parametrize("model", ["minilm", "llama", "qwen2"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_unpadded_step_reaches_the_kernel_and_equals_the_padded_step(monkeypatch, decoders, model, precision):
    """Under autocast every layer's attention goes to the kernel (the reference never runs; before,
    decoders' fp32 q/k sent every layer to it) and the step equals the padded one."""
    from dist_embed.distributed import DistState
    from dist_embed.engine.precision import Precision
    from dist_embed.engine.step import Embedder
    from dist_embed.model import varlen
    from dist_embed.model.encoder import Encoder

    calls = []
    real = varlen._varlen_fwd
    monkeypatch.setattr(varlen, "_varlen_fwd", lambda q, *a: calls.append(q.dtype) or real(q, *a))
    monkeypatch.setattr(varlen, "reference_attention", lambda *a, **k: pytest.fail("the reference ran"))

    def run(layout):
        torch.manual_seed(0)
        enc = Encoder.from_pretrained(model_path(model, decoders), dropout=0.0).cuda().train()
        case = step_parts("mnrl", layout=layout)
        case.embedder = Embedder(layout, 0, Precision(precision, "cuda").autocast)
        batch = case.batch(enc, rows(), "cuda", precision).map_arrays(torch.Tensor, torch.Tensor.pin_memory)
        loss, _ = case.step(enc, batch, DistState(device=torch.device("cuda")))
        return float(loss), {n: p.grad.float() for n, p in enc.named_parameters() if p.grad is not None}

    l0, g0 = run("padded")
    l1, g1 = run("unpadded")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    assert calls and set(calls) == {dtype}, calls
    assert abs(l0 - l1) <= {"bf16": 2e-2, "fp16": 5e-3}[precision] * abs(l0), (l0, l1)
    flat0 = torch.cat([g0[n].reshape(-1) for n in sorted(g0)])
    flat1 = torch.cat([g1[n].reshape(-1) for n in sorted(g1)])
    assert rel(flat1, flat0) < 5e-2, rel(flat1, flat0)


def _trainer_parts(precision: str, dropout: float, model: str = "minilm", decoders=None, layout: str = "auto",
                   chunk: int = 16, loss_name: str = "mnrl", **loss_options):
    from types import SimpleNamespace

    from dist_embed.backends.allreduce import AllReduceBackend
    from dist_embed.backends.optim import param_groups
    from dist_embed.distributed import DistState
    from dist_embed.engine.precision import Precision
    from dist_embed.engine.schedule import lambda_lr
    from dist_embed.engine.step import Embedder
    from dist_embed.model.encoder import Encoder
    from dist_embed.model.layout_choice import choose_layout

    torch.manual_seed(0)
    state = DistState(device=torch.device("cuda"))
    enc = Encoder.from_pretrained(model_path(model, decoders), dropout=dropout).cuda().train()
    training = SimpleNamespace(layout=layout, pack_length="auto", layout_bucket=0, lr=5e-5, max_grad_norm=1.0,
                               precision=precision)
    prec = Precision.for_device(precision, state.device)
    spec = choose_layout(enc, training, prec.varlen(enc.transformer.config))
    cfg = SimpleNamespace(training=training, distributed=SimpleNamespace(bucket_mb=25.0))
    backend = AllReduceBackend(cfg, state, enc, prec, param_groups(enc, 0.01), lambda o: lambda_lr(o, lambda: 1.0))
    guide = loss_options.pop("guide", None)
    if guide:
        loss_options["guide"] = Encoder.from_pretrained(str(minilm_dir())).cuda().eval().requires_grad_(False)
    case = step_parts(loss_name, layout=spec.kind, **loss_options)
    return state, enc, spec, backend, case.loss, Embedder(spec.kind, chunk, prec.autocast)


STEP_CASES = [("minilm", "auto", "mnrl", {}), ("minilm", "auto", "cosine", {}), ("minilm", "auto", "triplet", {}),
              ("minilm", "auto", "mnrl", {"mask_same_text": True}), ("minilm", "auto", "mnrl", {"guide": True}),
              ("minilm", "auto", "cached_mnrl", {"mini_batch_tokens": 300}), ("minilm", "padded", "mnrl", {}),
              ("minilm", "padded", "cached_mnrl", {"mini_batch_size": 16}), ("llama", "auto", "mnrl", {}),
              ("qwen2", "auto", "mnrl", {})]


@pytest.mark.parametrize("model,layout,loss_name,options", STEP_CASES)
def test_a_training_step_never_waits_for_the_gpu(decoders, model, layout, loss_name, options):
    """forward, loss, backward, clipping, the optimizer step (skipped on the device if not finite)
    and the schedule, for every loss and layout: with CUDA's sync debug mode set to error, any
    read-back would raise."""
    from dist_embed.data.loader import collate
    from dist_embed.engine.step import forward_backward

    state, enc, spec, backend, loss, embedder = _trainer_parts("bf16", 0.1, model, decoders, layout,
                                                                loss_name=loss_name, **options)
    assert spec.kind == ("unpadded" if layout == "auto" else "padded")
    data = rows(64)
    if loss_name == "cosine":
        data = [Row(r.row_id, r.texts[:2], (r.row_id % 5) / 4) for r in data]
    batches = [collate(data[i * 16:(i + 1) * 16], enc.tokenizer, 128, spec) for i in range(4)]
    batches = [b.map_arrays(torch.Tensor, torch.Tensor.pin_memory) for b in batches]
    value, _ = forward_backward(backend.model, batches[0], loss, embedder, state, grads=backend)  # warm-up
    backend.step(value)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            value, info = forward_backward(backend.model, b, loss, embedder, state, grads=backend)
            result = backend.step(value)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(result.applied) and torch.isfinite(value)


@pytest.mark.parametrize("model", ["minilm", "llama"])
def test_the_unpadded_step_builds_no_quadratic_mask(decoders, model):
    """~20k tokens in one forward and backward (gradient checkpointing for the decoder): a [T, T]
    boolean mask alone would take T^2 bytes (~400 MB); the step stays far below."""
    from dist_embed.data.loader import collate
    from dist_embed.engine.setup import enable_checkpointing
    from dist_embed.engine.step import forward_backward

    state, enc, spec, backend, loss, embedder = _trainer_parts("bf16", 0.0, model, decoders)
    if model != "minilm":
        enable_checkpointing(enc.transformer)
    batch = collate(rows(600), enc.tokenizer, 128, spec).map_arrays(torch.Tensor, torch.Tensor.pin_memory)
    tokens = int(batch.layout.cu_seqlens[-1])
    assert tokens > 15_000, tokens
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward(backend.model, batch, loss, embedder, state, grads=backend)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < tokens * tokens / 4, (peak, tokens)


def test_a_non_finite_step_is_never_applied():
    from dist_embed.data.loader import collate
    from dist_embed.engine.step import forward_backward

    state, enc, spec, backend, loss, embedder = _trainer_parts("bf16", 0.0)
    batch = collate(rows(16), enc.tokenizer, 128, spec).map_arrays(torch.Tensor, torch.Tensor.pin_memory)
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    value, _ = forward_backward(backend.model, batch, loss, embedder, state, grads=backend)
    next(enc.parameters()).grad.fill_(float("nan"))
    result = backend.step(value)
    assert not bool(result.applied)
    assert all(torch.equal(before[n], p) for n, p in enc.named_parameters())


def test_an_unpadded_layout_in_fp32_is_refused():
    from types import SimpleNamespace

    from dist_embed.config import ConfigError
    from dist_embed.engine.precision import Precision
    from dist_embed.model.encoder import Encoder
    from dist_embed.model.layout_choice import choose_layout

    enc = Encoder.from_pretrained(str(minilm_dir())).cuda()
    fp32 = Precision.for_device("fp32", torch.device("cuda")).varlen(enc.transformer.config)
    with pytest.raises(ConfigError, match="training.layout=unpadded"):
        choose_layout(enc, SimpleNamespace(layout="unpadded", pack_length="auto", layout_bucket=0), fp32)
    assert Precision.for_device("bf16", torch.device("cuda")).varlen(enc.transformer.config).kernel


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_same_rng_state_gives_the_same_step_with_dropout_on(deterministic):
    """Flash attention's dropout draws its masks from the CUDA generator: restoring its state (what
    a checkpoint does, and cached MNRL's replay) replays the same masks, so the loss is the same bit
    for bit; the gradients to DQ_TOL (the kernel's dQ atomics), or bit for bit under
    torch.use_deterministic_algorithms(True). Texts past 128 tokens, where dQ is split."""
    from dist_embed.data.loader import collate
    from dist_embed.engine.step import forward_backward

    state, enc, spec, backend, loss, embedder = _trainer_parts("bf16", 0.1)
    long = [Row(i, (" ".join([r.texts[0]] * 12), r.texts[1], r.texts[2]), None) for i, r in enumerate(rows(32))]
    batch = collate(long, enc.tokenizer, 256, spec).map_arrays(torch.Tensor, torch.Tensor.pin_memory)
    assert batch.layout.max_seqlen > 128
    rng = torch.cuda.get_rng_state()
    out = []
    torch.use_deterministic_algorithms(deterministic)
    try:
        for _ in range(2):
            torch.cuda.set_rng_state(rng)
            backend.optimizer.zero_grad(set_to_none=True)
            value, _ = forward_backward(backend.model, batch, loss, embedder, state, grads=backend)
            out.append((float(value), torch.cat([p.grad.reshape(-1).float() for p in enc.parameters()
                                                 if p.grad is not None])))
    finally:
        torch.use_deterministic_algorithms(False)
    assert out[0][0] == out[1][0]
    if deterministic:
        assert torch.equal(out[0][1], out[1][1])
    else:
        assert rel(out[1][1], out[0][1]) < DQ_TOL, rel(out[1][1], out[0][1])
    torch.cuda.manual_seed(123)  # another state: other masks
    backend.optimizer.zero_grad(set_to_none=True)
    other, _ = forward_backward(backend.model, batch, loss, embedder, state, grads=backend)
    assert float(other) != out[0][0]


def test_compiled_training_matches_eager_with_inductor():
    """``training.compile`` as runs use it (inductor, dynamic shapes) on the unpadded kernel path:
    steps over batches of other token counts give eager's losses and weights to bf16 rounding,
    from at most two graphs; a forward without grad and a replay with grad draw the same masks."""
    from torch._dynamo.utils import counters

    from dist_embed.data.loader import collate
    from dist_embed.engine.setup import compile_encoder
    from dist_embed.engine.step import forward_backward

    data = rows(100)

    def train(compiled):
        state, enc, spec, backend, loss, embedder = _trainer_parts("bf16", 0.0)
        if compiled:
            compile_encoder(enc)
        losses = []
        for a, b in ((0, 16), (16, 40), (40, 60), (60, 100)):
            batch = collate(data[a:b], enc.tokenizer, 128, spec).map_arrays(torch.Tensor, torch.Tensor.pin_memory)
            value, _ = forward_backward(backend.model, batch, loss, embedder, state, grads=backend)
            backend.step(value)
            losses.append(float(value))
        return losses, torch.cat([p.detach().float().reshape(-1) for p in enc.parameters()])

    torch._dynamo.reset()
    counters.clear()
    eager_losses, eager = train(False)
    compiled_losses, compiled = train(True)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert np.allclose(eager_losses, compiled_losses, rtol=2e-2), (eager_losses, compiled_losses)
    assert rel(compiled, eager) < 1e-3, rel(compiled, eager)
    state, enc, spec, backend, loss, embedder = _trainer_parts("bf16", 0.1)
    compile_encoder(enc)
    layout = collate(data[:16], enc.tokenizer, 128, spec).map_arrays(torch.Tensor, torch.Tensor.pin_memory).layout
    from dist_embed.data.batch import to_device

    layout = to_device(layout, state.device)
    with embedder.autocast():
        torch.manual_seed(1)
        with torch.no_grad():
            first = enc(layout)
        torch.manual_seed(1)
        replay = enc(layout)
    assert torch.equal(first, replay.detach())
    torch._dynamo.reset()
