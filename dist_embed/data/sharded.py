"""The sharded plane: each rank reads and plans only its share of an epoch.

Per epoch the data set's pieces (data/pieces.py) are put in a seeded order and dealt to the ranks
in turn (rank r takes every world-th piece), so a rank never opens another rank's pieces. A rank
streams its pieces through its own shuffle buffer; each global batch is the union of the ranks'
slices, cut in lockstep: every rank proposes its next candidates, the ranks exchange hashes of
their texts (batching.py: no text twice in the global batch, decided by a rule that depends only
on what was proposed), and each rank keeps its first ``slice`` candidates that lost no text; a
rank still short proposes again, in further rounds, until its slice is full or no row of its
own could join. A candidate that lost waits (deferred) for a later batch; nothing is dropped.
Slices hold ``split_sizes(global batch, world)[rank]`` rows while their rank has rows that can
join; at an epoch's end a slice can be short or empty, as in the global plane. Within a rank,
its next pieces can be read ahead by processes of its own (``ReadAhead``).

A rank's state between two batches (its queue of pieces and the position in the current one, its
shuffle buffer and RNG, its deferred rows) is saved per rank: at the same world size a resume
continues the very same batches; at another world size the remaining pieces and rows of every
old rank are dealt again, so the epoch still trains every row exactly once.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterator

import numpy as np

from .batching import (GlooExchange, LocalExchange, ShuffleBuffer, first_wins, rng_from_json,  # noqa: F401
                       split_sizes, text_hashes)
from .pieces import Piece


# ---------------------------------------------------------------------------------------------
# the planner


class Slice(list):
    """This rank's rows of a global batch (a list), with the global batch's slice ``sizes``:
    ``len()`` is the rank's rows; ``global_size`` the whole batch's; ``width`` its text columns."""

    def __init__(self, rows, sizes: list[int], width: int):
        super().__init__(rows)
        self.sizes, self.width, self.global_size = list(sizes), width, sum(sizes)


@dataclass
class Sharding:
    """What the sharded plane needs at run time, per data set: its pieces (counted) and how to read
    them (``PieceSource``), its rows' text columns; the exchange between the ranks; and, resuming
    a run of another world size, every old rank's planner state (to deal their work again)."""

    sources: list
    pieces: list[list[Piece]]
    widths: list[int]
    exchange: object
    old_states: list[dict] | None = None  # each old rank's MixPlanner state
    reader: "ReadAhead | None" = None  # reader processes (None: pieces are read in the planner's thread)


def sharded_planner(spec, sharding: Sharding, index: int, epoch: int, state: dict | None, salt: int,
                    make_row, renew=None) -> "ShardedPlanner":
    """Data set ``index``'s sharded planner (``PlanSpec.planner``); a state saved at another world
    size is dealt again from every old rank's state. ``renew``: the last hard-negative refresh's
    columns for each row (mining/tables.py's ``Renewal``: a callable with the new ``width``)."""
    states = None
    if state is not None and state.get("world") != sharding.exchange.world:
        olds = sharding.old_states or []
        states = [s["sources"][index]["planner"] if "sources" in s else s for s in olds]
        if len(states) != state.get("world"):
            raise ValueError(f"resuming a {state.get('world')}-rank sharded data state needs every rank's state")
        state = None
    return ShardedPlanner(sharding.pieces[index], sharding.sources[index].rows, sharding.exchange, epoch=epoch,
                          seed=spec.seed + salt, shuffle=spec.shuffle, shuffle_buffer=spec.shuffle_buffer,
                          no_duplicates=spec.no_duplicates, dedup_buffer=spec.dedup_buffer,
                          global_batch=spec.global_batch, width=renew.width if renew else sharding.widths[index],
                          total_rows=None, make_row=(lambda r: renew(make_row(r))) if renew else make_row,
                          state=state, states=states, ahead=sharding.reader, source=index, renew=renew)


def piece_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch * 7919 + 1).shuffle(order)
    return order


# ---------------------------------------------------------------------------------------------
# reading ahead: within a rank, its next pieces are dealt to reader processes

_SOURCES: list = []  # a reader process's PieceSources, one per data set


def _init_reader(sources: list, rank_pid: int) -> None:
    """A reader process ends with its rank's process, however that ends (a pool's processes would
    otherwise wait forever on its queue, holding the rank's output pipes open). Polled, not the
    launcher's PR_SET_PDEATHSIG: that fires when the starting thread ends, and the planner's may."""
    _SOURCES[:] = sources
    threading.Thread(target=_exit_with, args=(rank_pid,), daemon=True).start()


