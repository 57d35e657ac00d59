"""Global batch planning: de-duplication, exactly-once, independence from the world size, resume."""
import random
from collections import Counter

import pytest

import json

from dist_embed.data.batching import (EpochPlanner, balanced_order, buffered_shuffle, no_duplicate_batches,
                                      rank_slice, split_sizes)
from dist_embed.data.rows import Row


def make_rows(n, vocab=50, seed=0):
    rng = random.Random(seed)
    return [Row(i, tuple(f"t{rng.randrange(vocab)}" for _ in range(3)), None) for i in range(n)]


class ListCursor:
    """Rows of a list from a position: the RowCursor a reader gives the planner."""

    def __init__(self, rows, position):
        self.rows, self.i = rows, (position or {}).get("i", 0)

    @property
    def position(self):
        return {"i": self.i}

    def __iter__(self):
        return self

    def __next__(self):
        if self.i >= len(self.rows):
            raise StopIteration
        self.i += 1
        return self.rows[self.i - 1]


def planner(rows, G, nodup=True, epoch=0, buf=None, state=None, shuffle_buffer=17):
    return EpochPlanner(lambda pos: ListCursor(rows, pos), epoch=epoch, seed=3, shuffle=True,
                        shuffle_buffer=shuffle_buffer, no_duplicates=nodup, dedup_buffer=buf, global_batch=G,
                        make_row=lambda r: r if isinstance(r, Row) else Row(r[0], tuple(r[1]), r[2]), state=state)


def drain(p, G):
    out = []
    while (b := p.next_batch(G)) is not None:
        out.append(b)
    return out


def plan(rows, G, nodup=True, epoch=0, buf=None):
    return drain(planner(rows, G, nodup, epoch, buf), G)


def test_shuffle_is_a_permutation_and_seeded():
    a = list(buffered_shuffle(range(1000), 50, random.Random(1)))
    assert sorted(a) == list(range(1000)) and a != list(range(1000))
    assert a == list(buffered_shuffle(range(1000), 50, random.Random(1)))


def test_no_duplicates_within_batches_and_every_row_once():
    rows = make_rows(2000, vocab=300)
    batches = list(no_duplicate_batches(rows, 32, lambda r: r.texts, max_deferred=200))
    for b in batches:
        texts = [t for r in b for t in set(r.texts)]
        assert len(texts) == len(set(texts))
    assert sorted(r.row_id for b in batches for r in b) == list(range(2000))


def test_deferral_is_bounded_and_never_drops():
    # every row shares the text "same": at most one per batch; the buffer bounds memory
    rows = [Row(i, ("same", f"u{i}"), None) for i in range(50)]
    batches = list(no_duplicate_batches(rows, 8, lambda r: r.texts, max_deferred=5))
    assert all(len(b) == 1 for b in batches)
    assert [r.row_id for b in batches for r in b] == list(range(50))


def test_a_row_repeating_its_own_text_is_allowed():
    rows = [Row(0, ("x", "x"), None), Row(1, ("y", "z"), None)]
    assert [len(b) for b in no_duplicate_batches(rows, 2, lambda r: r.texts, 4)] == [2]


def test_split_sizes_and_slices_cover_the_batch():
    assert split_sizes(10, 4) == [3, 3, 2, 2] and split_sizes(1, 2) == [1, 0]
    batch = list(range(10))
    assert sum((list(rank_slice(batch, r, 4)) for r in range(4)), []) == batch


def test_balanced_order_deals_out_long_rows_and_keeps_slice_sizes():
    import random

    # contiguous slices would give rank 0 both long rows
    assert balanced_order([10, 9, 1, 1, 1, 1], 2) == [0, 3, 5, 1, 2, 4]
    rng = random.Random(0)
    spread = {"contiguous": [], "balanced": []}
    for n, world in ((64, 2), (33, 4), (5, 8), (256, 8)):
        for _ in range(20):
            costs = [rng.randint(20, 400) for _ in range(n)]
            order = balanced_order(costs, world)
            assert sorted(order) == list(range(n))
            sizes = split_sizes(n, world)
            for orders, name in ((order, "balanced"), (list(range(n)), "contiguous")):
                loads = [sum(costs[i] for i in rank_slice(orders, r, world)) for r in range(world)]
                spread[name].append(max(loads) - min(loads))
            for r in range(world):
                mine = rank_slice(order, r, world)
                assert len(mine) == sizes[r] and list(mine) == sorted(mine)  # batch order kept per rank
    assert sum(spread["balanced"]) < 0.2 * sum(spread["contiguous"])


