"""Retrieval: a corpus embedded across ranks, exact top-k by chunked matrix products, and the
information-retrieval metrics (sentence-transformers' InformationRetrievalEvaluator definitions).

Used by evaluation during training (``eval.retrieval``) and by ``dist-embed mine``. Exact search:
a corpus that fits in memory as float32 embeddings (1M x 384 = 1.5 GB) is searched in chunks
faster than an ANN index is built, and exact top-k makes mining reproducible across world sizes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..data.readers import Source
from ..data.records import DataError

log = logging.getLogger(__name__)

PRIMARY_RETRIEVAL = "ndcg@10"
ACCURACY_AT, PRECISION_RECALL_AT, MRR_AT, NDCG_AT, MAP_AT = (1, 3, 5, 10), (1, 3, 5, 10, 100), (10,), (10,), (100,)


@dataclass(frozen=True)
class RetrievalData:
    name: str
    queries: dict[str, str]  # query id -> text
    corpus: dict[str, str]  # document id -> text
    relevant: dict[str, set[str]]  # query id -> relevant document ids


def _records(ref, what: str) -> list[tuple[str, dict]]:
    path, subset, split = (ref, None, "train") if isinstance(ref, str) else (ref.path, ref.subset, ref.split)
    out = []
    for rec in Source(path, subset=subset, split=split, streaming=False).records():
        if isinstance(rec.fields, DataError):
            raise rec.fields
        out.append((rec.where, rec.fields))
    if not out:
        raise DataError(f"{path}: the retrieval {what} file has no rows")
    return out


def _field(where: str, obj: dict, names: tuple[str, ...], what: str) -> str:
    for n in names:
        if n in obj and obj[n] is not None and str(obj[n]).strip():
            return str(obj[n])
    raise DataError(f"{where}: missing or empty column {names[0]!r} ({what}); the row has "
                    f"{', '.join(map(repr, obj)) or 'no columns'}")


def load_retrieval(name: str, queries, corpus, qrels) -> RetrievalData:
    """BEIR layout: queries and corpus rows ``_id`` (or ``id``) + ``text`` (a corpus ``title`` is put
    in front, as BEIR evaluations do); qrels rows ``query-id``, ``corpus-id``, ``score`` (> 0 counts).
    Each of the three is a file (jsonl, tsv, csv, parquet) or a Hugging Face dataset reference."""
    q = {}
    for where, obj in _records(queries, "queries"):
        qid = _field(where, obj, ("_id", "id", "query-id"), "query id")
        q[qid] = _field(where, obj, ("text", "query"), "query text")
    c = {}
    for where, obj in _records(corpus, "corpus"):
        text = _field(where, obj, ("text", "document"), "document text")
        title = str(obj.get("title") or "").strip()
        c[_field(where, obj, ("_id", "id", "corpus-id"), "document id")] = f"{title} {text}" if title else text
    rel: dict[str, set[str]] = {}
    for where, obj in _records(qrels, "qrels"):
        qid = _field(where, obj, ("query-id", "query_id", "qid"), "query id")
        did = _field(where, obj, ("corpus-id", "corpus_id", "doc_id", "docid"), "document id")
        try:
            score = float(obj.get("score", 1))
        except (TypeError, ValueError):
            raise DataError(f"{where}: column 'score': not a number: {obj.get('score')!r}") from None
        if did not in c:
            raise DataError(f"{where}: corpus-id {did!r} is not in the corpus")
        if score > 0:
            rel.setdefault(qid, set()).add(did)
    judged = [qid for qid in q if rel.get(qid)]
    if not judged:
        raise DataError(f"{name}: no query has a relevant document in the qrels")
    return RetrievalData(name, q, c, rel)


def embed_sharded(encoder, texts: list[str], state, batch_size: int, *, prompt_name: str | None = None,
                  everywhere: bool = False, lockstep: bool = False) -> np.ndarray | None:
    """Embeddings of ``texts`` (float32, input order). The encoding batches (of the length-sorted
    texts, as ``encode`` forms them) are dealt to the ranks in turn and the parts gathered: every
    text is embedded in the same batch at any world size, so the result is the same to the bit.
    It is on rank 0 (on every rank with ``everywhere``), None elsewhere. ``lockstep`` (ZeRO-3,
    where each forward gathers the weights from all ranks): every rank runs as many forwards, a
    rank whose batches ran out embeds one text and drops it."""
    import torch.distributed as dist

    if not state.enabled:
        return encoder.encode(texts, batch_size=batch_size, prompt_name=prompt_name)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    batches_here = batches[state.rank::state.world_size]
    rounds = math.ceil(len(batches) / state.world_size) if lockstep else len(batches_here)
    mine = []
    for r in range(rounds):
        if r < len(batches_here):
            idx = batches_here[r]
            mine.append((idx, encoder.encode([texts[i] for i in idx], batch_size=batch_size, prompt_name=prompt_name)))
        else:
            encoder.encode([texts[order[-1]]], batch_size=batch_size, prompt_name=prompt_name)
    parts: list = [None] * state.world_size
    if everywhere:
        dist.all_gather_object(parts, mine)
    else:
        dist.gather_object(mine, parts if state.is_main else None, dst=0)
        if not state.is_main:
            return None
    dim = next((emb.shape[1] for part in parts for _, emb in part), 0)
    out = np.empty((len(texts), dim), dtype=np.float32)
    for part in parts:
        for idx, emb in part:
            out[idx] = emb
    return out


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int, chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` corpus rows per query by cosine similarity: (scores, indices), best first.
    The corpus is scored in chunks so memory stays queries x chunk; ties go to the lower index."""
    q = torch.nn.functional.normalize(torch.from_numpy(queries).float(), dim=-1)
    k = min(k, len(corpus))
    best_s = torch.full((len(q), 0), -math.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    for start in range(0, len(corpus), chunk):
        c = torch.nn.functional.normalize(torch.from_numpy(corpus[start:start + chunk]).float(), dim=-1)
        s = q @ c.T
        idx = torch.arange(start, start + len(c)).expand(len(q), -1)
        s, idx = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
        # stable ordering: by score, then by index (sorting is deterministic where topk is not)
        order = torch.argsort(idx, dim=1, stable=True)
        s, idx = s.gather(1, order), idx.gather(1, order)
        top = torch.argsort(-s, dim=1, stable=True)[:, :k]
        best_s, best_i = s.gather(1, top), idx.gather(1, top)
    return best_s.numpy(), best_i.numpy()


def ir_metrics(ranked: list[list[str]], relevant: list[set[str]]) -> dict[str, float]:
    """accuracy/precision/recall@k, MRR@10, NDCG@10 (binary relevance), MAP@100: the means over
    queries, with sentence-transformers' definitions."""
    out: dict[str, list[float]] = {}

    def add(key, value):
        out.setdefault(key, []).append(value)

    for hits, rel in zip(ranked, relevant):
        flags = [h in rel for h in hits]
        for k in ACCURACY_AT:
            add(f"accuracy@{k}", float(any(flags[:k])))
        for k in PRECISION_RECALL_AT:
            n = sum(flags[:k])
            add(f"precision@{k}", n / k)
            add(f"recall@{k}", n / len(rel))
        for k in MRR_AT:
            add(f"mrr@{k}", next((1.0 / (i + 1) for i, f in enumerate(flags[:k]) if f), 0.0))
        for k in NDCG_AT:
            dcg = sum(1.0 / math.log2(i + 2) for i, f in enumerate(flags[:k]) if f)
            ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(rel), k)))
            add(f"ndcg@{k}", dcg / ideal)
        for k in MAP_AT:
            found, total = 0, 0.0
            for i, f in enumerate(flags[:k]):
                if f:
                    found += 1
                    total += found / (i + 1)
            add(f"map@{k}", total / min(k, len(rel)))
    return {key: float(np.mean(v)) for key, v in out.items()}


def evaluate_retrieval(encoder, data: RetrievalData, state, batch_size: int = 64,
                       lockstep: bool = False) -> dict[str, float] | None:
    """Metrics on rank 0 (None elsewhere). Every rank must call it: queries and corpus are
    embedded in slices across ranks (``embed_sharded``)."""
    doc_ids = list(data.corpus)
    corpus = embed_sharded(encoder, [data.corpus[d] for d in doc_ids], state, batch_size,
                           prompt_name="document", lockstep=lockstep)
    qids = [q for q in data.queries if data.relevant.get(q)]
    queries = embed_sharded(encoder, [data.queries[q] for q in qids], state, batch_size, prompt_name="query",
                            lockstep=lockstep)
    if not state.is_main:
        return None
    k = max(ACCURACY_AT + PRECISION_RECALL_AT + MRR_AT + NDCG_AT + MAP_AT)
    _, idx = top_k(queries, corpus, k)
    ranked = [[doc_ids[i] for i in row] for row in idx]
    return ir_metrics(ranked, [data.relevant[q] for q in qids])
