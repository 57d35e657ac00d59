"""What only a GPU can show: flash attention's varlen kernel against the reference attention, its
dropout rate, the unpadded step against the padded one in bf16/fp16, no host sync inside a step,
and the same RNG state giving the same step (what exact resume rests on). Skipped without CUDA;
``bash benchmarks/device_checks.sh`` runs them on a lent GPU.

Tolerances: the kernel and the reference both compute in half precision inputs with fp32
accumulation, but in different orders, so they differ by rounding: relative error ||a - b|| / ||b||
under 1e-2 for bf16 (8 bits of mantissa: ~4e-3 per value) and 3e-3 for fp16 (11 bits), forward
and backward. A whole step (6 layers, pooling, the loss) compounds that: losses within 2e-2 (bf16)
and 5e-3 (fp16) relative, gradients within 5e-2 relative norm.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_embed.data.rows import Row

from conftest import minilm_dir, quick_triplets, step_parts

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,kv_heads", [(False, 12), (True, 12), (True, 4)])
def test_varlen_kernel_equals_the_reference(dtype, causal, kv_heads):
    from dist_embed.model.varlen import reference_attention, varlen_attention

    torch.manual_seed(0)
    lengths = [13, 1, 40, 7, 128, 22]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device="cuda")
    t = sum(lengths)
    q = torch.randn(t, 12, 64, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(t, kv_heads, 64, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(t, kv_heads, 64, device="cuda", dtype=dtype, requires_grad=True)
    out = varlen_attention(q, k, v, cu, max(lengths), causal=causal)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    ref = reference_attention(q.float(), k.float(), v.float(), cu, 0.0, causal, 64 ** -0.5)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g.float())
    for a, b in ((out, ref), (dq, rq), (dk, rk), (dv, rv)):
        assert rel(a, b) < TOL[dtype], rel(a, b)


def test_kernel_dropout_keeps_its_rate_and_scale():
    from dist_embed.model.varlen import varlen_attention

    torch.manual_seed(0)
    lengths, p, heads = [37, 64, 5, 90], 0.1, 8
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device="cuda")
    width = 128
    q = k = torch.zeros(sum(lengths), heads, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.cat([torch.eye(n, width, device="cuda")[:, None, :64].expand(n, heads, 64) for n in lengths])
    v = v.to(torch.bfloat16)
    out = varlen_attention(q, k, v, cu, max(lengths), dropout=p).float()
    kept = torch.cat([(out[a:a + n, :, :min(n, 64)] * n * (1 - p)).reshape(-1) for a, n in
                      zip(cu[:-1].tolist(), lengths)])
    survivors = kept[kept > 0.5]
    assert (survivors - 1).abs().max() < 2e-2  # scaled by 1 / (1 - p), to bf16 rounding
    rate = float((kept < 0.5).float().mean())
    assert abs(rate - p) < 0.01, rate


def rows(n: int = 64) -> list[Row]:
    return [Row(i, (r["anchor"], r["positive"], r["negative"]), None) for i, r in enumerate(quick_triplets(n))]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_unpadded_step_equals_the_padded_step(precision):
    from dist_embed.engine.precision import Precision
    from dist_embed.engine.step import Embedder
    from dist_embed.model.encoder import Encoder

    def run(layout):
        torch.manual_seed(0)
        enc = Encoder.from_pretrained(str(minilm_dir()), dropout=0.0).cuda().train()
        case = step_parts("mnrl", layout=layout)
        case.embedder = Embedder(layout, 0, Precision(precision, "cuda").autocast)
        batch = case.batch(enc, rows(), "cuda", precision)
        from dist_embed.distributed import DistState

        loss, _ = case.step(enc, batch, DistState(device=torch.device("cuda")))
        return float(loss), {n: p.grad.float() for n, p in enc.named_parameters() if p.grad is not None}

    l0, g0 = run("padded")
    l1, g1 = run("unpadded")
    assert abs(l0 - l1) <= {"bf16": 2e-2, "fp16": 5e-3}[precision] * abs(l0), (l0, l1)
    flat0 = torch.cat([g0[n].reshape(-1) for n in sorted(g0)])
    flat1 = torch.cat([g1[n].reshape(-1) for n in sorted(g1)])
    assert rel(flat1, flat0) < 5e-2, rel(flat1, flat0)


def _trainer_parts(precision: str, dropout: float):
    from types import SimpleNamespace

    from dist_embed.backends.allreduce import AllReduceBackend
    from dist_embed.distributed import DistState
    from dist_embed.engine.losses import MultipleNegativesRanking
    from dist_embed.backends.optim import param_groups
    from dist_embed.engine.schedule import lambda_lr
    from dist_embed.engine.precision import Precision
    from dist_embed.engine.step import Embedder
    from dist_embed.model.encoder import Encoder
    from dist_embed.model.layout_choice import choose_layout

    torch.manual_seed(0)
    state = DistState(device=torch.device("cuda"))
    enc = Encoder.from_pretrained(str(minilm_dir()), dropout=dropout).cuda().train()
    training = SimpleNamespace(layout="auto", pack_length="auto", layout_bucket=0, lr=5e-5, max_grad_norm=1.0,
                               precision=precision)
    spec = choose_layout(enc, training, Precision.for_device(precision, state.device).varlen(enc.transformer.config))
    cfg = SimpleNamespace(training=training, distributed=SimpleNamespace(bucket_mb=25.0))
    prec = Precision(precision, "cuda")
    backend = AllReduceBackend(cfg, state, enc, prec, param_groups(enc, 0.01), lambda o: lambda_lr(o, lambda: 1.0))
    return state, enc, spec, backend, MultipleNegativesRanking(20.0, gather=False), Embedder(spec.kind, 16, prec.autocast)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_training_step_never_waits_for_the_gpu(precision):
    """forward, loss, backward, clipping, the optimizer step (skipped on the device if not finite)
    and the schedule: with CUDA's sync debug mode set to error, any read-back would raise."""
    from dist_embed.data.loader import collate
    from dist_embed.engine.step import forward_backward

    state, enc, spec, backend, loss, embedder = _trainer_parts(precision, 0.1)
    assert spec.kind == "unpadded"
    batches = [collate(rows(64)[i * 16:(i + 1) * 16], enc.tokenizer, 128, spec) for i in range(4)]
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


def test_the_same_rng_state_gives_the_same_step_with_dropout_on():
    """Flash attention's dropout draws its masks from the CUDA generator: restoring its state (what
    a checkpoint does, and cached MNRL's replay) replays the same masks, bit for bit."""
    from dist_embed.data.loader import collate
    from dist_embed.engine.step import forward_backward

    state, enc, spec, backend, loss, embedder = _trainer_parts("bf16", 0.1)
    batch = collate(rows(32), enc.tokenizer, 128, spec).map_arrays(torch.Tensor, torch.Tensor.pin_memory)
    rng = torch.cuda.get_rng_state()
    out = []
    for _ in range(2):
        torch.cuda.set_rng_state(rng)
        backend.optimizer.zero_grad(set_to_none=True)
        value, _ = forward_backward(backend.model, batch, loss, embedder, state, grads=backend)
        out.append((float(value), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}))
    assert out[0][0] == out[1][0]
    assert all(torch.equal(out[0][1][n], out[1][1][n]) for n in out[0][1])
    torch.cuda.manual_seed(123)  # another state: other masks
    backend.optimizer.zero_grad(set_to_none=True)
    other, _ = forward_backward(backend.model, batch, loss, embedder, state, grads=backend)
    assert float(other) != out[0][0]