def _exit_with(pid: int) -> None:
    while os.getppid() == pid:
        time.sleep(0.5)
    os._exit(0)


def _read_piece(source: int, piece: Piece, position: dict | None) -> tuple[int, list, list]:
    at = dict(position or {})
    rows, ats = [], []
    for row in _SOURCES[source].rows(piece, position, at):
        rows.append(row)
        ats.append(dict(at))
    return os.getpid(), rows, ats


class ReadAhead:
    """A rank's next pieces read (parsed, validated: planning's costly part) by ``workers``
    processes while its planner works on the current one. A piece's rows depend only on the piece
    and the position in it, and the planner takes them in its queue's order, so batches and saved
    states are those of reading in its own thread. gzip pieces (one reader per file, front to back)
    and remote shards (streamed whole) are read in-process."""

    def __init__(self, sources: list, workers: int):
        self.sources, self.workers = sources, workers
        self.pool: ProcessPoolExecutor | None = None
        self.pending: dict = {}
        self.pids: set[int] = set()  # the processes that read (tests)

    def takes(self, piece: Piece) -> bool:
        return self.workers > 0 and piece.kind in ("bytes", "group", "block", "index")

    def _submit(self, source: int, piece: Piece, position: dict | None):
        key = (source, tuple(piece.to_json()), json.dumps(position, sort_keys=True))
        if key not in self.pending:
            if self.pool is None:  # spawned: the planner runs in a thread of a process with torch's
                self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_reader, initargs=(self.sources, os.getpid()))
            self.pending[key] = self.pool.submit(_read_piece, source, piece, position)
        return key

    def rows(self, source: int, pieces: list[Piece], index: int, position: dict | None, at: dict,
             upcoming) -> Iterator:
        """Piece ``index``'s rows from ``position`` (``at`` kept as ``PieceSource.rows`` keeps it);
        the next pieces of ``upcoming`` (the planner's queue) are handed out to be read meanwhile."""
        key = self._submit(source, pieces[index], position)
        for i, pos in islice(upcoming, 2 * self.workers):
            if self.takes(pieces[i]):
                self._submit(source, pieces[i], pos)
        pid, rows, ats = self.pending.pop(key).result()
        self.pids.add(pid)
        for row, a in zip(rows, ats):
            at.clear()
            at.update(a)
            yield row


@dataclass
class _Current:
    piece: int
    position: dict | None
    records: Iterator | None = None
    at: dict | None = None