def test_plan_depends_on_global_batch_not_world_size():
    rows = make_rows(300)
    g = plan(rows, 16)
    # world 1 x 16 vs world 2 x 8 vs world 4 x 4: same global batches, contiguous slices
    for world in (1, 2, 4):
        rebuilt = [sum((list(rank_slice(b, r, world)) for r in range(world)), []) for b in g]
        assert rebuilt == g
    assert plan(rows, 16, epoch=1) != g  # a new order every epoch


def saved(p) -> dict:
    """The planner state as a checkpoint stores it (through JSON)."""
    return json.loads(json.dumps(p.state_dict()))


@pytest.mark.parametrize("nodup", [True, False])
def test_resume_same_batch_size_continues_the_same_sequence(nodup):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    rows = make_rows(rng.randint(1, 400), vocab=rng.randint(5, 300), seed=seed)
    G = rng.randint(1, 40)
    full = plan(rows, G, nodup=nodup)
    stop = rng.randint(0, len(full))
    p = planner(rows, G, nodup)
    for _ in range(stop):
        p.next_batch(G)
    resumed = drain(planner(rows, G, nodup, state=saved(p)), G)
    assert resumed == full[stop:], f"seed {seed}"


@pytest.mark.parametrize("case", range(20))
def test_resume_with_other_batch_sizes_neither_repeats_nor_loses_rows(case):
    """Random stops and random new global batch sizes (world-size changes), several in a row."""
    seed = random.randrange(10**6) + case
    rng = random.Random(seed)
    rows = make_rows(rng.randint(1, 300), vocab=rng.randint(3, 200), seed=seed)
    nodup = rng.random() < 0.7
    ids, state, G = [], None, rng.randint(1, 32)
    for _ in range(rng.randint(1, 4)):
        p = planner(rows, G, nodup, state=state, buf=rng.choice([None, 2, 8]))
        for _ in range(rng.randint(0, 10)):
            b = p.next_batch(G)
            if b is None:
                break
            if nodup:
                texts = [t for r in b for t in set(r.texts)]
                assert len(texts) == len(set(texts)), f"seed {seed}"
            ids += [r.row_id for r in b]
        state, G = saved(p), rng.randint(1, 32)
    p = planner(rows, G, nodup, state=state)
    ids += [r.row_id for b in drain(p, G) for r in b]
    assert Counter(ids) == Counter(range(len(rows))), f"seed {seed}"


def test_planner_state_is_small_and_independent_of_the_position():
    """O(1) resume: the saved state holds the buffers, never the rows already trained."""
    rows = make_rows(5000, vocab=4000)
    p = planner(rows, 16, shuffle_buffer=50)
    sizes = []
    for i in range(300):
        p.next_batch(16)
        if i in (10, 299):
            sizes.append(len(json.dumps(p.state_dict())))
    assert sizes[1] < 1.5 * sizes[0]


def test_resume_with_other_plan_settings_loses_no_row():
    """--allow-data-change with shuffle / no-duplicates / buffer sizes changed mid-epoch."""
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    rows = make_rows(400, vocab=60, seed=seed)
    ids, state = [], None
    for _ in range(5):
        shuffle, nodup, size = rng.random() < 0.5, rng.random() < 0.5, rng.randint(1, 40)
        p = EpochPlanner(lambda pos: ListCursor(rows, pos), epoch=0, seed=3, shuffle=shuffle,
                         shuffle_buffer=rng.randint(1, 50), no_duplicates=nodup, dedup_buffer=rng.randint(1, 20),
                         global_batch=size, make_row=lambda r: Row(r[0], tuple(r[1]), r[2]), state=state)
        for _ in range(rng.randint(0, 8)):
            b = p.next_batch(size)
            ids += [r.row_id for r in b or []]
        state = saved(p)
    ids += [r.row_id for b in drain(planner(rows, 16, state=state), 16) for r in b]
    assert Counter(ids) == Counter(range(400)), f"seed {seed}"
