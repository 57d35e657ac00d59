"""STS evaluation: correlation between gold scores and embedding similarities.

Same definitions as sentence-transformers' EmbeddingSimilarityEvaluator: Pearson and Spearman of the
gold score against cosine, -manhattan, -euclidean and dot similarities; the primary metric is
``spearman_cosine``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..data.readers import Source
from ..data.rows import Schema, SkipCounter, validate_rows

log = logging.getLogger(__name__)

PRIMARY = "spearman_cosine"


@dataclass(frozen=True)
class StsData:
    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray


def load_sts(path: str, name: str | None = None, on_error: str = "raise", *, split: str = "validation",
             subset: str | None = None, columns: dict[str, str] | None = None) -> StsData:
    """Read sentence1 / sentence2 / score rows from tsv (quoting off), csv, jsonl(.gz), parquet, or a
    Hugging Face dataset (hub id such as ``sentence-transformers/stsb``, or a saved one: ``split``)."""
    skips = SkipCounter()
    source = Source(path, subset=subset, split=split, streaming=False)
    rows = list(validate_rows(source.records(), Schema.for_loss("cosine"), columns or {}, on_error, skips))
    if skips.total:
        log.warning("%s: %s", path, skips.summary())
    if len(rows) < 2:
        raise ValueError(f"{path}: an STS set needs at least 2 scored pairs, found {len(rows)}")
    return StsData(name or path, [r.texts[0] for r in rows], [r.texts[1] for r in rows],
                   np.array([r.score for r in rows], dtype=np.float64))


def similarity_metrics(emb1: np.ndarray, emb2: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    e1 = emb1.astype(np.float64)
    e2 = emb2.astype(np.float64)
    n1 = e1 / np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-12)
    n2 = e2 / np.maximum(np.linalg.norm(e2, axis=1, keepdims=True), 1e-12)
    sims = {
        "cosine": (n1 * n2).sum(1),
        "manhattan": -np.abs(e1 - e2).sum(1),
        "euclidean": -np.sqrt(((e1 - e2) ** 2).sum(1)),
        "dot": (e1 * e2).sum(1),
    }
    from scipy.stats import pearsonr, spearmanr  # here: scipy.stats takes about a second to import

    out = {}
    for name, s in sims.items():
        if np.ptp(s) == 0:  # constant predictions (collapsed embeddings): correlation undefined
            out[f"pearson_{name}"] = out[f"spearman_{name}"] = math.nan
            continue
        out[f"pearson_{name}"] = float(pearsonr(gold, s)[0])
        out[f"spearman_{name}"] = float(spearmanr(gold, s)[0])
    return out


def evaluate_sts(encoder, data: StsData, batch_size: int = 64) -> dict[str, float]:
    return evaluate_sts_dims(encoder, data, batch_size)[data.name]


def evaluate_sts_dims(encoder, data: StsData, batch_size: int = 64, dims=()) -> dict[str, dict[str, float]]:
    """Metrics of the full embeddings under ``data.name`` and, for each Matryoshka dimension d,
    of their first d dimensions under ``<name>-dim<d>`` (one encoding pass)."""
    return sts_metrics(encoder.encode(data.sentences1 + data.sentences2, batch_size=batch_size), data, dims)


def sts_metrics(emb: np.ndarray, data: StsData, dims=()) -> dict[str, dict[str, float]]:
    """``evaluate_sts_dims`` from the embeddings of ``sentences1 + sentences2``."""
    n = len(data.sentences1)
    out = {data.name: similarity_metrics(emb[:n], emb[n:], data.scores)}
    for d in dims:
        out[f"{data.name}-dim{d}"] = similarity_metrics(emb[:n, :d], emb[n:, :d], data.scores)
    return out
