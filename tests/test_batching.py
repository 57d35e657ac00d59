"""Global batch planning: de-duplication, exactly-once, independence from the world size, resume."""
import random
from collections import Counter

import pytest

from dist_embed.data.batching import (balanced_order, buffered_shuffle, no_duplicate_batches, plan_epoch,
                                      rank_slice, split_sizes)
from dist_embed.data.readers import Row


def make_rows(n, vocab=50, seed=0):
    rng = random.Random(seed)
    return [Row(i, tuple(f"t{rng.randrange(vocab)}" for _ in range(3)), None) for i in range(n)]


def plan(rows, G, segments=(), nodup=True, epoch=0, buf=None):
    return list(plan_epoch(lambda: iter(rows), epoch=epoch, seed=3, global_batch=G, shuffle=True,
                           shuffle_buffer=17, no_duplicates=nodup, dedup_buffer=buf, segments=segments))


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


@pytest.mark.parametrize("nodup", [True, False])
def test_resume_same_batch_size_continues_the_same_sequence(nodup):
    rows = make_rows(300)
    full = plan(rows, 16, nodup=nodup)
    assert plan(rows, 16, segments=[(16, 5)], nodup=nodup) == full[5:]


def test_resume_with_other_batch_size_neither_repeats_nor_loses_rows():
    rows = make_rows(300)
    first = plan(rows, 16)[:5]
    rest = plan(rows, 24, segments=[(16, 5)])
    ids = [r.row_id for b in first + rest for r in b]
    assert Counter(ids) == Counter(range(300))
    # and a second change of size, resumed again
    second = rest[:3]
    tail = plan(rows, 8, segments=[(16, 5), (24, 3)])
    ids = [r.row_id for b in first + second + tail for r in b]
    assert sorted(ids) == list(range(300))
    # resuming with the size of the last segment continues that segment
    assert plan(rows, 24, segments=[(16, 5), (24, 3)]) == rest[3:]
