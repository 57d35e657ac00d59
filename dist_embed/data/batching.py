"""Global batch planning: the same sequence of global batches on every rank, whatever the world size.

Every rank (and every dataloader worker) runs the same deterministic pipeline over the stream::

    rows -> buffered shuffle (seed, epoch) -> global batches of G rows (optionally no duplicates)
         -> rank r keeps its contiguous slice

so the batches depend on the data, the seed and G = batch_size x world_size only. Workers then
tokenize only their own slices. All functions here are pure (no torch, no process group) so tests can
pin their behaviour directly.

Ragged tail: the last global batch of an epoch may hold fewer than G rows (and with no-duplicates
batching a batch can close early when the look-ahead buffer is full). Such a batch is split as evenly
as possible (slice sizes differ by at most one row); a rank whose slice is empty still takes part in
the step, contributing no anchors. No row is ever dropped.
"""
from __future__ import annotations

import random
from collections import deque
from typing import Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


def epoch_rng(seed: int, epoch: int) -> random.Random:
    return random.Random(seed * 1_000_003 + epoch)


def buffered_shuffle(items: Iterable[T], buffer_size: int, rng: random.Random) -> Iterator[T]:
    """Approximate shuffle of a stream with a bounded buffer (memory O(buffer_size))."""
    buf: list[T] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def fixed_batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def no_duplicate_batches(items: Iterable[T], size: int, keys: Callable[[T], Sequence[Hashable]],
                         max_deferred: int) -> Iterator[list[T]]:
    """Batches of ``size`` in which no key (text) occurs twice.

    A row that would repeat a text already in the batch is deferred, in arrival order, and offered
    first to the next batch: never dropped. At most ``max_deferred`` rows wait; when that buffer is
    full and the next row also clashes, the batch closes short (counted by the caller via its size).
    Memory is O(size + max_deferred), independent of the stream length.
    """
    it = iter(items)
    deferred: deque[T] = deque()
    exhausted = False
    while True:
        batch: list[T] = []
        seen: set = set()
        kept: deque[T] = deque()
        for item in deferred:  # oldest first; what does not fit keeps its place in the queue
            ks = set(keys(item))
            if len(batch) < size and seen.isdisjoint(ks):
                batch.append(item)
                seen |= ks
            else:
                kept.append(item)
        deferred = kept
        while len(batch) < size and not exhausted:
            try:
                item = next(it)
            except StopIteration:
                exhausted = True
                break
            ks = set(keys(item))
            if seen.isdisjoint(ks):
                batch.append(item)
                seen |= ks
            else:
                deferred.append(item)
                if len(deferred) > max_deferred:
                    break  # buffer full: close this batch short rather than grow without bound
        if not batch:
            return
        yield batch


def split_sizes(n: int, world: int) -> list[int]:
    """Sizes of the ``world`` contiguous slices of an n-row global batch (differ by at most one)."""
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


def plan_epoch(rows_factory: Callable[[], Iterable], *, epoch: int, seed: int, global_batch: int,
               shuffle: bool, shuffle_buffer: int, no_duplicates: bool, dedup_buffer: int | None,
               segments: Sequence[tuple[int, int]] = ()) -> Iterator[list]:
    """The global batches of one epoch, after the ``segments`` already consumed.

    ``segments`` is the resume history of this epoch: ``[(G1, k1), (G2, k2), ...]`` means k1 batches
    of size G1 were trained, then (after a resume with another world size) k2 batches of size G2 over
    the rows not yet seen, and so on. Replaying them reproduces exactly which rows are done, so a
    resume with a different number of processes neither repeats nor loses a row.
    """
    done: set[int] = set()
    for i, (g, k) in enumerate(segments):
        gen = _plan(rows_factory, epoch, seed, g, shuffle, shuffle_buffer, no_duplicates, dedup_buffer,
                    frozenset(done))
        for _, batch in zip(range(k), gen):
            done.update(r.row_id for r in batch)
        if i == len(segments) - 1 and g == global_batch:
            yield from gen  # same batch size as before the stop: continue the very same sequence
            return
    yield from _plan(rows_factory, epoch, seed, global_batch, shuffle, shuffle_buffer, no_duplicates,
                     dedup_buffer, frozenset(done))


def _plan(rows_factory, epoch, seed, global_batch, shuffle, shuffle_buffer, no_duplicates, dedup_buffer,
          exclude: set[int]) -> Iterator[list]:
    rows = rows_factory()
    if exclude:
        rows = (r for r in rows if r.row_id not in exclude)
    if shuffle:
        rows = buffered_shuffle(rows, shuffle_buffer, epoch_rng(seed, epoch))
    if no_duplicates:
        return no_duplicate_batches(rows, global_batch, lambda r: r.texts, dedup_buffer or 16 * global_batch)
    return fixed_batches(rows, global_batch)
