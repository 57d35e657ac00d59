"""A run's training data, complete: the plan of global batches (one ``PlanSpec`` per dataset and the
sampler that mixes them), each dataset's size, and this rank's batches from any position on."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..config import Config, ConfigError
from ..data.layout import LayoutSpec
from ..data.loader import MixSpec, PlanSpec, rank_batches
from ..data.prefetch import prefetch
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

    @property
    def names(self) -> tuple[str, ...]:
        return self.plan.names

    def batches(self, pos, state, tokenizer, max_length: int):
        """(this rank's micro-batch, planner state after it), epoch after epoch, from the data
        position ``pos`` (the loop moves it); (None, None) when a stream of unknown length ends an
        epoch."""
        while True:
            epoch = pos.epoch
            planner = self.plan.planner(epoch, pos.planner_state, sizes=self.sizes)
            cuda = state.device.type == "cuda"
            batches = rank_batches(planner, self.global_batch, state.rank, state.world_size, tokenizer, max_length,
                                   self.num_workers, pin_memory=cuda, balance=self.balance, layout=self.layout)
            yield from prefetch(batches) if cuda else batches  # one epoch at a time: ``pos`` is the loop's
            if pos.epoch == epoch:  # the loop did not see the epoch's last row (rows unknown)
                yield None, None

    def epoch_progress(self, pos) -> float:
        """Epochs done as a fraction (sentence-transformers logs 0.5 for half an epoch)."""
        done = (pos.planner_state or {}).get("rows_done", 0)
        return round(pos.epoch + (min(done / self.rows, 1.0) if self.rows else 0.0), 4)


def build_plan(cfg: Config, global_batch: int, tokenizer, max_seq_length: int) -> MixSpec:
    """The data plan: one ``PlanSpec`` per dataset, and the sampler that mixes them."""
    d, t = cfg.data, cfg.training
    specs = []
    try:
        for ds in cfg.datasets:
            src = Source(ds.path, ds.format, ds.subset, ds.split, ds.streaming, ds.max_rows)
            if src.format == "wds" and not ds.prompts and pretokenized_for(src.path, tokenizer, max_seq_length):
                src = Source(ds.path, ds.format, ds.subset, ds.split, ds.streaming, ds.max_rows, token_ids=True)
            specs.append(PlanSpec(src, Schema.for_loss(ds.loss.name), dict(ds.columns), d.on_error, t.seed,
                                  global_batch, d.shuffle, d.shuffle_buffer, d.no_duplicates, d.dedup_buffer,
                                  prompts=tuple(sorted(ds.prompts.items()))))
    except DataError as e:
        raise ConfigError(str(e)) from None
    weights = tuple(ds.weight for ds in cfg.datasets) if d.sampler == "weighted" else None
    return MixSpec(tuple(ds.name for ds in cfg.datasets), tuple(specs), d.sampler, d.temperature, weights, t.seed)


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
