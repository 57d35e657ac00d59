"""Variable-length attention over unpadded tokens (``data/layout.py``'s ``Unpadded``), registered
as a transformers attention function: every self-attention of BERT, RoBERTa, XLM-R and the decoder
embedders (Llama, Qwen2, Mistral) then runs over the real tokens of all texts at once, each text
attending only to itself (causally for decoders), with no mask materialised.

Two implementations, chosen once when the model is switched (``use_varlen_attention``; whether the
kernel can run is decided by ``engine/precision.py``, the one owner of that rule, and handed here
as a ``VarlenChoice``):

- ``VARLEN_ATTENTION``: flash attention's varlen kernel (``aten._flash_attention_forward/backward``,
  CUDA), with the attention-probability dropout BERT trains with inside the kernel (its random
  offsets come from the CUDA generator, so a saved and restored RNG replays the same masks).
  torch's public ``varlen_attn`` has no dropout, hence the op here. q, k and v are cast to the
  autocast dtype at the kernel's entry: rotary embeddings multiply half-precision q/k by fp32
  cos/sin, so a decoder's q and k arrive in fp32 under autocast, and the kernel takes bf16/fp16 only.
- ``VARLEN_REFERENCE``: scaled_dot_product_attention text by text over the same indexing; what
  runs on CPU, and the maths the tests hold the kernel to. It reads the boundaries back from
  ``cu_seqlens`` (a host sync on a GPU, which is why a GPU never runs it).

Forwards that carry no ``cu_seq_lens_q`` (padded evaluation batches) go to SDPA as usual, with
SDPA's masks. Unpadded forwards pass ``no_mask``: transformers takes a 4D mask as already built,
so neither a [T, T] mask nor its packed-sequence detection (a host read) is ever made for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "dist_embed_varlen"
VARLEN_REFERENCE = "dist_embed_varlen_reference"
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class VarlenChoice:
    """What unpadded tokens run on here (made by ``engine/precision.Precision.varlen``)."""

    kernel: bool  # flash attention's varlen kernel; False: the per-text reference
    refusal: str | None = None  # why unpadded tokens must not run here at all (one line); None: they may


@torch.library.custom_op("dist_embed::varlen_fwd", mutates_args=())
def _varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, dropout: float,
                causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, dropout,
                                                                       causal, False, scale=scale)
    return out, lse, seed, offset


@_varlen_fwd.register_fake
def _(q, k, v, cu, max_len, dropout, causal, scale):
    # the shapes torch's own meta function gives the op: lse [heads, T] fp32, the philox seed and offset
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return torch.empty_like(q), lse, q.new_empty((2,), dtype=torch.uint64), q.new_empty((), dtype=torch.uint64)


@torch.library.custom_op("dist_embed::varlen_bwd", mutates_args=())
def _varlen_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, cu: torch.Tensor, max_len: int, dropout: float, causal: bool, seed: torch.Tensor,
                offset: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.ops.aten._flash_attention_backward(grad.contiguous(), q, k, v, out, lse, cu, cu, max_len,
                                                          max_len, dropout, causal, seed, offset, scale=scale)
    return dq, dk, dv


@_varlen_bwd.register_fake
def _(grad, q, k, v, out, lse, cu, max_len, dropout, causal, seed, offset, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu, max_len, dropout, causal, scale = inputs
    out, lse, seed, offset = output
    ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
    ctx.args = (max_len, dropout, causal, scale)


def _backward(ctx, grad, *_):
    q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
    max_len, dropout, causal, scale = ctx.args
    dq, dk, dv = _varlen_bwd(grad, q, k, v, out, lse, cu, max_len, dropout, causal, seed, offset, scale)
    return dq, dk, dv, None, None, None, None, None


_varlen_fwd.register_autograd(_backward, setup_context=_setup)


def kernel_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype q, k and v enter the kernel in: the autocast dtype where autocast is on (what
    every training forward runs under), else q's own; the kernel takes half precision only."""
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    if dtype not in KERNEL_DTYPES:
        raise RuntimeError(f"flash attention's varlen kernel takes bf16/fp16 inputs, not {dtype}: run the forward "
                           "under the precision's autocast (engine/precision.py chose the kernel for bf16/fp16)")
    return dtype


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                     dropout: float = 0.0, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention of each sequence ``cu[i]:cu[i+1]`` over itself through the kernel: ``q`` [T, heads,
    d], ``k``/``v`` [T, kv heads, d] (grouped-query heads are shared) -> [T, heads, d]."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    dtype = kernel_dtype(q)
    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))  # no copy for BERT's projections under autocast
    return _varlen_fwd(q, k, v, cu, max_len, float(dropout), bool(causal), float(scale))[0]  # max_len may be symbolic


def reference_attention(q, k, v, cu, dropout: float = 0.0, causal: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """The same function text by text with SDPA: the maths the tests hold the kernel to (and what
    runs on CPU). Reads the boundaries back from ``cu``: a host sync on a GPU."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves heads / kv_heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    bounds = cu.tolist()
    out = []
    for a, b in zip(bounds, bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))  # [1, heads, len, d]
        o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=causal, scale=scale)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out) if out else q.new_zeros(q.shape)


def _padded(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """A forward without ``cu_seq_lens_q`` (padded columns): SDPA, or the CPU fast-dropout attention."""
    from .fast_dropout import _attention as fallback

    return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _unpadded_args(module, query, key, value, kwargs):
    """transformers' [1, heads, T, d] tensors as [T, heads, d], and whether the attention is causal."""
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    return q, k, v, bool(getattr(module, "is_causal", False))


def _kernel(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return _padded(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    q, k, v, causal = _unpadded_args(module, query, key, value, kwargs)
    return kernel_attention(q, k, v, cu, kwargs["max_length_q"], dropout, causal, scaling)[None], None


def _reference(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return _padded(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    q, k, v, causal = _unpadded_args(module, query, key, value, kwargs)
    return reference_attention(q, k, v, cu, dropout, causal, scaling)[None], None


def no_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """The attention mask an unpadded forward passes: an empty [1, 1, 0, 0] tensor on the device
    (no copy, no memory). transformers returns a 4D mask as given, so it builds none and never
    looks for packed sequences in the position ids; our attention reads ``cu_seq_lens_q`` instead."""
    return input_ids.new_empty((1, 1, 0, 0), dtype=torch.bool)


def use_varlen_attention(transformer: torch.nn.Module, kernel: bool) -> bool:
    """Switch the model's attention to the kernel (``kernel``) or the reference; it must be on SDPA
    or one of ours. Padded forwards keep SDPA's masks (``sdpa_mask``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .fast_dropout import FAST_DROPOUT_ATTENTION

    ours = ("sdpa", FAST_DROPOUT_ATTENTION, VARLEN_ATTENTION, VARLEN_REFERENCE)
    if getattr(transformer.config, "_attn_implementation", None) not in ours:
        return False
    name = VARLEN_ATTENTION if kernel else VARLEN_REFERENCE
    AttentionInterface.register(name, _kernel if kernel else _reference)
    AttentionMaskInterface.register(name, sdpa_mask)
    transformer.set_attn_implementation(name)
    return True
