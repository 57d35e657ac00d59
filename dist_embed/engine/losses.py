"""Losses: pure functions of embeddings (sentence-transformers' definitions), and the small loss
objects a run uses, each holding its options and describing itself for the model card.

Every loss returns ``sum of per-example losses on this rank / number of examples in the GLOBAL
batch``. Summing that over ranks (our gradient all-reduce is a SUM) gives exactly the mean over the
global batch, the same number a single process computes on the whole batch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..data.batch import to_device
from ..distributed import DistState, gather_with_grad


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


# ---------------------------------------------------------------------------------------------
# loss objects: what a step calls (``loss(embeddings, batch, state)``) and the card describes


def embedding_std(emb: torch.Tensor) -> torch.Tensor | None:
    """Mean over dimensions of the std across the batch (a device scalar, read on log steps): ~0
    means every text gets the same vector."""
    return emb.detach().float().std(0).mean() if emb.shape[0] > 1 else None


@dataclass(frozen=True)
class GradCache:
    """Gradient caching (Gao et al. 2021): embeddings first without activations, then each
    mini-batch re-embedded with them, so the loss sees the whole batch at the memory of a mini-batch:
    mini-batches of ``rows`` texts, or of at most ``tokens`` padded tokens."""

    rows: int = 32
    tokens: int | None = None


@dataclass(frozen=True)
class GuideFilter:
    """GISTEmbed-style false-negative filter: a frozen guide model scores the candidates; those it
    scores above the anchor's positive (- margin, or x (1 - margin)) leave the softmax."""

    model: object  # a frozen Encoder
    path: str
    margin: float = 0.0
    strategy: str = "absolute"  # absolute | relative


@dataclass(frozen=True)
class MultipleNegativesRanking:
    """MNRL over in-batch candidates, gathered from every rank (``gather``), optionally with false
    negatives masked (the same text as the anchor's positive; a guide model) and cached (``cache``)."""

    scale: float = 20.0
    gather: bool = True
    mask_same_text: bool = False
    guide: GuideFilter | None = None
    cache: GradCache | None = None

    key = property(lambda self: "cached_mnrl" if self.cache else "mnrl")
    title = property(lambda self: ("Cached" if self.cache else "") + "MultipleNegativesRankingLoss")

    def prepare(self, embs: list[torch.Tensor], batch, state: DistState, timer=None) -> tuple[list, dict]:
        """Candidates gathered once at full width (Matryoshka then scores truncations of them)."""
        anchors, docs = embs[0], embs[1:]
        sizes = batch.sizes
        if self.gather and state.enabled:
            docs = [gather_with_grad(d, sizes, state, timer) for d in docs]
            offset, count = sum(sizes[: state.rank]), batch.global_size
        else:
            offset, count = 0, (anchors.shape[0] * state.world_size if state.enabled else batch.global_size)
        mask = self._false_negatives(batch, state, offset, timer, 1 + len(docs)) \
            if self.mask_same_text or self.guide is not None else None
        ctx = {"offset": offset, "count": max(count, 1), "mask": mask, "candidates": sum(d.shape[0] for d in docs)}
        return [anchors, *docs], ctx

    def score(self, embs: list[torch.Tensor], ctx: dict) -> torch.Tensor:
        return mnrl(embs[0], embs[1], embs[2:], scale=self.scale, label_offset=ctx["offset"],
                    global_count=ctx["count"], mask=ctx["mask"])

    def _false_negatives(self, batch, state: DistState, offset: int, timer, n_cols: int) -> torch.Tensor:
        """[local anchors x all candidates] True where a candidate is likely a positive of the anchor
        and must leave the softmax (never the anchor's own positive). Candidates are the positives,
        then each negative column, of every rank in rank order: the layout ``mnrl`` scores."""
        texts = batch.texts or [[] for _ in range(n_cols)]  # an empty slice still joins every gather
        device, n = state.device, len(texts[0])
        gather = (lambda x: gather_with_grad(x, batch.sizes, state, timer)) if self.gather and state.enabled \
            else (lambda x: x)
        labels = torch.arange(n, device=device) + offset
        mask = None
        if self.mask_same_text:
            keys = [to_device(text_keys(col), device) for col in texts]
            cands = torch.cat([gather(k) for k in keys[1:]])
            mask = keys[1][:, None] == cands[None, :]
        if self.guide is not None:
            with torch.no_grad():
                g = [self.guide.model.embed_texts(col) for col in texts]  # on the device, never read back
                cands = F.normalize(torch.cat([gather(x) for x in g[1:]]), dim=-1)
                sims = F.normalize(g[0], dim=-1) @ cands.T
                pos = sims.gather(1, labels[:, None]) if n else sims[:, :1]
                margin = self.guide.margin
                limit = pos - margin if self.guide.strategy == "absolute" else pos * (1 - margin)
                guided = sims > limit
            mask = guided if mask is None else mask | guided
        mask[torch.arange(n, device=device), labels] = False
        return mask

    def card(self, world_size: int) -> dict:
        params = {"scale": self.scale, "similarity_fct": "cos_sim"}
        if self.cache:
            params["mini_batch_size"] = self.cache.rows
            if self.cache.tokens:
                params["mini_batch_tokens"] = self.cache.tokens
        else:
            params["gather_across_devices"] = self.gather
        if self.mask_same_text:
            params["mask_same_text"] = True
        if self.guide is not None:
            params.update(guide_model=self.guide.path, guide_margin=self.guide.margin,
                          guide_margin_strategy=self.guide.strategy)
        return params


