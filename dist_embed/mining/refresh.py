"""Hard negatives re-mined during training with the current weights (``data.hard_negatives``).

At the start (for data sets without negative columns) and every ``every_steps`` optimizer steps,
all ranks together: embed their chunks of each data set's corpus and anchors in eval mode, under
the run's precision and layout (under ZeRO-3 in lockstep), find every anchor's exact top
candidates (search.py: the same at any world size), choose each row's negatives with the
false-negative filters (filters.py) and share them; rank 0 writes them to the run directory
(tables.py) and every rank's planners use them from the next batch on. The loop (engine/loop.py)
calls ``due`` and ``refresh`` and reopens its batches; checkpoints record ``pos.negatives``.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data.loader import collate
from ..data.rows import Row
from .corpus import Index, read_corpus
from .filters import MineOptions, _mix, choose_ids, fill_at_random
from .search import Grid, Keys, embed_owned, search_split
from .tables import Renewal, prune, read_refresh, write_refresh

log = logging.getLogger("dist_embed.train")


def _to_device(layout, device):
    return type(layout)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(layout).items()})


def batch_embedder(run, encoder):
    """A function embedding a list of texts as one training batch's column is embedded: the run's
    layout (packed rows, unpadded) and precision, no gradient; float32 [n, d] on the device."""
    device, tok, length = run.state.device, run.encoder.tokenizer, run.encoder.max_seq_length
    spec = run.data.layout if run.data.layout is not None and run.data.layout.kind != "padded" else None

    def embed(texts: list[str]) -> torch.Tensor:
        batch = collate([Row(i, (t,), None) for i, t in enumerate(texts)], tok, length, spec)
        with torch.no_grad(), run.embedder.autocast():
            if batch.layout is not None:
                out = encoder(_to_device(batch.layout, device))
            else:
                out = encoder({k: v.to(device) for k, v in batch.features[0].items()})
        return out[:len(texts)].float()

    return embed


class Refresher:
    """The refreshes of one run: each data set's index, the current negatives, the costs so far."""

    def __init__(self, cfg, indexes: list[Index | None], prompts: list[tuple[str, str, str]], out: Path, seed: int):
        self.cfg, self.indexes, self.prompts, self.out, self.seed = cfg, indexes, prompts, out, seed
        self.opt = MineOptions(num_negatives=cfg.num_negatives, range_min=cfg.range_min, range_max=cfg.range_max,
                               max_score=cfg.max_score, min_score=cfg.min_score,
                               absolute_margin=cfg.absolute_margin, relative_margin=cfg.relative_margin)
        self.renewals: list[Renewal | None] = [None] * len(indexes)
        self.seconds = 0.0
        self.t0 = time.perf_counter()

    @classmethod
    def for_run(cls, cfg, plan, out: Path) -> "Refresher":
        """Every rank reads the chosen data sets' rows once (ConfigError for unusable data)."""
        hn = cfg.data.hard_negatives
        chosen = {d.name for d in hn.chosen(cfg.datasets)}
        t0 = time.perf_counter()
        try:
            extra = read_corpus(hn.corpus) if hn.corpus else []
            indexes = [Index.read(name, spec, extra) if name in chosen else None
                       for name, spec in zip(plan.names, plan.specs)]
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.hard_negatives: {e}") from None
        for ix in indexes:
            if ix is not None and len(ix.corpus) < hn.num_negatives + ix.most_excluded:
                raise ConfigError(f"data.hard_negatives: data set {ix.name!r} has {len(ix.corpus)} candidate texts, "
                                  f"too few for {hn.num_negatives} negatives beside an anchor's positives")
        prompts = []
        for ds in cfg.datasets:
            p = dict(ds.prompts)
            prompts.append((hn.prompts.anchor if hn.prompts.anchor is not None else p.get("anchor", ""),
                            hn.prompts.corpus if hn.prompts.corpus is not None else p.get("positive", ""),
                            p.get("negative", "")))
        log.info("hard negatives: %s read in %.1fs (refreshed %s)", ", ".join(
            f"{ix.name}: {len(ix.row_ids)} rows, {len(ix.anchors)} anchors, {len(ix.corpus)} candidate texts"
            for ix in indexes if ix), time.perf_counter() - t0,
            f"every {hn.every_steps} steps" if hn.every_steps else "once, at the start")
        return cls(hn, indexes, prompts, out, cfg.training.seed)

    # -- when, and what the planners apply --------------------------------------------------------

    def due(self, pos) -> bool:
        """At the start for data sets that have no negatives; then every ``every_steps`` steps (a
        refresh cut short by a stop signal is due again when the run resumes at that step)."""
        if any(ix is not None and not ix.has_negatives and r is None for ix, r in zip(self.indexes, self.renewals)):
            return True
        every = self.cfg.every_steps
        return bool(every) and pos.step > 0 and pos.step % every == 0 and pos.negatives.get("step") != pos.step

    def planner_renewals(self) -> tuple | None:
        return tuple(self.renewals) if any(self.renewals) else None

    def progress(self) -> dict:
        return {"refresh": f"{self.seconds / max(time.perf_counter() - self.t0, 1e-9):.1%}"}

    def restore(self, pos, run_dir: Path | None, allow_change: bool, state) -> None:
        """The negatives a checkpoint's rows used (``pos.negatives``), from the directory of the run
        that wrote it (copied into this run's, which its checkpoints will name); a refresh whose
        texts or filters differ from this run's is refused (or, with ``allow_change``, mined again
        now)."""
        from ..distributed import barrier

        tables_of = pos.negatives.get("tables") or {}
        run_dir = run_dir or self.out
        if state.is_main and run_dir.resolve() != self.out.resolve():
            for rel in set(tables_of.values()):
                if (run_dir / rel).is_dir() and not (self.out / rel).exists():
                    shutil.copytree(run_dir / rel, self.out / rel)
        barrier(state)
        for name, rel in tables_of.items():
            d = self._position(name)
            problem = None
            try:
                meta, tables = read_refresh(self.out / rel)
                info = meta["datasets"][name]
                if d is None or info["index"] != self.indexes[d].fingerprint:
                    problem = "its texts or rows differ from this run's data"
                elif info["options"] != self._options():
                    problem = f"its options {info['options']} differ from this run's {self._options()}"
            except (ValueError, KeyError) as e:
                problem = str(e)
            if problem is None:
                self.renewals[d] = Renewal(tables[name], self.indexes[d].corpus, self.prompts[d][2])
                continue
            if not allow_change:
                raise ConfigError(f"--resume: hard negatives {rel} for data set {name!r}: {problem}; pass "
                                  "--allow-data-change to mine them again")
            log.warning("--allow-data-change: hard negatives %s for %s: %s; mining them again now", rel, name, problem)
            pos.negatives = {}
            self.renewals = [None] * len(self.indexes)
            return

    def _position(self, name: str) -> int | None:
        return next((i for i, ix in enumerate(self.indexes) if ix is not None and ix.name == name), None)

    def _options(self) -> dict:
        o = self.opt
        return {"num_negatives": o.num_negatives, "range_min": o.range_min, "range_max": o.range_max,
                "max_score": o.max_score, "min_score": o.min_score, "absolute_margin": o.absolute_margin,
                "relative_margin": o.relative_margin, "prompts": [list(p[:2]) for p in self.prompts],
                "seed": self.seed}

    # -- the refresh ------------------------------------------------------------------------------

    def refresh(self, run, stop) -> bool:
        """Every rank calls it (at the same step). Returns False, changing nothing, if ``stop`` (a
        collective check of stop signals, called between chunks) cut it short: the checkpoint then
        keeps the previous negatives and a resumed run mines again at this step."""
        from ..distributed import all_reduce_sum, barrier
        from ..outputs.tracking import peak_memory, rss_mib

        state, pos = run.state, run.pos
        every = self.cfg.every_steps
        periodic = bool(every) and pos.step > 0 and pos.step % every == 0
        todo = [d for d, ix in enumerate(self.indexes)
                if ix is not None and (periodic or (not ix.has_negatives and self.renewals[d] is None))]
        log.info("hard negatives: mining for %s at step %d with the current weights",
                 ", ".join(self.indexes[d].name for d in todo), pos.step)
        rss_before = all_reduce_sum([rss_mib()], state, op=torch.distributed.ReduceOp.MAX)[0]
        t0 = time.perf_counter()
        times = {"embed": 0.0, "search": 0.0, "choose": 0.0}
        tables, stats = {}, {"texts_embedded": 0, "rows": 0, "filled_rows": 0}
        with run.backend.evaluating() as encoder:
            encoder.eval()
            try:
                embed = batch_embedder(run, encoder)
                for d in todo:
                    table = self._mine(d, embed, run, stop, times, stats)
                    if table is None:
                        log.warning("hard-negative refresh at step %d stopped by a signal: the run keeps its "
                                    "previous negatives and mines again when it resumes", pos.step)
                        return False
                    tables[d] = table
            finally:
                run.encoder.train()
        t_write = time.perf_counter()
        meta = {"datasets": {self.indexes[d].name: {"index": self.indexes[d].fingerprint, "options": self._options()}
                             for d in tables}}
        named = {self.indexes[d].name: t for d, t in tables.items()}
        if state.is_main:
            write_refresh(self.out, pos.step, named, meta)
        barrier(state)  # every rank's next checkpoint may name it
        rel = f"negatives/step-{pos.step:08d}"
        for d, table in tables.items():
            self.renewals[d] = Renewal(table, self.indexes[d].corpus, self.prompts[d][2])
        pos.negatives = {"step": pos.step, "tables": {**(pos.negatives.get("tables") or {}),
                                                      **{name: rel for name in named}}}
        if state.is_main:
            prune(self.out, set(pos.negatives["tables"].values()))
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        share = self.seconds / max(time.perf_counter() - self.t0, 1e-9)
        rec = {"step": pos.step, "refresh/seconds": seconds, "refresh/embed_seconds": times["embed"],
               "refresh/search_seconds": times["search"], "refresh/choose_seconds": times["choose"],
               "refresh/write_seconds": time.perf_counter() - t_write, "refresh/share_of_run": share,
               "refresh/total_seconds": self.seconds, **{f"refresh/{k}": v for k, v in stats.items()},
               "refresh/rss_before_mib": round(rss_before, 1),
               **{f"refresh/{k.split('/')[1]}": v for k, v in peak_memory(state).items()}}
        run.outputs.metrics.write(rec)
        log.info("hard negatives mined at step %d for %s in %.1fs (embed %.1fs: %d texts, search %.1fs, choose %.1fs)"
                 "; %d of %d rows topped up at random (fewer candidates passed the filters); refreshes: %.1f%% of "
                 "the run so far -> %s", pos.step, ", ".join(named), seconds, times["embed"], stats["texts_embedded"],
                 times["search"], times["choose"], stats["filled_rows"], stats["rows"], 100 * share, rel)
        return True

    def _mine(self, d: int, embed, run, stop, times: dict, stats: dict) -> np.ndarray | None:
        """One data set's table (int32 [max row id + 1, k]) on every rank, or None if stopped."""
        ix, (a_prompt, c_prompt, _), hn, state = self.indexes[d], self.prompts[d], self.cfg, run.state
        keys = Keys.for_corpus(len(ix.corpus))
        corpus_texts = [c_prompt + t for t in ix.corpus] if c_prompt else ix.corpus
        anchor_texts = [a_prompt + t for t in ix.anchors] if a_prompt else ix.anchors
        cgrid = Grid.for_texts(corpus_texts, hn.chunk_size, state.world_size)
        agrid = Grid.for_texts(anchor_texts, hn.chunk_size, state.world_size)
        lockstep = run.backend.collective_eval
        t = time.perf_counter()
        corpus = embed_owned(corpus_texts, cgrid, state.rank, embed, hn.batch_size, keys, lockstep, stop)
        if corpus is None:
            return None
        anchors = embed_owned(anchor_texts, agrid, state.rank, embed, hn.batch_size, keys, lockstep, stop)
        if anchors is None:
            return None
        times["embed"] += time.perf_counter() - t
        stats["texts_embedded"] += len(corpus_texts) + len(anchor_texts)
        t = time.perf_counter()
        k = min(self.opt.range_max + ix.most_excluded, len(ix.corpus))

        def pairs_of(a: int):
            rows, at = ix.rows_of(agrid.members(a))
            return at, ix.row_positive[rows]

        found = search_split(anchors, agrid, corpus, cgrid, run.encoder.dim, k, keys, state, pairs_of, stop)
        if found is None:
            return None
        times["search"] += time.perf_counter() - t
        t = time.perf_counter()
        ids, chosen, filled = [], [], 0
        base = _mix(self.seed * 1_000_003 + run.pos.step * 7919 + d) % (1 << 40)
        unit = float(1 << (2 * keys.scale_bits))
        for a, (top, positive) in found.items():
            members = agrid.members(a)
            rows, at = ix.rows_of(members)
            scores, cand = keys.decode(top[torch.from_numpy(at)])
            excluded = ix.excluded_of(members)[at]
            neg = choose_ids(scores, cand, positive.numpy() / unit, excluded, self.opt)
            filled += fill_at_random(neg, excluded, len(ix.corpus), ix.row_ids[rows] + base)
            ids.append(ix.row_ids[rows])
            chosen.append(neg)
        parts = _gather(state, (np.concatenate(ids) if ids else np.zeros(0, np.int64),
                                np.concatenate(chosen) if chosen else np.zeros((0, self.opt.num_negatives), np.int64),
                                filled))
        table = np.full((int(ix.row_ids.max()) + 1, self.opt.num_negatives), -1, dtype=np.int32)
        for row_ids, negs, _ in parts:
            table[row_ids] = negs
        stats["rows"] += len(ix.row_ids)
        stats["filled_rows"] += sum(p[2] for p in parts)
        times["choose"] += time.perf_counter() - t
        return table


def _gather(state, obj) -> list:
    """Every rank's ``obj``, on every rank, over the host (gloo) group."""
    if not state.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * state.world_size
    dist.all_gather_object(out, obj, group=state.control)
    return out
