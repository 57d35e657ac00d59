"""Losses as pure functions of embeddings, with sentence-transformers' definitions.

Every loss returns ``sum of per-example losses on this rank / number of examples in the GLOBAL
batch``. Summing that over ranks (our gradient all-reduce is a SUM) gives exactly the mean over the
global batch, the same number a single process computes on the whole batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (autocast hands us bf16/fp16; float64 stays float64 for tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cos_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity matrix (len(a) x len(b))."""
    return F.normalize(a, p=2, dim=-1) @ F.normalize(b, p=2, dim=-1).T


def mnrl(anchors: torch.Tensor, positives: torch.Tensor, negatives: list[torch.Tensor], *, scale: float,
         label_offset: int, global_count: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MultipleNegativesRankingLoss (Henderson et al. 2017; sentence-transformers' definition).

    ``anchors``: this rank's anchors (n x d). ``positives`` and each of ``negatives``: the candidates
    of ALL ranks in rank order (N x d), gathered with autograd. Anchor i's positive sits at column
    ``label_offset + i``; every other positive and every negative is an in-batch negative. Positives
    and negatives are gathered separately and concatenated after, so positives keep columns 0..N-1.
    ``mask`` (n x candidates, True = leave out): likely false negatives, dropped from the softmax.
    """
    candidates = torch.cat([positives, *negatives], dim=0)
    scores = cos_sim(_wide(anchors), _wide(candidates)) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    labels = torch.arange(anchors.shape[0], device=anchors.device) + label_offset
    return F.cross_entropy(scores, labels, reduction="sum") / global_count


def cosine_similarity_loss(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor, *,
                           global_count: int) -> torch.Tensor:
    """CosineSimilarityLoss: squared error between cos(a, b) and a gold score."""
    cos = F.cosine_similarity(_wide(a), _wide(b), dim=-1)
    return ((cos - _wide(scores)) ** 2).sum() / global_count


def _distance(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "euclidean":
        return F.pairwise_distance(x, y, p=2)
    if kind == "manhattan":
        return F.pairwise_distance(x, y, p=1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(x, y)
    raise ValueError(f"unknown triplet distance {kind!r}")


def triplet_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, *, margin: float = 5.0,
                 distance: str = "euclidean", global_count: int) -> torch.Tensor:
    """TripletLoss: max(d(a, p) - d(a, n) + margin, 0)."""
    a, p, n = _wide(a), _wide(p), _wide(n)
    return F.relu(_distance(distance, a, p) - _distance(distance, a, n) + margin).sum() / global_count
