"""Exact top-k of anchors among a corpus: bounded memory, split across ranks, and the same result
at any world size.

**Exact scores, whatever the split.** Float matrix products give an (anchor, candidate) score that
depends in its last bits on the shapes multiplied, the BLAS blocking and the threads, so a corpus
cut differently across 1, 2 or 3 ranks could rank near-ties differently. Here each embedding is
normalised once (in the one batch that embedded it, the same at any world size) and rounded to
integers, ``round(x * 2**S)``; scores are the integer dot products, exact in float64 (every
product and partial sum stays below 2**53) and therefore the same for every split, thread count
and device. A float32 product of the same integers (exact inputs, error <= ``float32_error``)
picks each tile's candidates first, so only about k per anchor are rescored exactly; the bound
guarantees that the exact top-k is among them. ``S`` (up to 24 bits: cosine steps of 6e-8) is
chosen so that a score and a corpus id fit one int64 *key*, ``(score + offset) << id_bits | (max
id - id)``: keys order candidates by score, then by the lower id, so merging lists of keys from
any number of ranks is one exact ``topk``.

**Split across ranks.** Texts are ordered longest first and cut into chunks of ``chunk`` texts;
chunk c belongs to rank ``c % world`` (``Grid``), which embeds it in batches of consecutive texts
(each text in the same batch at any world size) and keeps its integer embeddings. Each anchor
chunk in turn is broadcast by its owner; every rank scores it against its corpus chunks in tiles
of at most ``TILE_ROWS`` x chunk and keeps the top k per anchor; the owner gathers the world's
lists and merges them. Memory per rank: its share of the corpus, one anchor chunk, one tile and
the world's k lists of one chunk; never an anchors x corpus matrix.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

TILE_ROWS = 1024  # anchors scored at once against a corpus chunk
RESCORE = 8192  # (anchor, candidate) pairs rescored exactly at once
MAX_SCALE_BITS = 24  # integer embeddings up to 2**24: exact in float32 too


@dataclass(frozen=True)
class Keys:
    """How scores and ids pack into one int64 (see the module's docstring)."""

    scale_bits: int
    id_bits: int

    @staticmethod
    def for_corpus(size: int) -> "Keys":
        id_bits = max(1, int(size).bit_length())
        scale = min(MAX_SCALE_BITS, (61 - id_bits) // 2)
        if scale < 12:
            raise ValueError(f"a corpus of {size} texts is too large for exact 64-bit keys")
        return Keys(scale, id_bits)

    @property
    def offset(self) -> int:
        return 1 << (2 * self.scale_bits + 1)  # above any |score| (unit vectors: about 2 ** (2 S))

    @property
    def id_max(self) -> int:
        return (1 << self.id_bits) - 1

    def quantize(self, emb: torch.Tensor) -> torch.Tensor:
        """Unit-normalised embeddings as int32 integers of 2**-S."""
        x = torch.nn.functional.normalize(emb.float(), dim=-1)
        return torch.round(x * float(1 << self.scale_bits)).to(torch.int32)

    def encode(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return ((scores + self.offset) << self.id_bits) | (self.id_max - ids)

    def scores(self, keys: torch.Tensor) -> torch.Tensor:
        """The exact cosine scores of keys (float64; -inf where the key is -1: no candidate)."""
        score = ((keys >> self.id_bits) - self.offset).double() / float(1 << (2 * self.scale_bits))
        return torch.where(keys >= 0, score, -math.inf)

    def decode(self, keys: torch.Tensor | np.ndarray):
        """(cosine scores float64, ids int64; -1 where the key is -1: no candidate)."""
        keys = torch.as_tensor(keys)
        ids = torch.where(keys >= 0, self.id_max - (keys & self.id_max), -1)
        return self.scores(keys).cpu().numpy(), ids.cpu().numpy()

    def exact(self, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Row-wise integer dot products of two int32 [n, d] tensors (exact, int64)."""
        return (q.double() * c.double()).sum(1).long()


def float32_error(dim: int) -> float:
    """A bound on |float32 dot - exact dot| for two vectors of norm <= 1.01 whose entries are exact
    in float32, summed in any order: gamma_d = d u / (1 - d u), u = 2**-24 (Higham, ch. 3)."""
    u = 2.0 ** -24
    return 1.03 * dim * u / (1 - dim * u)


@contextmanager
def full_float32():
    """Float32 products at full precision whatever the caller set: TF32 (``set_float32_matmul_precision
    ("high")``, a common GPU training setting) rounds inputs to 10 bits and breaks the error bound
    the float32 filter relies on."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def tile_top_k(q: torch.Tensor, c: torch.Tensor, ids: torch.Tensor, k: int, keys: Keys,
               floor: torch.Tensor | None = None) -> torch.Tensor:
    """Keys of the exact top ``k`` of ``c`` (int32 [C, d], corpus ids ``ids``) for each row of ``q``
    (int32 [A, d]): [A, k], best first, -1 where fewer. ``floor``: each row's exact k-th score so
    far (earlier tiles; -inf: fewer than k yet): only candidates that can reach it count. Memory
    O(A x C)."""
    n, kk = q.shape[0], min(k, c.shape[0])
    out = torch.full((n, k), -1, dtype=torch.int64, device=q.device)
    if not n or not kk:
        return out
    unit, err = 2.0 ** -keys.scale_bits, float32_error(q.shape[1])
    with torch.autocast(q.device.type, enabled=False), full_float32():
        s = (q.float() * unit) @ (c.float() * unit).T  # exact inputs: only the sum rounds
    # a candidate of the exact top-k scores (in float32) within 2 x the error of the tile's kk-th,
    # and within the error of the exact k-th found so far (1e-6: the bound's own rounding)
    need = floor[:, None] - 1.5 * err - 1e-6 if floor is not None else None
    if need is None or not torch.isfinite(need).all():
        tile = (torch.topk(s, kk, dim=1).values[:, -1:] - 2.5 * err).double()
        need = tile if need is None else torch.maximum(need, tile)
    rows, cols = torch.nonzero(s >= need.float(), as_tuple=True)
    del s
    if len(rows) > 4 * n * kk:  # near-ties everywhere (an untrained model): the whole tile exactly
        with torch.autocast(q.device.type, enabled=False):
            exact = (q.double() @ c.double().T).long()  # integer products and sums below 2**53: exact
        out[:, :kk] = torch.topk(keys.encode(exact, ids[None, :]), kk, dim=1).values
        return out
    if not len(rows):
        return out
    key = torch.cat([keys.encode(keys.exact(q[rows[i:i + RESCORE]], c[cols[i:i + RESCORE]]), ids[cols[i:i + RESCORE]])
                     for i in range(0, len(rows), RESCORE)])
    counts = torch.bincount(rows, minlength=n)
    start = torch.cumsum(counts, 0) - counts
    dense = torch.full((n, int(counts.max())), -1, dtype=torch.int64, device=q.device)
    dense[rows, torch.arange(len(rows), device=q.device) - start[rows]] = key
    width = min(kk, dense.shape[1])
    out[:, :width] = torch.topk(dense, width, dim=1).values
    return out


def merge(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """The best ``k`` of two key lists per row (exact: keys are unique per candidate)."""
    return torch.topk(torch.cat([a, b], 1), k, dim=1).values


def top_k(q: torch.Tensor, c: torch.Tensor, ids: torch.Tensor, k: int, keys: Keys, chunk: int = 8192) -> torch.Tensor:
    """``tile_top_k`` over a corpus of any size, in tiles of TILE_ROWS x ``chunk``."""
    best = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=q.device)
    for a in range(0, q.shape[0], TILE_ROWS):
        rows = slice(a, a + TILE_ROWS)
        for s in range(0, c.shape[0], chunk):
            found = tile_top_k(q[rows], c[s:s + chunk], ids[s:s + chunk], k, keys, keys.scores(best[rows, -1]))
            best[rows] = merge(best[rows], found, k)
    return best


@dataclass(frozen=True)
class Grid:
    """``n`` texts, longest first, cut into chunks of ``chunk`` dealt to ranks (chunk c: rank c % world)."""

    order: np.ndarray  # text ids, longest first (stable)
    chunk: int
    world: int

    @staticmethod
    def for_texts(texts: list[str], chunk: int, world: int) -> "Grid":
        return Grid(np.argsort([-len(t) for t in texts], kind="stable"), chunk, world)

    @property
    def chunks(self) -> int:
        return math.ceil(len(self.order) / self.chunk)

    def members(self, c: int) -> np.ndarray:
        return self.order[c * self.chunk:(c + 1) * self.chunk]

    def owner(self, c: int) -> int:
        return c % self.world

    def owned(self, rank: int) -> list[int]:
        return list(range(rank, self.chunks, self.world))


def embed_owned(texts: list[str], grid: Grid, rank: int, embed: Callable[[list[str]], torch.Tensor], batch: int,
                keys: Keys, lockstep: bool = False, after_round: Callable[[], bool] | None = None):
    """This rank's chunks embedded: {chunk: int32 [len, d]} (or None if ``after_round``, called by
    every rank after each round of ``world`` chunks, says stop). ``lockstep`` (ZeRO-3, whose
    forwards gather weights from every rank): in each round every rank runs as many forwards as
    the rank with the most batches in it (extra ones embed one text and drop it)."""
    out: dict[int, torch.Tensor] = {}

    def batches(c: int) -> int:
        return math.ceil(len(grid.members(c)) / batch) if c < grid.chunks else 0

    for r in range(math.ceil(grid.chunks / grid.world)):
        c = r * grid.world + rank
        if c < grid.chunks:
            idx = grid.members(c)
            out[c] = torch.cat([keys.quantize(embed([texts[i] for i in idx[b:b + batch]]))
                                for b in range(0, len(idx), batch)])
        if lockstep:
            for _ in range(max(batches(r * grid.world + q) for q in range(grid.world)) - batches(c)):
                embed([texts[grid.order[-1]]])
        if after_round is not None and after_round():
            return None
    return out


def search_split(anchors: dict, agrid: Grid, corpus: dict, cgrid: Grid, dim: int, k: int, keys: Keys, state,
                 pairs_of: Callable[[int], tuple[np.ndarray, np.ndarray]],
                 after_chunk: Callable[[], bool] | None = None, group=None) -> dict | None:
    """Every rank calls it with its own chunks (``embed_owned``). Returns, for each anchor chunk
    this rank owns, (keys [len, k] of its anchors' exact top k, scores [m] of its rows' positives):
    ``pairs_of(chunk)`` names the rows by (position of their anchor in the chunk, corpus id of
    their positive); the rank holding a positive scores it. None if ``after_chunk`` (called by
    every rank after each anchor chunk) says stop. ``group``: the process group (default: the
    world; its ranks must be the global ranks 0..world-1)."""
    import torch.distributed as dist

    dev, rank, world = state.device, state.rank, state.world_size
    held = sorted(corpus)
    store = torch.cat([corpus[c].to(dev) for c in held]) if held else torch.zeros((0, dim), dtype=torch.int32,
                                                                                    device=dev)
    ids_np = np.concatenate([cgrid.members(c) for c in held]).astype(np.int64) if held else np.zeros(0, np.int64)
    ids = torch.from_numpy(ids_np).to(dev)
    where = np.full(len(cgrid.order), -1, dtype=np.int64)
    where[ids_np] = np.arange(len(ids_np))
    lowest = torch.iinfo(torch.int64).min
    out = {}
    for a in range(agrid.chunks):
        owner, n = agrid.owner(a), len(agrid.members(a))
        block = anchors[a].to(dev) if owner == rank else torch.empty((n, dim), dtype=torch.int32, device=dev)
        if state.enabled:
            dist.broadcast(block, src=owner, group=group)
        part = top_k(block, store, ids, k, keys, chunk=cgrid.chunk)
        at, positive = pairs_of(a)
        here = where[positive]
        scores = torch.full((len(positive),), lowest, dtype=torch.int64, device=dev)
        mine = torch.from_numpy(np.nonzero(here >= 0)[0]).to(dev)
        if len(mine):
            scores[mine] = keys.exact(block[torch.from_numpy(at).to(dev)[mine]],
                                      store[torch.from_numpy(here).to(dev)[mine]])
        parts = [part]
        if state.enabled:
            parts = [torch.empty_like(part) for _ in range(world)] if rank == owner else None
            dist.gather(part, parts, dst=owner, group=group)
            dist.reduce(scores, dst=owner, op=dist.ReduceOp.MAX, group=group)
        if rank == owner:
            merged = parts[0]
            for p in parts[1:]:
                merged = merge(merged, p, k)
            out[a] = (merged.cpu(), scores.cpu())
        if after_chunk is not None and after_chunk():
            return None
    return out
