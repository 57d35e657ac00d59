"""Variable-length attention over unpadded tokens (``data/layout.py``'s ``Unpadded``), registered
as a transformers attention function: every self-attention of BERT, RoBERTa, XLM-R and the decoder
embedders (Llama, Qwen2, Mistral) then runs over the real tokens of all texts at once, each text
attending only to itself (causally for decoders), with no mask materialised.

On CUDA it is flash attention's varlen kernel (``aten._flash_attention_forward/backward``), with
the attention-probability dropout BERT trains with inside the kernel (its random offsets come
from the CUDA generator, so a saved and restored RNG replays the same masks). torch's public
``varlen_attn`` has no dropout, hence the op here. Elsewhere (CPU, fp32) a reference runs
scaled_dot_product_attention text by text over the same indexing: the tests check the maths with it.
Forwards that carry no ``cu_seq_lens_q`` (padded evaluation batches) go to SDPA as usual.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "dist_embed_varlen"


@torch.library.custom_op("dist_embed::varlen_fwd", mutates_args=())
def _varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, dropout: float,
                causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, dropout,
                                                                      causal, False, scale=scale)
    return out, lse, rng, unused


@_varlen_fwd.register_fake
def _(q, k, v, cu, max_len, dropout, causal, scale):
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return torch.empty_like(q), lse, q.new_empty((2,), dtype=torch.uint64), q.new_empty((0,), dtype=torch.uint64)


@torch.library.custom_op("dist_embed::varlen_bwd", mutates_args=())
def _varlen_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, cu: torch.Tensor, max_len: int, dropout: float, causal: bool, rng: torch.Tensor,
                unused: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.ops.aten._flash_attention_backward(grad.contiguous(), q, k, v, out, lse, cu, cu, max_len,
                                                          max_len, dropout, causal, rng, unused, scale=scale)
    return dq, dk, dv


@_varlen_bwd.register_fake
def _(grad, q, k, v, out, lse, cu, max_len, dropout, causal, rng, unused, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu, max_len, dropout, causal, scale = inputs
    out, lse, rng, unused = output
    ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
    ctx.args = (max_len, dropout, causal, scale)


def _backward(ctx, grad, *_):
    q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
    max_len, dropout, causal, scale = ctx.args
    dq, dk, dv = _varlen_bwd(grad, q, k, v, out, lse, cu, max_len, dropout, causal, rng, unused, scale)
    return dq, dk, dv, None, None, None, None, None


_varlen_fwd.register_autograd(_backward, setup_context=_setup)


def flash_ok(q: torch.Tensor) -> bool:
    """Whether the flash kernel takes these inputs (CUDA, half precision, head size it supports)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                     dropout: float = 0.0, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention of each sequence ``cu[i]:cu[i+1]`` over itself: ``q`` [T, heads, d], ``k``/``v``
    [T, kv heads, d] (grouped-query heads are shared) -> [T, heads, d]."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    if flash_ok(q):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # a no-op for BERT's projections
        return _varlen_fwd(q, k, v, cu, max_len, float(dropout), bool(causal), float(scale))[0]
    return reference_attention(q, k, v, cu, dropout, causal, scale)


def reference_attention(q, k, v, cu, dropout: float, causal: bool, scale: float) -> torch.Tensor:
    """The same function text by text with SDPA: the maths the tests hold the kernel path to (and
    what runs off CUDA). Reads the boundaries back from ``cu``: a host sync, fine where it runs."""
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


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A transformers attention function: ``query`` [1, heads, T, d] over unpadded tokens when the
    forward carries ``cu_seq_lens_q``; SDPA (or the CPU fast-dropout attention) otherwise."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from .fast_dropout import _attention as fallback

        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu,
                           int(kwargs["max_length_q"]), dropout, bool(getattr(module, "is_causal", False)), scaling)
    return out[None], None


def _sdpa_mask_for_padded(*args, **kwargs):
    """Unpadded forwards need no mask; padded ones (evaluation) get SDPA's."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def use_varlen_attention(transformer: torch.nn.Module) -> bool:
    """Switch the model's attention to ``dist_embed_varlen`` (it must be on SDPA or our CPU variant)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if getattr(transformer.config, "_attn_implementation", None) not in ("sdpa", "dist_embed_sdpa", VARLEN_ATTENTION):
        return False
    AttentionInterface.register(VARLEN_ATTENTION, _attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _sdpa_mask_for_padded)
    transformer.set_attn_implementation(VARLEN_ATTENTION)
    return True
