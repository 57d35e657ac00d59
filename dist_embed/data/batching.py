"""Global batch planning: the same sequence of global batches on every rank, with a saveable state.

Every rank runs the same deterministic pipeline over the stream::

    rows -> buffered shuffle (seed, epoch) -> global batches of G rows (optionally no duplicates)
         -> rank r keeps its slice

so the batches depend on the data, the seed and G = batch_size x world_size only. The planner's
state between two batches is small and explicit: the reader's position in the source, the shuffle
buffer's rows and RNG state, and the rows the no-duplicates batcher deferred. A checkpoint stores
that state, so a resume costs O(buffers), not a replay of the epoch; and since the next batch is
cut from that state with whatever G the resumed run has, a resume at another world size neither
repeats nor loses a row.

Ragged tail: the last global batch of an epoch (and, with no-duplicates batching, a batch closed
early because the look-ahead buffer was full) may hold fewer than G rows, even fewer than there are
ranks. It is split as evenly as possible (slice sizes differ by at most one row); a rank whose slice
is empty still takes part in the step. No row is ever dropped.

Everything here is pure Python and numpy (no torch, no process group) so tests can pin it directly.
"""
from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable, Hashable, Iterable, Iterator, Protocol, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def epoch_rng(seed: int, epoch: int) -> random.Random:
    return random.Random(seed * 1_000_003 + epoch)


