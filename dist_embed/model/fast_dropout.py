"""Dropout with cheaper masks on CPU: same distribution, same maths, other random draws.

torch's CPU dropout draws its mask with ``bernoulli_``, which runs element by element; in a MiniLM
training step it was a large share of the time (docs/performance.md). A uniform draw compared with
p (vectorised) gives the same distribution, keep with probability 1 - p, scaled by 1 / (1 - p),
faster. This replaces
the encoder's ``nn.Dropout`` modules and, for BERT-style attention, the dropout on the attention
probabilities (an attention function that is SDPA's maths with this dropout; without dropout, in
eval, or off CPU it simply calls SDPA). GPUs keep their fused kernels. Dropout off: bit-identical.
"""
from __future__ import annotations

import torch
from torch import nn

FAST_DROPOUT_ATTENTION = "dist_embed_sdpa"


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 - p) (as F.dropout)."""
    if p <= 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    keep = (torch.rand_like(x, dtype=torch.float32) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * keep


class MaskDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p) if self.training else x

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not dropout or query.device.type != "cpu" or key.shape[1] != query.shape[1] or kwargs.get("position_bias") \
            is not None or getattr(module, "is_causal", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(fast_dropout(probs, dropout), value)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    """Make the attention function known to transformers (idempotent; masks are built as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FAST_DROPOUT_ATTENTION, _attention)
    AttentionMaskInterface.register(FAST_DROPOUT_ATTENTION, sdpa_mask)


def use_fast_dropout(transformer: nn.Module) -> int:
    """Swap ``nn.Dropout`` modules (and SDPA attention dropout) in place; returns how many swapped."""
    swapped = 0
    for parent in transformer.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, MaskDropout(child.p))
                swapped += 1
    if getattr(transformer.config, "_attn_implementation", None) == "sdpa":
        _register()
        transformer.set_attn_implementation(FAST_DROPOUT_ATTENTION)
    return swapped