class ShardedPlanner:
    """The global batches of one epoch as this rank takes part in them (``EpochPlanner``'s
    interface: ``next_batch``, ``state_dict``, ``rows_done``, ``batches_done``; a batch is a
    ``Slice``). ``rows_of(piece, position, at)`` yields validated rows of a piece (from a position
    inside it, keeping ``at`` right after the last row), ``exchange`` talks to the other ranks."""

    SPARE = 1.25  # candidates proposed per slice row: room for rows deferred by a clash
    SPAN = 1 << 40  # priorities: more than the candidates any rank proposes for a batch

    def __init__(self, pieces: list[Piece], rows_of: Callable, exchange, *, epoch: int, seed: int, shuffle: bool,
                 shuffle_buffer: int, no_duplicates: bool, dedup_buffer: int | None, global_batch: int, width: int,
                 total_rows: int | None, make_row: Callable = tuple, state: dict | None = None,
                 states: list[dict] | None = None, ahead: ReadAhead | None = None, source: int = 0,
                 renew: Callable | None = None):
        self.pieces, self.rows_of, self.ex = pieces, rows_of, exchange
        self.renew = renew  # a hard-negative refresh's columns, put on each row as it is proposed
        self.ahead, self.source = ahead, source  # reader processes, and this data set's number there
        self.rank, self.world = exchange.rank, exchange.world
        self.epoch, self.no_duplicates, self.width, self.total = epoch, no_duplicates, width, total_rows
        self.max_deferred = dedup_buffer or 16 * global_batch
        rank, world = self.rank, self.world
        if state is None and states:  # another world size: deal the remaining work again
            state = _redeal(states, rank, world, seed, epoch)
        state = state or {}
        self.rows_done = state.get("rows_done", 0)
        self.batches_done = state.get("batches_done", 0)
        self.short = tuple(state.get("short", (0, 0)))
        self.complete = state.get("complete", False)
        if "queue" in state:  # [piece, position inside it or None] each
            self.queue = deque(tuple(item) for item in state["queue"])
            cur = state.get("current")
            self.current = _Current(cur[0], cur[1]) if cur else None
        else:
            mine = piece_order(len(pieces), seed, epoch)[rank::world]
            # pieces of one gzip stream in file order, where they fall among the others: one read a file
            slots = [i for i, p in enumerate(mine) if pieces[p].kind == "stream"]
            for i, p in zip(slots, sorted(mine[i] for i in slots)):
                mine[i] = p
            self.queue = deque((p, None) for p in mine)
            self.current = None
        sh = state.get("shuffle")
        rng = rng_from_json(sh["rng"]) if sh else random.Random(seed * 1_000_003 + epoch * 104_729 + rank)
        self.shuffle = ShuffleBuffer(shuffle_buffer if shuffle else 0, rng,
                                     [make_row(r) for r in sh["buffer"]] if sh else None,
                                     sh["draining"] if sh else False)
        self.deferred = deque(make_row(r) for r in state.get("deferred", []))
        self.local_done = state.get("local_done", False)

    # -- this rank's stream of rows ----------------------------------------------------------------

    def _next_row(self):
        while True:
            if self.current is None:
                if not self.queue:
                    return None
                self.current = _Current(*self.queue.popleft())
            cur = self.current
            if cur.records is None:
                cur.at = dict(cur.position or {})
                if self.ahead is not None and self.ahead.takes(self.pieces[cur.piece]):
                    cur.records = self.ahead.rows(self.source, self.pieces, cur.piece, cur.position, cur.at, self.queue)
                else:
                    cur.records = iter(self.rows_of(self.pieces[cur.piece], cur.position, cur.at))
            row = next(cur.records, None)
            if row is not None:
                cur.position = dict(cur.at)
                return row
            self.current = None

    def _pull(self):
        row = self.shuffle.pull(self._next_row) if self.shuffle.size else self._next_row()
        return self.renew(row) if self.renew is not None and row is not None else row

    def _candidates(self, n: int, held: int = 0) -> list:
        """Up to ``n`` rows to propose: deferred ones first, then new ones while fewer than
        ``max_deferred`` rows wait (``held``: this batch's own that will wait too)."""
        out = []
        while self.deferred and len(out) < n:
            out.append(self.deferred.popleft())
        while len(out) < n and len(self.deferred) + held <= self.max_deferred:  # full: only the waiting rows
            row = self._pull()
            if row is None:
                break
            out.append(row)
        return out

    # -- one global batch, in lockstep with the other ranks -----------------------------------------

    def next_batch(self, global_batch: int) -> Slice | None:
        if self.complete:
            return None
        want = split_sizes(global_batch, self.world)[self.rank]
        if self.no_duplicates:
            take, back, sizes, anyone_left = self._fill(want)
        else:
            take, back = self._candidates(want), []
            sizes, anyone_left, _ = self._sizes(len(take), self._left([]))
        # what is not taken waits, in order: the unused clean candidates, then those that lost a text
        self.deferred.extendleft(reversed(back))
        left = self._left([])
        if not sum(sizes):
            if anyone_left:  # cannot happen: the first candidate of the lowest-priority rank always wins
                raise RuntimeError("no-duplicates planning made no progress")
            self.complete = True
            return None
        self.rows_done += sum(sizes)
        self.batches_done += 1
        if len(take) < want and left:
            self.short = (self.short[0] + 1, self.short[1] + (len(take) == 1))
        self.complete = (self.total is not None and self.rows_done >= self.total) or not anyone_left
        return Slice(take, sizes, self.width)

    def _left(self, held: list) -> bool:
        return bool(held or self.deferred or self.shuffle.buffer or self.current or self.queue)

    def _sizes(self, taken: int, left: bool, more: bool = False) -> tuple[list[int], bool, bool]:
        """Every rank's slice size, whether any rank has rows left, and whether any rank could
        still fill its slice in another round."""
        sizes, anyone_left, again = [], False, False
        for n, has_left, has_more in self.ex.gather((taken, int(left), int(more))):
            sizes.append(n)
            anyone_left |= bool(has_left)
            again |= bool(has_more)
        return sizes, anyone_left, again

    def _fill(self, want: int) -> tuple[list, list, list[int], bool]:
        """This rank's slice with no text twice in the global batch, in rounds: each rank short of
        its slice proposes about 1.25 rows per missing row (deferred ones first), and keeps the
        candidates that lost no text to a candidate of lower priority (the rows already taken
        always win). A candidate that lost to a taken row cannot join this batch; one that lost to
        another candidate offers itself again in the next round. Rounds go on while some rank is
        short and anyone proposed new rows, took some or set some aside: so a slice is short only when every row
        its rank could offer (within ``dedup_buffer``) repeats a text of the batch.
        Returns (taken, the rest in the order to wait, every rank's slice size, anyone left)."""
        taken: list = []
        waiting: list = []  # this batch's candidates not taken, in proposal order
        blocked: set[int] = set()  # ids of those that lost to a taken row
        while True:
            need = want - len(taken)
            fresh = self._candidates(int(need * self.SPARE) + 1, held=len(waiting)) if need > 0 else []
            offer = [c for c in waiting if id(c) not in blocked] + fresh if need > 0 else []
            codes = self._lost(taken + offer, len(taken), need)[len(taken):]
            clean = [c for c, v in zip(offer, codes) if not v]
            added, spare = clean[:need], clean[need:]
            newly = {id(c) for c, v in zip(offer, codes) if v == 2} - blocked
            blocked |= newly
            gone = {id(c) for c in added}
            taken += added
            waiting = [c for c in waiting + fresh if id(c) not in gone]
            # a candidate set aside no longer blocks the ones it beat: they may join in another round
            more = len(taken) < want and bool(added or fresh or newly)
            sizes, anyone_left, again = self._sizes(len(taken), self._left(waiting), more)
            if not again:  # what waits: the unused clean candidates first, then those that lost
                unused = {id(c) for c in spare}
                return taken, spare + [c for c in waiting if id(c) not in unused], sizes, anyone_left

    def _lost(self, cands: list, fixed: int, need: int) -> list[int]:
        """For each candidate: 0 if it lost no text to a candidate of lower priority (any rank's:
        (class, rank, index), class 0 the rows already taken, 1 each rank's first ``need`` new
        candidates, 2 the rest), 2 if it lost one to a taken row, else 1."""
        if not cands:
            self.ex.lost(np.zeros(0, np.uint64), np.zeros(0, np.int64), self.world * self.SPAN)
            return []
        hashes = text_hashes(cands, self.width)
        idx = np.arange(len(cands), dtype=np.int64)
        cls = np.where(idx < fixed, 0, np.where(idx < fixed + need, 1, 2)).astype(np.int64)
        prio = cls * (self.world * self.SPAN) + self.rank * self.SPAN + idx
        lost = self.ex.lost(hashes.reshape(-1), np.repeat(prio, hashes.shape[1]), self.world * self.SPAN)
        return lost.reshape(hashes.shape).max(axis=1).tolist()

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rank": self.rank, "world": self.world, "rows_done": self.rows_done,
                "batches_done": self.batches_done, "complete": self.complete, "short": list(self.short),
                "queue": [list(item) for item in self.queue],
                "current": [self.current.piece, self.current.position] if self.current else None,
                "shuffle": {"rng": self.shuffle.rng.getstate(), "buffer": list(self.shuffle.buffer),
                            "draining": self.shuffle.draining},
                "deferred": list(self.deferred), "batcher": {"short": list(self.short)}}


