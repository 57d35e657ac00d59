"""From global batch plans to tokenized per-rank batches, in a torch DataLoader.

The plan is made once per rank, in the training process (``EpochPlanner``: reading, shuffling and
de-duplicating cost far less per row than tokenizing); the DataLoader's sampler hands each batch's rows
for this rank to the ``num_workers`` worker processes, which only tokenize. Results come back in
plan order, each with the planner state right after its batch, so a checkpoint at any step knows
exactly where the data stands without replaying anything. Workers send numpy arrays (pickled as
plain bytes), not tensors: torch ships each tensor through its own shared-memory file, which for
our small batches cost the main process more than the tokenizing.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .batch import Batch, map_arrays
from .layout import LayoutSpec
from .layout import build as build_layout
from .batching import EpochPlanner, balanced_order, rank_slice, split_sizes
from .mixing import MixPlanner, round_robin_rows, sampler_shares
from .readers import Source
from .rows import Row, Schema, first_keys, resolve_columns, validate_rows, with_prompts
from .shards import shard_blocks, shard_urls
from .tokenization import features_from_ids, tokenize_columns


@dataclass(frozen=True)
class PlanSpec:
    """Everything that decides the sequence of global batches (identical on every rank)."""

    source: Source
    schema: Schema
    columns: dict
    on_error: str
    seed: int
    global_batch: int
    shuffle: bool
    shuffle_buffer: int
    no_duplicates: bool
    dedup_buffer: int | None
    prompts: tuple = ()  # (column, prefix) pairs: e.g. ("anchor", "query: ")
    plane: str = "global"  # "global": every rank plans every row; "sharded": each its share (data/sharded.py)

    def rows(self, position: dict | None = None) -> "RowStream":
        return RowStream(self, position)

    def planner(self, epoch: int, state: dict | None = None, salt: int = 0, sharding=None, index: int = 0,
                renew=None):
        """The epoch's planner, from its start or from a saved ``state`` (its ``state_dict``);
        ``salt`` varies the shuffle (a dataset's later passes in a mix). The sharded plane needs the
        run's ``sharding`` (pieces, exchange) and this data set's ``index`` in it. ``renew``: the
        negative columns of the last hard-negative refresh (mining/tables.py), None: the data's."""
        if self.plane == "sharded":
            from .sharded import sharded_planner

            return sharded_planner(self, sharding, index, epoch, state, salt, _row_from_json, renew)
        return EpochPlanner(self.rows, epoch=epoch, seed=self.seed + salt, shuffle=self.shuffle,
                            shuffle_buffer=self.shuffle_buffer, no_duplicates=self.no_duplicates,
                            dedup_buffer=self.dedup_buffer, global_batch=self.global_batch,
                            make_row=_row_from_json, state=state, renew=renew)

    def batches(self, epoch: int = 0, global_batch: int | None = None) -> Iterator[list[Row]]:
        """Every global batch of an epoch from its start (tests, benchmarks, the model card)."""
        planner = self.planner(epoch)
        while (batch := planner.next_batch(global_batch or self.global_batch)) is not None:
            yield batch

    def fingerprint(self) -> dict:
        """What a saved planner state is only valid for (a resume checks it)."""
        return {"source": self.source.fingerprint(), "columns": dict(self.columns), "on_error": self.on_error,
                "seed": self.seed, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "no_duplicates": self.no_duplicates, "dedup_buffer": self.dedup_buffer,
                "schema": [list(self.schema.texts), self.schema.optional_prefix, self.schema.score],
                "prompts": [list(p) for p in self.prompts], "plane": self.plane}


@dataclass(frozen=True)
class MixSpec:
    """The datasets of a run and how batches are drawn from them (``mixing.MixPlanner``); a run
    with one dataset is a mix of one (its batches are that dataset's planner's, unchanged)."""

    names: tuple[str, ...]
    specs: tuple[PlanSpec, ...]
    sampler: str = "proportional"
    temperature: float = 1.0
    weights: tuple[float, ...] | None = None
    seed: int = 0

    def shares(self, sizes) -> list[float] | None:
        return sampler_shares(self.sampler, sizes, self.temperature, self.weights)

    def planner(self, epoch: int, state: dict | None = None, sizes=None, sharding=None, renew=None) -> MixPlanner:
        """``renew``: per data set, the last hard-negative refresh's columns (None: the data's own)."""
        sizes = list(sizes) if sizes is not None else [None] * len(self.specs)
        renew = renew or [None] * len(self.specs)
        shares = None  # fixed draw probabilities: temperature (uniform while sizes are unknown), weighted
        if self.sampler in ("temperature", "weighted"):
            shares = self.shares(sizes) or [1.0] * len(self.specs)
        return MixPlanner(lambda i, passes, st: self.specs[i].planner(epoch, st, salt=7919 * i + 104_729 * passes,
                                                                      sharding=sharding, index=i, renew=renew[i]),
                          sizes, sampler=self.sampler, shares=shares, epoch=epoch, seed=self.seed, state=state)

    def epoch_rows(self, sizes, global_batch: int) -> int | None:
        """Rows of one epoch (for the schedule); None when a size is unknown."""
        if None in sizes:
            return None
        return round_robin_rows(sizes, global_batch) if self.sampler == "round_robin" else sum(sizes)

    def batches(self, epoch: int = 0, global_batch: int | None = None, sizes=None):
        """(dataset index, global batch) of an epoch from its start (tests, benchmarks)."""
        planner = self.planner(epoch, sizes=sizes)
        while (batch := planner.next_batch(global_batch or self.specs[0].global_batch)) is not None:
            yield planner.last_dataset, batch

    def fingerprint(self) -> dict:
        """Each ``PlanSpec.fingerprint`` key as a list over the datasets ("source": their files)."""
        per = [s.fingerprint() for s in self.specs]
        out = {k: [p[k] for p in per] for k in per[0]}
        out.update(names=list(self.names), sampler=self.sampler, temperature=self.temperature,
                   weights=list(self.weights) if self.weights else None)
        return out


def _row_from_json(r) -> Row:
    """A row of a saved planner state. Token ids are not saved (``json_without_ids`` writes them
    as null): the few batches a resumed run cuts from restored rows are tokenized from the text,
    which gives the same tensors."""
    return r if isinstance(r, Row) else Row(int(r[0]), tuple(r[1]), r[2])


def json_without_ids(obj) -> None:
    """``json.dumps(..., default=json_without_ids)``: a planner state with token ids as null."""
    if isinstance(obj, bytes):
        return None
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


class RowStream:
    """Validated rows from a reader position on; ``position`` is right after the last row returned."""

    def __init__(self, spec: PlanSpec, position: dict | None):
        self.records, self._at = None, None
        urls, man = shard_urls(spec.source.path) if spec.source.format == "wds" else ([], None)
        if man is not None:  # prepare-data shards: validated when written, rows built straight from blocks
            self._at = {k: v for k, v in (position or {}).items() if k != "file"}
            self._rows = _prepared_rows(spec, urls, man, dict(self._at), self._at)
        else:
            self.records = spec.source.records(position)
            keys = first_keys(spec.source) if position else None  # columns as resolved at the stream's start
            self._rows = validate_rows(self.records, spec.schema, spec.columns, spec.on_error, keys=keys)
        if spec.prompts:
            self._rows = with_prompts(self._rows, spec.schema, dict(spec.prompts))

    @property
    def position(self) -> dict:
        return self.records.position if self.records is not None else {"file": 0, **self._at}

    def __iter__(self):
        return self._rows

    def __next__(self) -> Row:
        return next(self._rows)


def _prepared_rows(spec: PlanSpec, urls: list[str], man: dict, start: dict, at: dict) -> Iterator[Row]:
    """Rows of prepare-data shards, built from each block's lists: no per-row validation (done
    when the shards were written; the manifest's column types were checked at start), no per-row
    dicts: faster than the general record path, which the planner needs for pre-tokenized
    shards (benchmarks/data_pipeline.py)."""
    src = spec.source
    text_cols, extra_cols, score_col = resolve_columns(spec.schema, spec.columns, man["columns"], src.path)
    cols = text_cols + extra_cols
    id_columns = man.get("text_columns") if src.token_ids and man.get("tokenizer") else None
    row_id, limit = start.get("row", 0), src.max_rows
    for _url, _key, names, rows, cuts, first in shard_blocks(urls, start, at, id_columns, man["shards"]):
        picks = [names.index(c) for c in cols]
        score = names.index(score_col) if score_col is not None else None
        id_cuts = [cuts[c] for c in cols] if cuts and all(c in cuts for c in cols) else None
        for i in range(first, len(rows)):
            if limit is not None and row_id >= limit:
                return
            r = rows[i]
            at["index"], at["row"] = i + 1, row_id + 1
            yield Row(row_id, tuple([r[x] for x in picks]), float(r[score]) if score is not None else None,
                      tuple([cut(i) for cut in id_cuts]) if id_cuts else None)
            row_id += 1


def collate(rows: Sequence[Row], tokenizer, max_length: int, layout: LayoutSpec | None = None, **about) -> Batch:
    """Rows -> a ``Batch``: each column padded, and laid out for the encoder as ``layout`` asks
    (``about``: its place in the global batch, see ``Batch``)."""
    n_cols = len(rows[0].texts) if rows else about.get("n_cols", 0)
    if rows and all(r.ids is not None for r in rows):  # pre-tokenized shards: only padding left
        feats = features_from_ids(tokenizer, [[r.ids[c] for r in rows] for c in range(n_cols)])
    else:
        columns = [[r.texts[c] for r in rows] for c in range(n_cols)]
        feats = tokenize_columns(tokenizer, columns, max_length) if rows else []
    scores = [r.score for r in rows]
    padded = int(sum(f["attention_mask"].numel() for f in feats))
    if layout is not None and feats:
        built = build_layout(feats, layout)
        about["layout"] = map_arrays(built, np.ndarray, torch.from_numpy)
        padded = int(built.input_ids.size) if built is not None else padded  # the cells the encoder runs
    about.setdefault("global_size", len(rows))
    about.setdefault("sizes", (len(rows),))
    about.setdefault("n_cols", n_cols)
    return Batch(features=feats, texts=[[r.texts[c] for r in rows] for c in range(n_cols)],
                 row_ids=torch.tensor([r.row_id for r in rows], dtype=torch.long),
                 scores=torch.tensor(scores, dtype=torch.float32) if rows and rows[0].score is not None else None,
                 real_tokens=int(sum(int(f["attention_mask"].sum()) for f in feats)),
                 padded_tokens=padded, **about)


class _Tokenize(Dataset):
    """Map-style dataset whose "index" is a planned batch: tokenizing and laying out run where it
    is fetched (a dataloader worker, or the training process without workers)."""

    def __init__(self, tokenizer, max_length: int, layout: LayoutSpec | None):
        self.tokenizer, self.max_length, self.layout = tokenizer, max_length, layout

    def __getitem__(self, item: dict) -> Batch:
        return collate(item["rows"], self.tokenizer, self.max_length, self.layout,
                       **{k: v for k, v in item.items() if k != "rows"})


class _PlanSampler(Sampler):
    """Walks the planner in the training process: yields this rank's rows of each global batch and
    keeps the planner state after it, keyed by batch number, until the batch is consumed."""

    def __init__(self, planner: EpochPlanner, global_batch: int, rank: int, world: int, balance: bool,
                 states: dict):
        self.planner, self.global_batch, self.rank, self.world = planner, global_batch, rank, world
        self.balance = balance and world > 1
        self.states = states

    def __iter__(self):
        while (gbatch := self.planner.next_batch(self.global_batch)) is not None:
            n = self.planner.batches_done
            self.states[n] = self.planner.state_dict()
            dataset = getattr(self.planner, "last_dataset", 0)
            if hasattr(gbatch, "sizes"):  # the sharded plane: this rank's own slice
                yield {"rows": list(gbatch), "index": n, "global_size": gbatch.global_size,
                       "sizes": tuple(gbatch.sizes), "n_cols": gbatch.width, "dataset": dataset}
                continue
            if self.balance:
                gbatch = [gbatch[j] for j in balanced_order([sum(map(len, r.texts)) for r in gbatch], self.world)]
            yield {"rows": list(rank_slice(gbatch, self.rank, self.world)), "index": n, "global_size": len(gbatch),
                   "sizes": tuple(split_sizes(len(gbatch), self.world)), "n_cols": len(gbatch[0].texts),
                   "dataset": dataset}


class RankLoader:
    """This rank's tokenized batches, epoch after epoch, each with the planner state after it.

    With ``num_workers``, one DataLoader for the whole run: its worker processes are forked once,
    from the thread that starts the first epoch (the training thread: forking from a helper thread
    is unsafe), and persist across epochs; each epoch hands its planner to the sampler. ``epoch``
    starts the epoch's iterator in the calling thread; its batches may then be pulled from another
    (``prefetch``). Without workers the batches are made where they are pulled, no DataLoader.
    ``balance``: the rows of each global batch are dealt out to ranks by text length first
    (``balanced_order``); which rank holds a row does not change the loss."""

    def __init__(self, tokenizer, max_length: int, global_batch: int, rank: int = 0, world: int = 1,
                 num_workers: int = 0, pin_memory: bool = False, balance: bool = False,
                 layout: LayoutSpec | None = None):
        self.tokenize = _Tokenize(tokenizer, max_length, layout)
        self.sampler = _PlanSampler(None, global_batch, rank, world, balance, {})
        self.pin_memory, self.loader = pin_memory, None
        if num_workers:
            # the collate function runs where the batch was made (a worker): tensors -> numpy, zero-copy;
            # our own generator: starting the loader must not draw from the global torch RNG (that
            # would shift every dropout mask after a resume)
            self.loader = DataLoader(self.tokenize, batch_size=None, sampler=self.sampler, num_workers=num_workers,
                                     collate_fn=partial(Batch.map_arrays, kind=torch.Tensor, fn=torch.Tensor.numpy),
                                     generator=torch.Generator().manual_seed(0), prefetch_factor=4,
                                     persistent_workers=True)

    def epoch(self, planner: EpochPlanner | MixPlanner) -> Iterator[tuple[Batch, dict]]:
        """The rest of ``planner``'s epoch; the loader's iterator (and at the first epoch its
        workers) starts now, in this thread."""
        states: dict[int, dict] = {}
        self.sampler.planner, self.sampler.states = planner, states
        if self.loader is None:
            return self._in_process(states)
        return self._from_workers(iter(self.loader), states)  # iter(): now, in this thread

    def _from_workers(self, items: Iterator[Batch], states: dict) -> Iterator[tuple[Batch, dict]]:
        to_tensor = (lambda a: torch.from_numpy(a).pin_memory()) if self.pin_memory else torch.from_numpy
        for item in items:
            yield item.map_arrays(np.ndarray, to_tensor), states.pop(item.index)

    def _in_process(self, states: dict) -> Iterator[tuple[Batch, dict]]:
        for plan in self.sampler:
            item = self.tokenize[plan]
            if self.pin_memory:
                item = item.map_arrays(torch.Tensor, torch.Tensor.pin_memory)
            yield item, states.pop(item.index)

    def close(self) -> None:
        """Stop the worker processes (they would otherwise live until the loader is collected)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
        self.loader = None


def rank_batches(planner: EpochPlanner | MixPlanner, global_batch: int, rank: int, world: int, tokenizer,
                 max_length: int, num_workers: int = 0, pin_memory: bool = False, balance: bool = False,
                 layout: LayoutSpec | None = None) -> Iterator[tuple[Batch, dict]]:
    """(this rank's tokenized batch, planner state after it) for the rest of one planner's epoch
    (a ``RankLoader`` of one epoch: tests, benchmarks)."""
    loader = RankLoader(tokenizer, max_length, global_batch, rank, world, num_workers, pin_memory, balance, layout)
    try:
        yield from loader.epoch(planner)
    finally:
        loader.close()


# batches made ahead in a background thread: planning the next global batch, receiving it from a
# loader worker and pinning it overlap with the step the training thread launches on the GPU
_END = object()


def prefetch(items: Iterator, depth: int = 2, settle_s: float = 30.0) -> Iterator:
    """``items``, produced up to ``depth`` ahead in a daemon thread; an exception there is raised
    here, at the item where it happened; closing this generator stops the thread once it has come
    to rest (``settle_s`` at most): holding an item it cannot put in the full queue, or done.
    Producing an item may be a collective with the other ranks' producers (the sharded plane's
    exchange), so a producer stopped in the middle of one would leave its peers waiting; at rest,
    every rank's producer has made the same number of items (the ones consumed, plus ``depth``
    queued, plus the one held), so a stream reopened from the consumed position (a hard-negative
    refresh does that) starts its collectives in step on every rank."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, holding, ended = threading.Event(), threading.Event(), threading.Event()

    def produce():
        try:
            for item in items:
                holding.set()
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                holding.clear()
                if stop.is_set():
                    return
            ended.set()
            q.put(_END)
        except BaseException as e:  # handed to the consumer
            ended.set()
            q.put(e)

    thread = threading.Thread(target=produce, name="dist_embed-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        deadline = time.monotonic() + settle_s
        while thread.is_alive() and not ((holding.is_set() or ended.is_set()) and q.full()) \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        stop.set()
        thread.join(timeout=5)
