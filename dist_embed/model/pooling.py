"""Pooling: one embedding per text from its tokens' states, for padded columns (``pool``) and for
the layouts of ``data/layout.py`` (``pool_tokens``), in fp32, with shapes known on the host and no
scatter-add (so nothing is read back and the same inputs give the same bits on a GPU)."""
from __future__ import annotations

import torch


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32: embeddings are pooled in fp32 whatever the autocast dtype of the states."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pool_tokens(states: torch.Tensor, counts: torch.Tensor, mode: str) -> torch.Tensor:
    """One embedding per text from its real tokens: ``states`` [R, D] holds the tokens of every text,
    text after text; ``counts`` [texts] how many each has (the layouts of data/layout.py pool here).
    Mean and max are segment reductions (``torch.segment_reduce``: each text and dimension summed
    by one thread in token order, forward and backward), not scatters whose atomics add in a
    different order on every GPU run, so the same inputs give the same bits; nothing is read back."""
    if mode in ("mean", "max"):
        return torch.segment_reduce(_wide(states), mode, lengths=counts, axis=0, unsafe=True)
    if mode == "cls":
        return _wide(states[torch.cumsum(counts, 0) - counts])  # each text's first token
    if mode == "lasttoken":  # decoder embedders: each text's last token
        return _wide(states[torch.cumsum(counts, 0) - 1])
    raise ValueError(f"unknown pooling {mode!r}")


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pooling of a padded batch [texts, length, D] (left or right padding) over its real tokens,
    with shapes known on the host (no boolean indexing: on a GPU that reads the mask back) and
    plain reductions (deterministic)."""
    mask = attention_mask.bool()
    x = _wide(token_embeddings)
    if mode == "mean":
        weight = mask.unsqueeze(-1).to(x.dtype)
        return (x * weight).sum(1) / weight.sum(1).clamp(min=1)
    if mode == "max":
        return x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)
    rows = torch.arange(x.shape[0], device=x.device)
    if mode == "cls":  # the first real token (argmax gives the first maximum)
        return x[rows, mask.int().argmax(1)]
    if mode == "lasttoken":  # the last real token, left or right padding alike
        return x[rows, mask.shape[1] - 1 - mask.flip(1).int().argmax(1)]
    raise ValueError(f"unknown pooling {mode!r}")