def _redeal(states: list[dict], rank: int, world: int, seed: int, epoch: int) -> dict:
    """This rank's share of what ``states`` (every rank of a run at another world size, in rank
    order) had left: the pieces not finished (each continues from its position), the rows that
    waited for a batch without a clash (deferred: they go first, as they would have) and the rows
    of the shuffle buffers, each dealt round robin. The buffers' rows go into this rank's shuffle
    buffer, to be drawn at random as before: taken in the order they were read, neighbours that
    share a text (an anchor with several positives) would clash batch after batch and close the
    batches short. Every new rank computes the same deal."""
    work = []
    for s in states:
        if s.get("current"):
            work.append(list(s["current"]))
        work += [list(item) for item in s.get("queue", [])]
    deferred = [r for s in states for r in s.get("deferred", [])]
    buffered = [r for s in states for r in s.get("shuffle", {}).get("buffer", [])]
    first = states[0]
    return {"rows_done": first.get("rows_done", 0), "batches_done": first.get("batches_done", 0),
            "short": first.get("short", [0, 0]), "complete": first.get("complete", False),
            "queue": work[rank::world], "current": None, "deferred": deferred[rank::world],
            "shuffle": {"rng": random.Random(seed * 1_000_003 + epoch * 104_729 + 31 * world + rank).getstate(),
                        "buffer": buffered[rank::world], "draining": False}}
