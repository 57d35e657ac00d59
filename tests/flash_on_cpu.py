"""Flash attention's varlen kernel stood in for on CPU, so that the kernel path of model/varlen.py
runs in CPU tests: CPU implementations of its two ops (``dist_embed::varlen_fwd``/``varlen_bwd``)
that compute the kernel's maths (fp32 inside; outputs, log-sum-exp and gradients as the kernel
returns them) and record what reached them. Everything but the CUDA kernel itself then runs: the
eligibility decision, the dtype cast at the entry, the ops' autograd and fake registrations (under
torch.compile too), the layouts and the step around them.

Dropout: the forward draws a seed from torch's CPU generator (as the kernel takes its offset from
the CUDA generator), and both ops draw the same keep masks from it, so a restored RNG state replays
the same masks.
"""
from __future__ import annotations

import contextlib

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _texts(q, k, v, cu, dropout: float, causal: bool, scale: float, seed: int):
    """Per text: (start, end, q, k, v as [heads, n, d] fp32 with kv heads repeated, softmax P, keep mask)."""
    gen = torch.Generator().manual_seed(seed)
    bounds = cu.tolist()
    heads, groups = q.shape[1], q.shape[1] // k.shape[1]
    for a, b in zip(bounds, bounds[1:]):
        qs = q[a:b].float().transpose(0, 1)
        ks = k[a:b].float().transpose(0, 1).repeat_interleave(groups, 0)
        vs = v[a:b].float().transpose(0, 1).repeat_interleave(groups, 0)
        s = qs @ ks.transpose(1, 2) * scale
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.softmax(s, -1)
        keep = (torch.rand((heads, b - a, b - a), generator=gen) >= dropout).float() / (1 - dropout) if dropout \
            else None
        yield a, b, qs, ks, vs, s, p, keep


@contextlib.contextmanager
def flash_kernel_on_cpu():
    """CPU kernels for the varlen ops while in the block; yields the list of calls they saw."""
    calls: list[dict] = []

    def fwd(q, k, v, cu, max_len, dropout, causal, scale):
        calls.append({"op": "fwd", "dtypes": (q.dtype, k.dtype, v.dtype), "cu": cu.dtype, "max_len": max_len,
                      "contiguous": all(x.is_contiguous() for x in (q, k, v)), "shapes": (q.shape, k.shape),
                      "causal": causal, "dropout": dropout})
        assert q.dtype in KERNEL_DTYPES and k.dtype == v.dtype == q.dtype, (q.dtype, k.dtype, v.dtype)
        with torch._C.DisableTorchFunction(), torch.autocast("cpu", enabled=False):
            seed = int(torch.randint(0, 2 ** 62, (1,)))
            out = torch.zeros(q.shape, dtype=torch.float32)
            lse = torch.zeros((q.shape[1], q.shape[0]), dtype=torch.float32)
            for a, b, _, _, vs, s, p, keep in _texts(q, k, v, cu, dropout, causal, scale, seed):
                assert b - a <= max_len, (b - a, max_len)
                lse[:, a:b] = torch.logsumexp(s, -1)
                out[a:b] = ((p * keep if keep is not None else p) @ vs).transpose(0, 1)
            seeds = torch.tensor([seed, 0], dtype=torch.int64).view(torch.uint64)
            return out.to(q.dtype), lse, seeds, torch.zeros((), dtype=torch.int64).view(torch.uint64)

    def bwd(grad, q, k, v, out, lse, cu, max_len, dropout, causal, seed, offset, scale):
        calls.append({"op": "bwd", "dtypes": (grad.dtype, q.dtype)})
        with torch._C.DisableTorchFunction(), torch.autocast("cpu", enabled=False):
            dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float32) for x in (q, k, v))
            groups = q.shape[1] // k.shape[1]
            seed_value = int(seed.view(torch.int64)[0])
            for a, b, qs, ks, vs, _, p, keep in _texts(q, k, v, cu, dropout, causal, scale, seed_value):
                do = grad[a:b].float().transpose(0, 1)
                pd = p * keep if keep is not None else p
                dp = do @ vs.transpose(1, 2)
                dp = dp * keep if keep is not None else dp
                ds = p * (dp - (dp * p).sum(-1, keepdim=True))
                dq[a:b] = (ds @ ks * scale).transpose(0, 1)
                fold = (lambda x: x.view(k.shape[1], groups, b - a, -1).sum(1).transpose(0, 1))  # noqa: E731
                dk[a:b] = fold(ds.transpose(1, 2) @ qs * scale)
                dv[a:b] = fold(pd.transpose(1, 2) @ do)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    with torch.library._scoped_library("dist_embed", "IMPL") as lib:
        lib.impl("varlen_fwd", fwd, "CPU")
        lib.impl("varlen_bwd", bwd, "CPU")
        yield calls
