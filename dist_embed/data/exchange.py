"""Global no-duplicates without the texts: ranks exchange fixed-size hashes of their candidate rows.

Each text of each candidate is hashed (64 bits, xxhash; 0 is reserved). A hash is owned by rank
``hash % world``: every rank sends each hash with the candidate's priority to its owner (one
all-to-all), the owner marks every occurrence but the one of lowest priority as lost, and the
marks go back the same way (a second all-to-all). A candidate with a lost text waits for a later
batch. Priorities are ``(round, rank, index)``, so the outcome depends only on what the ranks
proposed, never on timing; and each rank handles about its own number of hashes, whatever the
world size (an all-gather would hand every rank the whole global batch's hashes). A third tiny
collective (an all-gather of two numbers per rank) tells every rank the slice sizes.
"""
from __future__ import annotations

import numpy as np


def text_hashes(rows, width: int) -> np.ndarray:
    """[rows, width] uint64 hashes of each row's texts (0: no text in that column)."""
    import xxhash

    out = np.zeros((len(rows), width), dtype=np.uint64)
    for i, row in enumerate(rows):
        for j, text in enumerate(row.texts[:width]):
            out[i, j] = xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")) or 1
    return out


def first_wins(hashes: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """For each (hash, priority) entry: True where another entry of the same hash has a lower
    priority (it loses). Entries of one candidate share a priority and never lose to each other."""
    lost = np.zeros(len(hashes), dtype=bool)
    if not len(hashes):
        return lost
    order = np.lexsort((priority, hashes))
    h, p = hashes[order], priority[order]
    head = np.ones(len(h), dtype=bool)
    head[1:] = h[1:] != h[:-1]
    best = np.maximum.accumulate(np.where(head, np.arange(len(h)), 0))  # each entry's group start
    lost[order] = p > p[best]
    return lost


class LocalExchange:
    """One rank alone (world 1), or one rank of a simulated world (benchmarks): the owner's work
    is done here on this rank's own hashes."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    def lost(self, hashes: np.ndarray, priority: np.ndarray) -> np.ndarray:
        return first_wins(hashes, priority)

    def gather(self, values: tuple[int, int]) -> list[tuple[int, int]]:
        return [tuple(values)] * self.world if self.world > 1 else [tuple(values)]


class GlooExchange:
    """The real thing between ranks, on a CPU (gloo) group of its own: the planner may run in a
    loader thread while the training thread uses the other groups."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world

    def lost(self, hashes: np.ndarray, priority: np.ndarray) -> np.ndarray:
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
        verdict = first_wins(got[:, 0].view(np.uint64), got[:, 1]).astype(np.int64)
        back = torch.empty(len(hashes), dtype=torch.int64)
        dist.all_to_all_single(back, torch.from_numpy(verdict), send_counts.tolist(), recv, group=self.group)
        lost = np.zeros(len(hashes), dtype=bool)
        lost[order] = back.numpy().astype(bool)
        return lost

    def gather(self, values: tuple[int, int]) -> list[tuple[int, int]]:
        import torch
        import torch.distributed as dist

        out = [torch.zeros(len(values), dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor(values, dtype=torch.int64), group=self.group)
        return [tuple(t.tolist()) for t in out]
