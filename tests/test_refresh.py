"""Hard-negative mining's parts, pinned: exact top-k against brute force, the filters over many
rows, random top-ups, the planners' renewed columns (no text twice in a batch, negatives
included), and the split search with real gloo ranks (the same result at 1, 2 and 3 ranks)."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from dist_embed.data.batching import EpochPlanner
from dist_embed.data.rows import Row
from dist_embed.mining.filters import MineOptions, choose_ids, choose_negatives, fill_at_random
from dist_embed.mining.search import Grid, Keys, embed_owned, search_split, top_k
from dist_embed.mining.tables import Renewal

from test_batching import ListCursor

SEED = random.SystemRandom().randrange(10**6)


def brute_keys(q: torch.Tensor, c: torch.Tensor, k: int) -> list[list[tuple[int, int]]]:
    """(score, id) best first, the slow obvious way: Python integers, ties to the lower id."""
    qs, cs = q.tolist(), c.tolist()
    out = []
    for row in qs:
        scored = sorted(((sum(a * b for a, b in zip(row, col)), -i) for i, col in enumerate(cs)), reverse=True)
        out.append([(s, -j) for s, j in scored[:k]])
    return out


def near_ties(rng: np.random.Generator, n: int, d: int, base: np.ndarray | None = None) -> np.ndarray:
    """Vectors with many near-ties: copies of a few directions, nudged in the last bits."""
    base = rng.standard_normal((max(n // 4, 1), d)) if base is None else base
    x = base[rng.integers(0, len(base), n)] + rng.standard_normal((n, d)) * 10.0 ** rng.integers(-9, -3, (n, 1))
    return x.astype(np.float32)


def test_exact_top_k_equals_brute_force(monkeypatch):
    """Also under TF32, which a GPU run may have switched on for training: the filtering product
    runs at full float32 (seen by a spy on the product) and the setting is restored."""
    print("seed", SEED)
    seen, real_matmul = [], torch.Tensor.__matmul__

    def spy(a, b):
        if a.dtype == torch.float32:
            seen.append(torch.get_float32_matmul_precision())
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        check_top_k_against_brute_force()
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(old)
    assert seen and set(seen) == {"highest"}, seen


def check_top_k_against_brute_force():
    rng = np.random.default_rng(SEED)
    for case in range(12):
        d, n_q, n_c = int(rng.integers(2, 40)), int(rng.integers(1, 30)), int(rng.integers(1, 120))
        base = rng.standard_normal((5 if case % 3 else 1, d))  # one direction: all near-ties (an untrained model)
        keys = Keys.for_corpus(n_c)
        q = keys.quantize(torch.from_numpy(near_ties(rng, n_q, d, base)))
        c = keys.quantize(torch.from_numpy(near_ties(rng, n_c, d, base)))
        c[rng.integers(0, n_c, n_c // 5)] = c[0].clone()  # exact ties too: the lower id wins
        k = int(rng.integers(1, n_c + 3))
        got = top_k(q, c, torch.arange(n_c), k, keys, chunk=int(rng.integers(1, 50)))
        scores, ids = keys.decode(got)
        unit = 4.0 ** keys.scale_bits
        for row, want in enumerate(brute_keys(q, c, k)):
            n = len(want)
            assert [int(i) for i in ids[row, :n]] == [i for _, i in want]
            assert np.allclose(scores[row, :n] * unit, [s for s, _ in want], rtol=0, atol=0)
            assert (ids[row, n:] == -1).all()


def test_a_collapsed_model_ranks_by_id():
    """Every embedding the same (an untrained or collapsed model): all candidates tie, the whole
    tile is scored exactly and the lowest ids win, at any chunking."""
    keys = Keys.for_corpus(500)
    c = keys.quantize(torch.ones(500, 16))
    for chunk in (7, 64, 500):
        scores, ids = keys.decode(top_k(c[:3], c, torch.arange(500), 20, keys, chunk=chunk))
        assert (ids == np.arange(20)).all() and (scores == scores[0, 0]).all()


def test_filters_over_many_rows_equal_one_row_at_a_time():
    print("seed", SEED)
    rng = random.Random(SEED)
    for _ in range(50):
        n, m, e, pad = rng.randrange(1, 8), rng.randrange(0, 30), rng.randrange(0, 4), rng.randrange(0, 3)
        ids = np.array([rng.sample(range(40), m) + [-1] * pad for _ in range(n)], dtype=np.int64).reshape(n, m + pad)
        scores = -np.sort(-np.random.default_rng(rng.randrange(99)).uniform(-1, 1, ids.shape), axis=1)
        scores[ids < 0] = -np.inf  # no candidate there
        exclude = np.array([[rng.choice([-1, rng.randrange(40)]) for _ in range(e)] for _ in range(n)],
                           dtype=np.int64).reshape(n, e)
        positive = np.array([rng.uniform(0, 1) for _ in range(n)])
        opt = MineOptions(num_negatives=rng.randrange(1, 5), range_min=rng.randrange(0, 4),
                          range_max=rng.randrange(4, 30), max_score=rng.choice([None, 0.5]),
                          min_score=rng.choice([None, -0.5]), absolute_margin=rng.choice([None, 0.1]),
                          relative_margin=rng.choice([None, 0.05]))
        texts = [f"t{i}" for i in range(40)]
        got = choose_ids(scores, ids, positive, exclude, opt)
        for r in range(n):
            valid = ids[r] >= 0
            one = choose_negatives(scores[r][valid], ids[r][valid], texts, positive[r],
                                   {texts[i] for i in exclude[r] if i >= 0}, opt)
            assert [texts[i] for i in got[r] if i >= 0] == one


def test_random_top_ups_avoid_excluded_texts_and_repeat_the_same():
    chosen = np.array([[3, -1, -1], [-1, -1, -1], [1, 2, 4]])
    exclude = np.array([[0, 1], [5, -1], [-1, -1]])
    a, b = chosen.copy(), chosen.copy()
    assert fill_at_random(a, exclude, 8, np.array([10, 11, 12])) == 2
    fill_at_random(b, exclude, 8, np.array([10, 11, 12]))
    assert (a == b).all() and (a >= 0).all() and (a[2] == [1, 2, 4]).all() and a[0, 0] == 3
    for row, ex in zip(a, exclude):
        assert len(set(row.tolist())) == 3 and not set(row.tolist()) & set(ex.tolist())


def test_planner_batches_carry_the_refreshed_negatives_with_no_text_twice():
    """Every row's negatives come from the table; a negative equal to another row's text defers
    that row; a planner restored from a state taken under the old table uses the new one."""
    print("seed", SEED)
    rng = random.Random(SEED)
    corpus = [f"p{i}" for i in range(60)]
    rows = [Row(i, (f"a{i}", corpus[i]), None) for i in range(60)]
    table = np.array([rng.sample([j for j in range(60) if j != i], 2) for i in range(60)], dtype=np.int32)
    renew = Renewal(table, corpus)

    def planner(state=None, rn=renew):
        return EpochPlanner(lambda pos: ListCursor(rows, pos), epoch=0, seed=1, shuffle=True,
                            shuffle_buffer=16, no_duplicates=True, dedup_buffer=None, global_batch=8, state=state,
                            renew=rn, make_row=lambda r: Row(int(r[0]), tuple(r[1]), r[2]))

    p, seen = planner(), []
    while (batch := p.next_batch(8)) is not None:
        texts = [t for r in batch for t in r.texts]
        assert len(texts) == len(set(texts))
        for r in batch:
            assert r.texts[2:] == tuple(corpus[j] for j in table[r.row_id])
        seen += [r.row_id for r in batch]
        if len(seen) == 24:
            saved = p.state_dict()
    assert sorted(seen) == list(range(60))
    table2 = (table + 1) % 60
    p2 = planner(saved, Renewal(table2, corpus, "neg: "))  # the negative column's prompt goes in front
    assert p2.batcher.deferred and all(r.texts[2:] == tuple("neg: " + corpus[j] for j in table2[r.row_id])
                                       for r in p2.batcher.deferred)


def _split_search(rank: int, port: int, case: dict, queue) -> None:
    """One of 3 gloo ranks: the search at world 1 (rank 0 alone), 2 and 3 (sub-groups)."""
    import torch.distributed as dist

    from dist_embed.distributed import DistState

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3)
    groups = {w: dist.new_group(list(range(w))) for w in (1, 2, 3)}
    rng = np.random.default_rng(case["seed"])
    corpus = [f"c{i}" * int(rng.integers(1, 5)) for i in range(case["n_c"])]
    anchors = [f"a{i}" * int(rng.integers(1, 5)) for i in range(case["n_a"])]
    vectors = {t: v for t, v in zip(corpus + anchors, near_ties(rng, len(corpus) + len(anchors), case["d"]))}
    positives = rng.integers(0, len(corpus), len(anchors))
    keys = Keys.for_corpus(len(corpus))

    def embed(texts):
        return torch.from_numpy(np.stack([vectors[t] for t in texts]))

    results = []
    for world in (1, 2, 3):
        out = {}
        if rank < world:
            state = DistState(rank=rank, world_size=world)
            cgrid, agrid = (Grid.for_texts(t, case["chunk"], world) for t in (corpus, anchors))
            c = embed_owned(corpus, cgrid, rank, embed, case["batch"], keys, after_round=lambda: False)
            a = embed_owned(anchors, agrid, rank, embed, case["batch"], keys)

            def pairs_of(chunk):
                members = agrid.members(chunk)
                return np.arange(len(members)), positives[members]

            found = search_split(a, agrid, c, cgrid, case["d"], case["k"], keys, state, pairs_of,
                                 group=groups[world] if world > 1 else None)
            out = {int(i): (top[j].tolist(), int(pos[j])) for chunk, (top, pos) in found.items()
                   for j, i in enumerate(agrid.members(chunk))}
        gathered = [None] * 3
        dist.all_gather_object(gathered, out)
        results.append({k: v for part in gathered for k, v in part.items()})
    if rank == 0:
        full_c, full_a = keys.quantize(embed(corpus)), keys.quantize(embed(anchors))
        queue.put((results, top_k(full_a, full_c, torch.arange(len(corpus)), case["k"], keys).tolist(),
                   keys.exact(full_a, full_c[torch.from_numpy(positives)]).tolist()))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_split_search_gives_the_same_keys_at_one_two_and_three_ranks():
    """Real gloo ranks; random sizes, chunks, batches and k (near-ties and exact ties included)."""
    import torch.multiprocessing as mp

    from dist_embed.distributed import free_port

    print("seed", SEED)
    rng = random.Random(SEED)
    case = {"seed": SEED, "n_c": rng.randrange(40, 160), "n_a": rng.randrange(20, 90), "d": rng.randrange(4, 24),
            "chunk": rng.randrange(5, 30), "batch": rng.randrange(2, 9), "k": rng.randrange(3, 25)}
    print(case)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_split_search, args=(r, port, case, queue)) for r in range(3)]
    for p in procs:
        p.start()
    results, whole, pos = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for merged in results:
        assert sorted(merged) == list(range(case["n_a"]))
        assert [merged[i][0] for i in range(case["n_a"])] == whole  # the world's lists merged = one search
        assert [merged[i][1] for i in range(case["n_a"])] == pos  # each positive scored by its holder


def test_closing_a_prefetched_stream_lets_every_ranks_producer_come_to_rest():
    """A refresh closes each rank's batch stream and opens a new one from the consumed position.
    Planning a batch can be a collective between the ranks' producers (the sharded plane's
    exchange): simulated here by a barrier per item, with rank 1 slow after it (tokenizing). The
    streams are closed after the same number of batches; every producer must have entered as many
    collectives as its peer (else one waits forever and the next stream's collectives pair wrongly)."""
    import threading
    import time as _time

    from dist_embed.data.loader import prefetch

    collective = threading.Barrier(2, timeout=20)
    entered = [0, 0]

    def items(rank):
        for i in range(100):
            entered[rank] += 1
            collective.wait()
            if rank == 1:
                _time.sleep(0.3)  # the slow part comes after the collective
            yield i

    step = threading.Barrier(2, timeout=20)  # the training step: consumers move in lockstep

    def consume(rank, out):
        stream = prefetch(items(rank), depth=2, settle_s=15)
        out[rank] = [next(stream) for _ in range(3)]
        step.wait()
        stream.close()

    got = [None, None]
    threads = [threading.Thread(target=consume, args=(r, got)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    _time.sleep(0.5)
    assert got == [[0, 1, 2], [0, 1, 2]]
    assert entered[0] == entered[1] and not collective.n_waiting, entered


@pytest.mark.parametrize("override,fragment", [
    ("data.hard_negatives={range_min: 5, range_max: 2}", "range_min 5 >= range_max 2"),
    ("data.hard_negatives={datasets: [nope]}", "['nope'] not among the data sets"),
    ("data.hard_negatives={relative_margin: 1.5}", "relative_margin"),
    ("data.hard_negatives={num_negatives: 0}", "num_negatives"),
])
def test_bad_hard_negative_settings_name_the_key(tmp_path, override, fragment):
    from dist_embed.config import ConfigError, load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\ndata:\n  train: x.jsonl\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, [override])
    print(e.value)
    assert fragment in str(e.value) and "hard_negatives" in str(e.value)


def test_hard_negatives_need_a_loss_that_takes_negatives(tmp_path):
    from dist_embed.config import ConfigError, load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\ndata:\n  train: x.jsonl\n  hard_negatives: {{}}\n")
    for override, fragment in (("loss.name=cosine", "no data set to mine for"),
                               ("loss.name=triplet", None)):
        if fragment is None:
            assert load_config(cfg, [override]).data.hard_negatives.num_negatives == 1
            with pytest.raises(ConfigError, match="the triplet loss, which takes one negative"):
                load_config(cfg, [override, "data.hard_negatives.num_negatives=2"])
        else:
            with pytest.raises(ConfigError, match=fragment):
                load_config(cfg, [override])
