"""A run's evaluation: its STS and retrieval sets, embedded across ranks, scored on rank 0."""
from __future__ import annotations

from dataclasses import dataclass

from .retrieval import PRIMARY_RETRIEVAL, RetrievalData, embed_sharded, evaluate_retrieval, load_retrieval
from .sts import PRIMARY, StsData, load_sts, sts_metrics

PRIMARY_KEYS = (PRIMARY, PRIMARY_RETRIEVAL)  # the metrics the logs and the summary lead with


@dataclass(frozen=True)
class Evaluator:
    sts: tuple[StsData, ...] = ()  # loaded on every rank: each embeds a share of the texts
    retrieval: tuple[RetrievalData, ...] = ()
    batch_size: int = 64
    dims: tuple[int, ...] = ()  # Matryoshka dimensions narrower than the model, scored apart (STS)

    @classmethod
    def from_config(cls, eval_cfg, dims=()) -> "Evaluator":
        return cls(tuple(load_sts(s.path, s.name, split=s.split, subset=s.subset, columns=s.columns)
                         for s in eval_cfg.sts),
                   tuple(load_retrieval(s.name, s.queries, s.corpus, s.qrels) for s in eval_cfg.retrieval),
                   eval_cfg.batch_size, tuple(dims))

    def __bool__(self) -> bool:
        return bool(self.sts or self.retrieval)

    def evaluate(self, encoder, state, lockstep: bool) -> dict[str, float]:
        """``eval/<set>/<metric>`` for every set (rank 0; other ranks get {} after doing their share).
        ``lockstep``: every rank runs the same forwards (ZeRO-3 gathers weights in each)."""
        results: dict[str, float] = {}
        for data in self.retrieval:
            m = evaluate_retrieval(encoder, data, state, self.batch_size, lockstep=lockstep)
            results.update({f"eval/{data.name}/{k}": v for k, v in (m or {}).items()})
        for data in self.sts:
            emb = embed_sharded(encoder, data.sentences1 + data.sentences2, state, self.batch_size, lockstep=lockstep)
            for name, m in (sts_metrics(emb, data, self.dims) if emb is not None else {}).items():
                results.update({f"eval/{name}/{k}": v for k, v in m.items()})
        return results