@dataclass(frozen=True)
class CosineSimilarity:
    """CosineSimilarityLoss on scored pairs; the gold label is score / ``score_max``."""

    score_max: float = 1.0
    cache = None
    key, title = "cosine", "CosineSimilarityLoss"

    def prepare(self, embs, batch, state, timer=None):
        scores = to_device(batch.scores, embs[0].device) if batch.scores is not None else embs[0].new_zeros(0)
        return embs, {"labels": scores / self.score_max, "count": batch.global_size, "candidates": None}

    def score(self, embs, ctx) -> torch.Tensor:
        return cosine_similarity_loss(embs[0], embs[1], ctx["labels"], global_count=ctx["count"])

    def card(self, world_size: int) -> dict:
        return {"loss_fct": "torch.nn.modules.loss.MSELoss"}


@dataclass(frozen=True)
class Triplet:
    """TripletLoss: max(d(a, p) - d(a, n) + margin, 0)."""

    margin: float = 5.0
    distance: str = "euclidean"
    cache = None
    key, title = "triplet", "TripletLoss"

    def prepare(self, embs, batch, state, timer=None):
        return embs, {"count": batch.global_size, "candidates": None}

    def score(self, embs, ctx) -> torch.Tensor:
        return triplet_loss(embs[0], embs[1], embs[2], margin=self.margin, distance=self.distance,
                            global_count=ctx["count"])

    def card(self, world_size: int) -> dict:
        return {"distance_metric": f"TripletDistanceMetric.{self.distance.upper()}", "triplet_margin": self.margin}


@dataclass(frozen=True)
class Matryoshka:
    """MatryoshkaLoss (Kusupati et al. 2022) around another loss: the weighted sum of the inner loss
    on the first d dimensions of the embeddings, each truncation L2-normalised (as
    sentence-transformers does; it matters for triplet distances). Candidates are prepared once."""

    inner: MultipleNegativesRanking | CosineSimilarity | Triplet
    dims: tuple[tuple[int, float], ...]  # (dimension, weight)
    key, title = "matryoshka", "MatryoshkaLoss"

    @property
    def cache(self) -> GradCache | None:
        return self.inner.cache

    def prepare(self, embs, batch, state, timer=None):
        return self.inner.prepare(embs, batch, state, timer)

    def score(self, embs, ctx) -> torch.Tensor:
        return sum(w * self.inner.score([F.normalize(e[:, :d], p=2, dim=-1) for e in embs], ctx)
                   for d, w in self.dims)

    def card(self, world_size: int) -> dict:
        return {"loss": self.inner.title, "matryoshka_dims": [d for d, _ in self.dims],
                "matryoshka_weights": [w for _, w in self.dims], "n_dims_per_step": -1,
                "loss_parameters": self.inner.card(world_size)}


Loss = MultipleNegativesRanking | CosineSimilarity | Triplet | Matryoshka


def compute(loss: Loss, embs: list[torch.Tensor], batch, state: DistState, timer=None) -> tuple[torch.Tensor, dict]:
    """The step's loss from this rank's embeddings (one tensor per text column), and what the
    health checks read: the embedding spread and the number of candidates per anchor."""
    prepared, ctx = loss.prepare(embs, batch, state, timer)
    return loss.score(prepared, ctx), {"emb_std": embedding_std(embs[0]), "candidates": ctx["candidates"]}


def build_loss(cfg, gather: bool, guide: GuideFilter | None = None) -> Loss:
    """The loss object a ``LossConfig`` describes (``gather``: the resolved gather_across_devices)."""
    if cfg.name in ("mnrl", "cached_mnrl"):
        cache = GradCache(cfg.mini_batch_size, cfg.mini_batch_tokens) if cfg.name == "cached_mnrl" else None
        loss = MultipleNegativesRanking(cfg.scale, gather, cfg.mask_same_text, guide, cache)
    elif cfg.name == "cosine":
        loss = CosineSimilarity(cfg.score_max)
    elif cfg.name == "triplet":
        loss = Triplet(cfg.margin, cfg.distance)
    else:
        raise ValueError(f"unknown loss {cfg.name!r}")
    return Matryoshka(loss, cfg.matryoshka()) if cfg.matryoshka_dims else loss


def with_cache(loss: Loss, cache: GradCache | None) -> Loss:
    """``loss`` with another gradient cache (tests compare cached and plain steps)."""
    if isinstance(loss, Matryoshka):
        return replace(loss, inner=with_cache(loss.inner, cache))
    return replace(loss, cache=cache) if isinstance(loss, MultipleNegativesRanking) else loss


def text_keys(texts: list[str]) -> torch.Tensor:
    """A 52-bit hash of each text as float64 (exact), so it travels through the float gather."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") >> 12
                         for t in texts], dtype=torch.float64)