def rng_from_json(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


class ShuffleBuffer:
    """Approximate shuffle of a stream with a bounded buffer (memory O(size)), resumable.

    ``pull(next_item)`` returns the next shuffled item (None when the stream and the buffer are
    empty): the buffer is topped up to ``size`` from the stream, then a random slot is emitted.
    When the stream ends the rest is shuffled once and drained.
    """

    def __init__(self, size: int, rng: random.Random, buffer: list | None = None, draining: bool = False):
        self.size, self.rng = size, rng
        self.buffer: list = buffer if buffer is not None else []
        self.draining = draining

    def pull(self, next_item: Callable[[], Any]):
        while not self.draining and len(self.buffer) < self.size:
            item = next_item()
            if item is None:
                self.draining = True
                self.rng.shuffle(self.buffer)
                break
            self.buffer.append(item)
        if not self.buffer:
            return None
        if self.draining:
            return self.buffer.pop()
        i = self.rng.randrange(len(self.buffer))
        out = self.buffer[i]
        self.buffer[i] = self.buffer[-1]
        self.buffer.pop()
        return out


class Batcher:
    """Cuts global batches from a stream of rows; with ``keys`` no key (text) occurs twice in a batch.

    A row that would repeat a text already in the batch is deferred, in arrival order, and offered
    first to the next batch: never dropped. At most ``max_deferred`` rows wait; when that buffer is
    full and the next row also clashes, the batch closes short (``short_batches`` counts them).
    Memory is O(size + max_deferred), independent of the stream length.
    """

    def __init__(self, keys: Callable[[Any], Sequence[Hashable]] | None, max_deferred: int,
                 deferred: Iterable = (), exhausted: bool = False, short: Sequence[int] = (0, 0)):
        self.keys, self.max_deferred = keys, max_deferred
        self.deferred: deque = deque(deferred)
        self.exhausted = exhausted
        # batches closed short because their rows repeat texts, and rows trained alone in such a batch
        self.short_batches, self.lonely_rows = short

    def next_batch(self, size: int, next_item: Callable[[], Any]) -> list | None:
        batch: list = []
        if self.keys is None:
            while self.deferred and len(batch) < size:  # rows deferred under an earlier no-duplicates setting
                batch.append(self.deferred.popleft())
            while len(batch) < size and not self.exhausted:
                item = next_item()
                if item is None:
                    self.exhausted = True
                else:
                    batch.append(item)
            return batch or None
        seen: set = set()
        kept: deque = deque()
        for item in self.deferred:  # oldest first; what does not fit keeps its place in the queue
            ks = set(self.keys(item))
            if len(batch) < size and seen.isdisjoint(ks):
                batch.append(item)
                seen |= ks
            else:
                kept.append(item)
        self.deferred = kept
        closed_short = False
        while len(batch) < size and not self.exhausted:
            item = next_item()
            if item is None:
                self.exhausted = True
                break
            ks = set(self.keys(item))
            if seen.isdisjoint(ks):
                batch.append(item)
                seen |= ks
            else:
                self.deferred.append(item)
                if len(self.deferred) > self.max_deferred:
                    closed_short = True  # buffer full: close this batch short rather than grow without bound
                    break
        if not batch:
            return None
        if closed_short or (len(batch) < size and self.deferred):
            self.short_batches += 1
            self.lonely_rows += len(batch) == 1
        return batch


def buffered_shuffle(items: Iterable[T], buffer_size: int, rng: random.Random) -> Iterator[T]:
    """``ShuffleBuffer`` over an iterable (items must not be None)."""
    it = iter(items)
    buf = ShuffleBuffer(buffer_size, rng)
    while (item := buf.pull(lambda: next(it, None))) is not None:
        yield item


def fixed_batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    b = Batcher(None, 0)
    while (batch := b.next_batch(size, lambda: next(it, None))) is not None:
        yield batch


def no_duplicate_batches(items: Iterable[T], size: int, keys: Callable[[T], Sequence[Hashable]],
                         max_deferred: int) -> Iterator[list[T]]:
    """``Batcher`` with de-duplication over an iterable."""
    it = iter(items)
    b = Batcher(keys, max_deferred)
    while (batch := b.next_batch(size, lambda: next(it, None))) is not None:
        yield batch


def split_sizes(n: int, world: int) -> list[int]:
    """Sizes of the ``world`` slices of an n-row global batch (differ by at most one)."""
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def rank_slice(batch: Sequence[T], rank: int, world: int) -> Sequence[T]:
    sizes = split_sizes(len(batch), world)
    start = sum(sizes[:rank])
    return batch[start:start + sizes[rank]]


def balanced_order(costs: Sequence[float], world: int) -> list[int]:
    """A reordering of a global batch whose contiguous rank slices carry about equal cost.

    Every rank waits for the slowest one at the gradient all-reduce, and a rank's forward/backward
    time grows with its texts' lengths. The loss (a mean over the global batch, negatives gathered
    from all ranks) does not depend on which rank holds which row, so we may deal the rows out:
    costliest first, each to the least-loaded rank that still has room (slice sizes as
    ``split_sizes``). Each rank's rows keep their batch order. Deterministic, so every rank computes
    the same order without talking.
    """
    sizes = split_sizes(len(costs), world)
    load = [0.0] * world
    members: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min((r for r in range(world) if len(members[r]) < sizes[r]), key=lambda r: (load[r], r))
        members[r].append(i)
        load[r] += costs[i]
    return [i for m in members for i in sorted(m)]


class RowCursor(Protocol):
    """An iterator of rows that knows where it stands: ``position`` re-opens the source right after
    the last row it returned (a reader offset, JSON-serialisable)."""

    position: dict

    def __iter__(self): ...

    def __next__(self): ...


class EpochPlanner:
    """The global batches of one epoch, from a saved state or from the start.

    ``open_rows(position)`` opens the validated row stream at a reader position (None: the start).
    Rows are ``(row_id, texts, score)`` tuples (``readers.Row``). ``next_batch(G)`` cuts the next
    global batch with the G of the current run; ``state_dict()`` between two batches is all a
    resume needs (JSON-serialisable, O(shuffle buffer + deferred rows)).
    """

    def __init__(self, open_rows: Callable[[dict | None], RowCursor], *, epoch: int, seed: int, shuffle: bool,
                 shuffle_buffer: int, no_duplicates: bool, dedup_buffer: int | None, global_batch: int,
                 make_row: Callable[[list], Any] = tuple, state: dict | None = None,
                 renew: Callable[[Any], Any] | None = None):
        self.epoch = epoch
        state = state or {}
        # ``renew``: a row with its negative columns from the last hard-negative refresh (mining/),
        # applied as rows are batched (so no-duplicates sees them) and to restored deferred rows
        self.renew = renew
        if renew is not None:
            make_row = _renewed(make_row, renew)
        self.rows = open_rows(state.get("reader"))
        self._rows_it = iter(self.rows)
        self.rows_done = state.get("rows_done", 0)  # rows handed out in batches this epoch
        self.batches_done = state.get("batches_done", 0)
        sh = state.get("shuffle")
        self.shuffle = None
        # rows a saved shuffle buffer held when shuffling is now off (--allow-data-change): first out
        self.leftover = [make_row(r) for r in sh["buffer"]] if sh and not shuffle else []
        if shuffle:
            rng = rng_from_json(sh["rng"]) if sh else epoch_rng(seed, epoch)
            self.shuffle = ShuffleBuffer(shuffle_buffer, rng, [make_row(r) for r in sh["buffer"]] if sh else None,
                                         sh["draining"] if sh else False)
        b = state.get("batcher", {})
        keys = (lambda r: r.texts) if no_duplicates else None
        self.batcher = Batcher(keys, dedup_buffer or 16 * global_batch, [make_row(r) for r in b.get("deferred", [])],
                               b.get("exhausted", False), b.get("short", (0, 0)))

    def _next_row(self):
        return next(self._rows_it, None)

    def _pull(self):
        if self.leftover:
            return self.leftover.pop()
        row = self.shuffle.pull(self._next_row) if self.shuffle is not None else self._next_row()
        return self.renew(row) if self.renew is not None and row is not None else row

    def next_batch(self, global_batch: int) -> list | None:
        batch = self.batcher.next_batch(global_batch, self._pull)
        if batch is not None:
            self.rows_done += len(batch)
            self.batches_done += 1
        return batch

    def state_dict(self) -> dict:
        """A snapshot, cheap enough to take after every batch (shallow copies of immutable rows);
        ``json.dumps`` writes it as is (rows and the RNG state become arrays)."""
        out = {"epoch": self.epoch, "reader": dict(self.rows.position), "rows_done": self.rows_done,
               "batches_done": self.batches_done,
               "batcher": {"deferred": list(self.batcher.deferred), "exhausted": self.batcher.exhausted,
                           "short": (self.batcher.short_batches, self.batcher.lonely_rows)}}
        if self.shuffle is not None:
            out["shuffle"] = {"rng": self.shuffle.rng.getstate(), "buffer": list(self.shuffle.buffer),
                              "draining": self.shuffle.draining}
        elif self.leftover:
            out["shuffle"] = {"rng": random.Random(0).getstate(), "buffer": list(self.leftover), "draining": False}
        return out


def _renewed(make_row: Callable, renew: Callable) -> Callable:
    """Restored rows (a saved state's) with the current negative columns."""
    return lambda r: renew(make_row(r))


# -- the sharded plane's no-duplicates rule (data/sharded.py exchanges these between ranks) --------

def text_hashes(rows, width: int) -> np.ndarray:
    """[rows, width] uint64 hashes of each row's texts (0: no text in that column)."""
    import xxhash

    out = np.zeros((len(rows), width), dtype=np.uint64)
    for i, row in enumerate(rows):
        for j, text in enumerate(row.texts[:width]):
            out[i, j] = xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")) or 1
    return out


def first_wins(hashes: np.ndarray, priority: np.ndarray, fixed_below: int | None = None) -> np.ndarray:
    """For each (hash, priority) entry: nonzero where another entry of the same hash has a lower
    priority (it loses): 1, or 2 when that entry's priority is below ``fixed_below`` (a row the
    batch already holds: the loser cannot join it at all). Entries of one candidate share a
    priority and never lose to each other."""
    lost = np.zeros(len(hashes), dtype=np.int8)
    if not len(hashes):
        return lost
    order = np.lexsort((priority, hashes))
    h, p = hashes[order], priority[order]
    head = np.ones(len(h), dtype=bool)
    head[1:] = h[1:] != h[:-1]
    best = np.maximum.accumulate(np.where(head, np.arange(len(h)), 0))  # each entry's group start
    code = (p > p[best]).astype(np.int8)
    if fixed_below is not None:
        code[(code > 0) & (p[best] < fixed_below)] = 2
    lost[order] = code
    return lost


# ---------------------------------------------------------------------------------------------
# global no-duplicates without the texts: ranks exchange fixed-size hashes of their candidate rows
#
# Each text of each candidate is hashed (64 bits, xxhash; 0 is reserved). A hash is owned by rank
# ``hash % world``: every rank sends each hash with the candidate's priority to its owner (one
# all-to-all), the owner marks every occurrence but the one of lowest priority as lost, and the
# marks go back the same way (a second all-to-all). A candidate with a lost text waits for a later
# batch. Priorities are ``(class, rank, index)``, so the outcome depends only on what the ranks
# proposed, never on timing; and each rank handles about its own number of hashes, whatever the
# world size (an all-gather would hand every rank the whole global batch's hashes). A third tiny
# collective (an all-gather of two numbers per rank) tells every rank the slice sizes (the rule
# itself, ``text_hashes`` and ``first_wins``, is batching.py's).


class LocalExchange:
    """One rank alone (world 1), or one rank of a simulated world (benchmarks): the owner's work
    is done here on this rank's own hashes."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    def lost(self, hashes: np.ndarray, priority: np.ndarray, fixed_below: int | None = None) -> np.ndarray:
        return first_wins(hashes, priority, fixed_below)

    def gather(self, values: tuple[int, int]) -> list[tuple[int, int]]:
        return [tuple(values)] * self.world if self.world > 1 else [tuple(values)]


class GlooExchange:
    """The real thing between ranks, on a CPU (gloo) group of its own: the planner may run in a
    loader thread while the training thread uses the other groups."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world

    def lost(self, hashes: np.ndarray, priority: np.ndarray, fixed_below: int | None = None) -> np.ndarray:
        """``first_wins`` over every rank's entries, each decided by the hash's owner."""
        import torch
        import torch.distributed as dist

        owner = (hashes % np.uint64(self.world)).astype(np.int64)
        order = np.argsort(owner, kind="stable")
        send_counts = np.bincount(owner, minlength=self.world)
        recv_counts = torch.zeros(self.world, dtype=torch.int64)
        dist.all_to_all_single(recv_counts, torch.from_numpy(send_counts.astype(np.int64)), group=self.group)
        recv = recv_counts.tolist()
        payload = np.stack([hashes[order].view(np.int64), priority[order]], axis=1)
        got = torch.empty((sum(recv), 2), dtype=torch.int64)
        dist.all_to_all_single(got, torch.from_numpy(np.ascontiguousarray(payload)), recv, send_counts.tolist(),
                               group=self.group)
        got = got.numpy()
        verdict = first_wins(got[:, 0].view(np.uint64), got[:, 1], fixed_below).astype(np.int64)
        back = torch.empty(len(hashes), dtype=torch.int64)
        dist.all_to_all_single(back, torch.from_numpy(verdict), send_counts.tolist(), recv, group=self.group)
        lost = np.zeros(len(hashes), dtype=np.int8)
        lost[order] = back.numpy()
        return lost

    def gather(self, values: tuple[int, int]) -> list[tuple[int, int]]:
        import torch
        import torch.distributed as dist

        out = [torch.zeros(len(values), dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor(values, dtype=torch.int64), group=self.group)
        return [tuple(t.tolist()) for t in out]
