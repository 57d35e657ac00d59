"""Several datasets in one run: which dataset each global batch comes from, with a saveable state.

Every global batch is cut from ONE dataset (by that dataset's own ``EpochPlanner``: shuffle,
no-duplicates), so in-batch negatives always come from the same source and the batch has one
loss; this is sentence-transformers' choice too (a mixed batch would pit, e.g., a scored pair
against triplets). The samplers:

- ``proportional`` (default): each batch's dataset drawn with probability proportional to the rows
  it has left this epoch: every row of every dataset exactly once per epoch, shares = sizes.
- ``round_robin``: datasets take turns; the epoch ends when the dataset whose turn it is has run
  out (sentence-transformers' semantics: the smallest dataset bounds the epoch; rows of larger
  datasets past that point wait for the next epoch, which starts every dataset afresh).
- ``temperature``: probability proportional to ``rows ** (1 / T)`` (T=1: proportional, large T:
  uniform), ``weighted``: probability proportional to hand-set weights. A dataset that runs out
  starts its next shuffled pass; the epoch is ``sum(rows)`` rows, so small datasets repeat.

Like the single planner, the state between two batches is everything a resume needs (each
source's planner state and pass, the sampler's RNG and turn), at any world size.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .batching import EpochPlanner, epoch_rng, rng_from_json
from .readers import DataError

SAMPLERS = ("proportional", "round_robin", "temperature", "weighted")


def sampler_shares(sampler: str, sizes: Sequence[int | None], temperature: float = 1.0,
                   weights: Sequence[float] | None = None) -> list[float] | None:
    """The expected share of global batches (round_robin) or rows (the others) per dataset;
    None where sizes are unknown."""
    n = len(sizes)
    if sampler == "round_robin":
        return [1.0 / n] * n
    if sampler == "weighted":
        raw = list(weights or [1.0] * n)
    elif None in sizes:
        return None
    elif sampler == "temperature":
        raw = [s ** (1.0 / temperature) for s in sizes]
    else:
        raw = list(sizes)
    total = sum(raw)
    return [r / total for r in raw]


def round_robin_rows(sizes: Sequence[int], global_batch: int) -> int:
    """Rows of a round-robin epoch with full batches (an estimate under no-duplicates batching,
    whose batches can close short): the first dataset in turn order with the fewest batches stops
    the epoch when its turn comes after its last batch, so those before it get one batch more."""
    batches = [-(-s // global_batch) for s in sizes]
    rounds = min(batches)
    stop = batches.index(rounds)
    return sum(min(s, (rounds + (d < stop)) * global_batch) for d, s in enumerate(sizes))


class _Source:
    def __init__(self, planner: EpochPlanner, passes: int = 0, rows_done: int = 0, pass_rows: int = 0,
                 batches: int = 0, exhausted: bool = False):
        self.planner, self.passes, self.rows_done, self.pass_rows = planner, passes, rows_done, pass_rows
        self.batches, self.exhausted = batches, exhausted
        self.snapshot = planner.state_dict()


class MixPlanner:
    """The global batches of one epoch over several datasets (``EpochPlanner``'s interface:
    ``next_batch``, ``state_dict``, ``rows_done``, ``batches_done``; ``last_dataset`` says which
    dataset the last batch came from, ``complete`` whether the epoch has no batch left)."""

    def __init__(self, open_planner: Callable[[int, int, dict | None], EpochPlanner], sizes: Sequence[int | None],
                 *, sampler: str, shares: Sequence[float] | None, epoch: int, seed: int, state: dict | None = None):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}")
        self.open_planner, self.sizes, self.sampler = open_planner, list(sizes), sampler
        self.shares = list(shares) if shares is not None else None
        self.epoch = epoch
        self.restarts = sampler in ("temperature", "weighted")
        self.budget = sum(self.sizes) if self.restarts and None not in self.sizes else None
        state = state or {}
        self.rng = rng_from_json(state["rng"]) if "rng" in state else epoch_rng(seed + 17, epoch)
        self.turn = state.get("turn", 0)
        self.rows_done = state.get("rows_done", 0)
        self.batches_done = state.get("batches_done", 0)
        self.complete = state.get("complete", False)
        self.last_dataset = state.get("last_dataset", 0)
        saved = state.get("sources") or [{} for _ in self.sizes]
        self.sources = [_Source(open_planner(i, s.get("passes", 0), s.get("planner")), s.get("passes", 0),
                                s.get("rows_done", 0), s.get("pass_rows", 0), s.get("batches", 0),
                                s.get("exhausted", False)) for i, s in enumerate(saved)]

    def _choose(self) -> int | None:
        n = len(self.sources)
        if self.sampler == "round_robin":
            return self.turn % n
        if self.restarts:
            return self.rng.choices(range(n), weights=self.shares)[0]
        left = []
        for i, s in enumerate(self.sources):  # proportional to the rows left (1 where the size is unknown)
            size = self.sizes[i]
            left.append(0 if s.exhausted else (max(size - s.rows_done, 0) if size is not None else 1))
        if not any(left):
            return None
        return self.rng.choices(range(n), weights=left)[0]

    def next_batch(self, global_batch: int) -> list | None:
        while not self.complete:
            d = self._choose()
            if d is None:
                break
            src = self.sources[d]
            size = global_batch if self.budget is None else min(global_batch, self.budget - self.rows_done)
            batch = src.planner.next_batch(size)
            if batch is None:
                if self.restarts:
                    if not src.pass_rows:
                        raise DataError(f"dataset {d}: no rows to draw a batch from")
                    src.passes, src.pass_rows = src.passes + 1, 0  # its next shuffled pass
                    src.planner = self.open_planner(d, src.passes, None)
                    src.snapshot = src.planner.state_dict()
                    continue
                src.exhausted = True
                if self.sampler == "round_robin":
                    break
                continue
            n = getattr(batch, "global_size", len(batch))  # a sharded plane's batch is this rank's slice
            src.rows_done += n
            src.pass_rows += n
            src.batches += 1
            src.snapshot = src.planner.state_dict()  # only the source that moved is copied
            self.rows_done += n
            self.batches_done += 1
            self.last_dataset = d
            self.turn += self.sampler == "round_robin"
            self.complete = self._complete_now()
            return batch
        self.complete = True
        return None

    def _complete_now(self) -> bool:
        """Whether the epoch has no batch left, when that is known without reading ahead (so the
        loop can close the step on the epoch's last batch)."""
        if self.restarts:
            return self.budget is not None and self.rows_done >= self.budget
        if self.sampler == "round_robin":
            d = self.turn % len(self.sources)
            return self.sizes[d] is not None and self.sources[d].rows_done >= self.sizes[d]
        return None not in self.sizes and all(s.rows_done >= n for s, n in zip(self.sources, self.sizes))

    def state_dict(self) -> dict:
        short = [sum(s.snapshot["batcher"]["short"][k] for s in self.sources) for k in (0, 1)]
        return {"epoch": self.epoch, "rows_done": self.rows_done, "batches_done": self.batches_done,
                "complete": self.complete, "rng": self.rng.getstate(), "turn": self.turn,
                "last_dataset": self.last_dataset, "batcher": {"short": short},
                "sources": [{"passes": s.passes, "rows_done": s.rows_done, "pass_rows": s.pass_rows,
                             "batches": s.batches, "exhausted": s.exhausted, "planner": s.snapshot}
                            for s in self.sources]}
