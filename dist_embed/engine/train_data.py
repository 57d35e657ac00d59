"""A run's training data, complete: the plan of global batches (one ``PlanSpec`` per dataset and the
sampler that mixes them), each dataset's size, and this rank's batches from any position on."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..config import Config, ConfigError
from ..data.batch import pins
from ..data.layout import LayoutSpec
from ..data.loader import MixSpec, PlanSpec, RankLoader, prefetch
from ..data.sharded import Sharding
from ..data.readers import DataError, Source
from ..data.rows import Schema, manifest_rows, scan
from ..data.shards import shard_urls
from ..data.tokenization import tokenizer_fingerprint

log = logging.getLogger("dist_embed.train")


@dataclass(frozen=True)
class TrainData:
    plan: MixSpec
    sizes: tuple  # rows of each dataset (None: a stream of unknown length)
    rows: int | None  # rows per epoch (None: unknown)
    global_batch: int
    num_workers: int  # dataloader workers that tokenize (0: in the training process)
    balance: bool  # deal each global batch's rows out to ranks by length (distributed.balance_ranks)
    layout: LayoutSpec | None = None  # how the collate lays the texts out for the encoder
    sharding: Sharding | None = None  # the sharded plane's pieces and exchange (None: the global plane)
    prefetch: bool = False  # batches made ahead in a background thread (data.prefetch)

    @property
    def names(self) -> tuple[str, ...]:
        return self.plan.names

    def batches(self, pos, state, tokenizer, max_length: int, renew=None):
        """(this rank's micro-batch, planner state after it), epoch after epoch, from the data
        position ``pos`` (the loop moves it); (None, None) when a stream of unknown length ends an
        epoch. ``renew``: each data set's hard-negative columns (mining/refresh.py), None:
        the data's. Each epoch's loader iterator starts in the calling (training) thread; with
        ``prefetch`` its batches are then planned, received and pinned in a background thread."""
        loader = RankLoader(tokenizer, max_length, self.global_batch, state.rank, state.world_size, self.num_workers,
                            pin_memory=pins(state.device), balance=self.balance, layout=self.layout)
        try:
            while True:
                epoch = pos.epoch
                planner = self.plan.planner(epoch, pos.planner_state, sizes=self.sizes, sharding=self.sharding,
                                            renew=renew)
                batches = loader.epoch(planner)
                # one epoch at a time: the loop moves ``pos``
                yield from prefetch(batches) if self.prefetch else batches
                if pos.epoch == epoch:  # the loop did not see the epoch's last row (rows unknown)
                    yield None, None
        finally:
            loader.close()

    def epoch_progress(self, pos) -> float:
        """Epochs done as a fraction (sentence-transformers logs 0.5 for half an epoch)."""
        done = (pos.planner_state or {}).get("rows_done", 0)
        return round(pos.epoch + (min(done / self.rows, 1.0) if self.rows else 0.0), 4)


def build_plan(cfg: Config, global_batch: int, tokenizer, max_seq_length: int, world: int,
               plane: str | None = None) -> MixSpec:
    """The data plan: one ``PlanSpec`` per dataset, and the sampler that mixes them; ``plane``
    (default: ``data.plane`` resolved for this world size) says who plans the batches."""
    d, t = cfg.data, cfg.training
    specs = []
    try:
        sources = []
        for ds in cfg.datasets:
            src = Source(ds.path, ds.format, ds.subset, ds.split, ds.streaming, ds.max_rows)
            if src.format == "wds" and not ds.prompts and pretokenized_for(src.path, tokenizer, max_seq_length):
                src = Source(ds.path, ds.format, ds.subset, ds.split, ds.streaming, ds.max_rows, token_ids=True)
            sources.append((ds, src))
        plane = plane or resolve_plane(d.plane, world, [src for _, src in sources])
        for ds, src in sources:
            specs.append(PlanSpec(src, Schema.for_loss(ds.loss.name), dict(ds.columns), d.on_error, t.seed,
                                  global_batch, d.shuffle, d.shuffle_buffer, d.no_duplicates, d.dedup_buffer,
                                  prompts=tuple(sorted(ds.prompts.items())), plane=plane))
    except DataError as e:
        raise ConfigError(str(e)) from None
    weights = tuple(ds.weight for ds in cfg.datasets) if d.sampler == "weighted" else None
    return MixSpec(tuple(ds.name for ds in cfg.datasets), tuple(specs), d.sampler, d.temperature, weights, t.seed)


def resolve_plane(setting: str, world: int, sources: list[Source]) -> str:
    """``data.plane``: "auto" is the sharded plane with several processes where every data set
    (local files, prepared shards with a manifest, a Hugging Face dataset that is not streamed; a
    stream is read by the global plane) cuts into a few pieces per rank; small data stays global
    (equal shares, the same batches at any world size)."""
    from ..data.pieces import PieceSource, indexable_hub

    def splits(s: Source) -> bool:
        return s.format in ("jsonl", "csv", "tsv", "parquet") or indexable_hub(s) or \
            (s.format == "wds" and shard_urls(s.path)[1] is not None)

    fits = all(splits(s) for s in sources)
    if setting == "sharded" and not fits:
        bad = next(s.path for s in sources if not splits(s))
        raise ConfigError(f"data.plane=sharded: {bad} is read by the global plane (a streamed hub dataset, shards "
                          "without a manifest); use data.plane=global, streaming: false, or prepare-data")
    if setting == "auto":
        big = world > 1 and fits and all(PieceSource(_Bare(s)).splits_for(world) for s in sources)
        return "sharded" if big else "global"
    return setting


@dataclass(frozen=True)
class _Bare:
    """A data set's source alone: enough for ``PieceSource`` to cut it."""
    source: Source


def shard_data(plan: MixSpec, cfg: Config, state, saved_pieces: list | None, old_states: list | None,
               read_workers: int = 0):
    """The sharded plane's run-time part and each data set's size: the pieces, counted by every
    rank for its share (or as the checkpoint recorded them), the exchange between ranks, and the
    processes that read a rank's pieces ahead (``read_workers``; 0: none)."""
    from ..data.pieces import Piece, PieceSource, merge_counts, scan_counts
    from ..data.sharded import GlooExchange, LocalExchange, ReadAhead, Sharding
    from ..distributed import gather_objects

    sources = [PieceSource(spec) for spec in plan.specs]
    pieces, sizes = [], []
    for name, src in zip(plan.names, sources):
        if saved_pieces is not None:
            table = [Piece.from_json(p) for p in saved_pieces[len(pieces)]]
            pieces.append(table)
            continue
        t0 = time.perf_counter()
        cut = src.cut(state.world_size)
        counts = scan_counts(src, cut, state.rank, state.world_size, lambda x: gather_objects(x, state))
        table, valid, skips = merge_counts(src, cut, counts, state.world_size, cfg.data.max_skip_fraction)
        if skips.total:
            log.warning("%s: %s", src.spec.source.path, skips.summary())
        log.info("%s (%s): %d rows in %d pieces checked in %.1fs by %d rank(s)%s", name, src.spec.source.path, valid,
                 len(table), time.perf_counter() - t0, state.world_size,
                 f" ({skips.total} skipped)" if skips.total else "")
        pieces.append(table)
        sizes.append(valid)
    exchange = GlooExchange(state.data, state.rank, state.world_size) if state.enabled else LocalExchange()
    reader = ReadAhead(sources, read_workers) if read_workers else None
    if reader:
        log.info("each rank's pieces are read ahead by %d process(es) of its own", read_workers)
    return Sharding(sources, pieces, [s.width() for s in sources], exchange, old_states, reader), sizes or None


def pretokenized_for(path: str, tokenizer, max_seq_length: int) -> bool:
    """Whether shards carry token ids made by this very tokenizer at this length (else the
    workers tokenize the text, which gives the same result, only slower)."""
    _, man = shard_urls(path)
    tok = (man or {}).get("tokenizer")
    if not tok:
        return False
    ok = tok.get("max_seq_length") == max_seq_length and tok.get("fingerprint") == tokenizer_fingerprint(
        tokenizer, max_seq_length)
    if not ok:
        log.warning("%s: its token ids were made for tokenizer %s at length %s, not this model's (length %d): "
                    "tokenizing the text instead", path, tok.get("name"), tok.get("max_seq_length"), max_seq_length)
    return ok


def dataset_sizes(plan: MixSpec, cfg: Config) -> list[int | None]:
    """Rows of each dataset: from a shard manifest, else one validating pass over local data (bad
    data fails in seconds, not mid-run); None for a hub stream (validated as it arrives)."""
    d = cfg.data
    sizes = []
    for name, spec, dcfg in zip(plan.names, plan.specs, cfg.datasets):
        src = spec.source
        if src.format == "hf" and dcfg.streaming:
            sizes.append(None)
            continue
        if src.format == "wds":
            urls, man = shard_urls(src.path)
            if man is not None:
                sizes.append(manifest_rows(man, src.path, spec.schema, dict(spec.columns), src.max_rows))
                log.info("%s (%s): %d rows (from its manifest, validated by prepare-data)", name, src.path, sizes[-1])
                continue
        t0 = time.perf_counter()
        res = scan(src, spec.schema, dict(spec.columns), d.on_error, d.max_skip_fraction)
        log.info("%s (%s): %d rows checked in %.1fs%s", name, src.path, res.rows, time.perf_counter() - t0,
                 f" ({res.skips.total} skipped)" if res.skips.total else "")
        sizes.append(res.rows)
    return sizes
