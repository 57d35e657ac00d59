"""Which ranked candidates become an anchor's negatives: the false-negative filters.

The rules are sentence-transformers' ``mine_hard_negatives`` (and NV-Retriever's positive-aware
thresholds): the anchor itself and every positive of the anchor (any text equal to one) are never
negatives and do not count as ranks; of the rest, ranks ``range_min`` to ``range_max`` (0-based,
best first) are considered, ``max_score`` / ``min_score`` bound the cosine, ``absolute_margin``
keeps a candidate only if it scores <= positive - margin and ``relative_margin`` only if it scores
<= positive x (1 - margin) (0.05: below 95% of the positive, NV-Retriever's TopK-PercPos). The first
``num_negatives`` kept, in rank order, are the negatives. ``dist-embed mine`` and the refresh during
training both choose with ``choose_ids`` (vectorised over rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MineOptions:
    num_negatives: int = 3
    range_min: int = 0  # skip the closest range_min candidates (often unlabelled positives)
    range_max: int = 100  # consider only the closest range_max candidates
    max_score: float | None = None  # drop candidates more similar than this to the anchor
    min_score: float | None = None  # drop candidates less similar than this
    absolute_margin: float | None = None  # keep only scores <= positive score - margin
    relative_margin: float | None = None  # keep only scores <= positive score x (1 - margin), e.g. 0.05
    batch_size: int = 64
    block: int = 512  # anchors per block: the unit of work and of resume (any world size: the same bytes)


def choose_ids(scores: np.ndarray, ids: np.ndarray, positive: np.ndarray, exclude: np.ndarray,
               opt: MineOptions) -> np.ndarray:
    """[n, num_negatives] candidate ids (-1 where fewer passed the filters), for n rows at once.

    ``scores``/``ids``: [n, m] each row's candidates, best first (id -1: no candidate there);
    ``positive``: [n] each row's anchor-positive score; ``exclude``: [n, e] ids that are never
    negatives for the row (its anchor's positives, the anchor itself; -1 pads)."""
    n, k = len(ids), opt.num_negatives
    out = np.full((n, k), -1, dtype=np.int64)
    if not n or not ids.shape[1]:
        return out
    valid = ids >= 0
    if exclude.shape[1]:
        valid &= ~(ids[:, :, None] == exclude[:, None, :]).any(2)
    rank = np.cumsum(valid, axis=1) - 1  # rank among the candidates that may be negatives
    keep = valid & (rank >= opt.range_min) & (rank < opt.range_max)
    if opt.max_score is not None:
        keep &= scores <= opt.max_score
    if opt.min_score is not None:
        keep &= scores >= opt.min_score
    pos = positive[:, None]
    if opt.absolute_margin is not None:
        keep &= scores <= pos - opt.absolute_margin
    if opt.relative_margin is not None:
        keep &= scores <= pos * (1 - opt.relative_margin)
    slot = np.cumsum(keep, axis=1) - 1
    keep &= slot < k
    r, c = np.nonzero(keep)
    out[r, slot[r, c]] = ids[r, c]
    return out


def choose_negatives(scores: np.ndarray, idx: np.ndarray, texts: list[str], positive_score: float,
                     exclude: set[str], opt: MineOptions) -> list[str]:
    """One anchor's negatives as texts (``choose_ids`` for a single row; ``exclude`` by text)."""
    idx = np.asarray(idx, dtype=np.int64)
    banned = np.array(sorted({int(i) for i in idx if texts[i] in exclude}) or [], dtype=np.int64)
    got = choose_ids(np.asarray(scores, dtype=np.float64)[None], idx[None], np.array([positive_score]),
                     banned[None] if len(banned) else np.zeros((1, 0), np.int64), opt)[0]
    return [texts[i] for i in got if i >= 0]


def _mix(x: int) -> int:
    """splitmix64: a well-spread 64-bit hash of an integer (no RNG state, the same everywhere)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def fill_at_random(chosen: np.ndarray, exclude: np.ndarray, corpus_size: int, seeds: np.ndarray) -> int:
    """Rows with fewer than k negatives after the filters get random corpus texts (never one of
    their excluded ids, never twice): a batch needs the same columns in every row, and a random
    text is a plain in-batch-style negative. Deterministic: row i's draws depend only on
    ``seeds[i]``. In place; returns how many rows were topped up."""
    filled = 0
    for i in np.nonzero((chosen < 0).any(1))[0]:
        have = [int(x) for x in chosen[i] if x >= 0]
        banned = set(have) | {int(x) for x in exclude[i] if x >= 0}
        draw = 0
        while len(have) < chosen.shape[1]:
            cand = _mix(int(seeds[i]) * 1_000_003 + draw) % corpus_size
            draw += 1
            if cand not in banned:
                have.append(cand)
                banned.add(cand)
        chosen[i] = have
        filled += 1
    return filled
