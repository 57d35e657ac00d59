"""The sharded data plane: pieces read exactly the rows of their files; ranks planning only their
share give every row once per epoch with no text twice in a global batch, the same batches again
for the same seed and world size, and exact resume at the same or another world size.

In-process tests run the ranks as threads over a thread exchange (the collectives' semantics
without processes); the training tests use real gloo ranks. Draws come from a printed seed
(DIST_EMBED_FUZZ_SEED replays one)."""
from __future__ import annotations

import json
import os
import random
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dist_embed.data.loader import PlanSpec
from dist_embed.data.pieces import PieceSource, merge_counts, scan_counts
from dist_embed.data.readers import Source
from dist_embed.data.rows import Row, Schema
from dist_embed.data.batching import split_sizes
from dist_embed.data.sharded import LocalExchange, ReadAhead, ShardedPlanner, Sharding, first_wins, sharded_planner

from conftest import quick_triplets, write_jsonl

SEED = int(os.environ.get("DIST_EMBED_FUZZ_SEED", random.randrange(10**6)))


class ThreadExchange:
    """The collectives of the sharded plane between threads: every rank's call meets the others'."""

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def for_rank(self, rank: int):
        ex = self

        class View:
            def __init__(self):
                self.rank, self.world = rank, ex.world

            def _all(self, value):
                ex.slots[rank] = value
                ex.barrier.wait()
                got = list(ex.slots)
                ex.barrier.wait()
                return got

            def lost(self, hashes, priority, fixed_below=None):
                parts = self._all((hashes, priority))
                lost = first_wins(np.concatenate([h for h, _ in parts]), np.concatenate([p for _, p in parts]),
                                  fixed_below)
                start = sum(len(h) for h, _ in parts[:rank])
                return lost[start:start + len(hashes)]

            def gather(self, values):
                return self._all(tuple(values))

        return View()


def corpus(n: int, rng: random.Random, repeats: float = 0.15) -> list[dict]:
    """Triplets, some repeating a text of an earlier row (what no-duplicates must keep apart)."""
    base = quick_triplets()
    rows = []
    for i in range(n):
        r = {k: f"{v} #{i}" for k, v in base[i % len(base)].items()}
        if rows and rng.random() < repeats:
            r[rng.choice(["anchor", "positive", "negative"])] = rng.choice(list(rng.choice(rows).values()))
        rows.append(r)
    return rows


def spec_for(path: Path, global_batch: int, no_duplicates: bool = True, shuffle_buffer: int = 50,
             dedup_buffer: int | None = None) -> PlanSpec:
    return PlanSpec(Source(str(path)), Schema.for_loss("mnrl"), {}, "raise", 11, global_batch, True, shuffle_buffer,
                    no_duplicates, dedup_buffer, plane="sharded")


def scale_shaped(n: int, rng: random.Random) -> list[dict]:
    """Rows as the scale corpus has them: an anchor with 1-4 positives in consecutive rows."""
    pool = [t for r in quick_triplets() for t in r.values()]
    rows = []
    while len(rows) < n:
        anchor = rng.choice(pool)
        for _ in range(min(rng.choice((1, 1, 2, 2, 3, 4)), n - len(rows))):
            pos, neg = rng.sample(pool, 2)
            rows.append({"anchor": anchor, "positive": pos, "negative": neg})
    return rows


def assert_full_slices(out, batch: int, note: str, no_duplicates: bool = True) -> None:
    """Global batches are full while rows can fill them: a rank's slice is short of its share only
    when every row the rank trains later in the epoch repeats a text of that global batch (without
    no-duplicates: when it trains no later row at all)."""
    world = len(out)
    share = split_sizes(batch, world)
    for s in range(len(out[0])):
        texts = {t for o in out for row in o[s][0] for t in row.texts}
        for r, o in enumerate(out):
            if len(o[s][0]) < share[r]:
                later = [row for b, _ in o[s + 1:] for row in b]
                free = [row.row_id for row in later if not no_duplicates or texts.isdisjoint(row.texts)]
                assert not free, (note, f"step {s}, rank {r}: {len(o[s][0])} of {share[r]} rows, though "
                                        f"rows {free[:5]} could have joined")


def write_format(tmp_path: Path, fmt: str, rows: list[dict], rng: random.Random) -> Path:
    """``rows`` as a data set of format ``fmt`` (small row groups and blocks: many pieces)."""
    path = tmp_path / f"t.{fmt}"
    if fmt.startswith("jsonl"):
        write_jsonl(path, rows)
    elif fmt == "tsv":  # quoting off: the texts as they are (they hold no tabs)
        path.write_text("anchor\tpositive\tnegative\n" + "".join(
            f"{r['anchor']}\t{r['positive']}\t{r['negative']}\n" for r in rows))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["anchor", "positive", "negative"])
            for r in rows:
                w.writerow([r["anchor"], r["positive"], r["negative"]])
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=rng.randrange(30, 200))
    elif fmt == "hf":  # a Hugging Face dataset saved with save_to_disk (the hub code path, offline)
        import datasets

        path = tmp_path / "hf"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        from conftest import run_cli

        src = write_jsonl(tmp_path / "src.jsonl", rows)
        path = tmp_path / "shards"
        assert run_cli("prepare-data", src, "--out", path, "--shard-rows", rng.randrange(100, 300),
                       "--block-rows", rng.randrange(16, 64)).returncode == 0
    return path


def pieces_of(spec: PlanSpec, world: int):
    src = PieceSource(spec)
    cut = src.cut(world)
    table, valid, _ = merge_counts(src, cut, scan_counts(src, cut, 0, 1, lambda x: [x]), world, 1.0)
    return src, table, valid


def run_ranks(spec, src, table, world, batch, epoch=0, states=None, steps=None, readers=None):
    """Every rank's slices, batch by batch (and each rank's state after the last), as threads;
    ``readers``: each rank's ``ReadAhead`` (None: pieces read in the rank's own thread)."""
    ex = ThreadExchange(world)
    out = [[] for _ in range(world)]
    final = [None] * world
    errors = []

    def rank_main(r):
        try:
            sharding = Sharding([src], [table], [src.width()], ex.for_rank(r), old_states=states,
                                reader=readers[r] if readers else None)
            same = states is not None and states[0].get("world") == world
            st = None if states is None else states[r] if same else states[0]
            planner = sharded_planner(spec, sharding, 0, epoch, st, 0, lambda x: Row(int(x[0]), tuple(x[1]), x[2]))
            while steps is None or len(out[r]) < steps:
                b = planner.next_batch(batch)
                if b is None:
                    break
                out[r].append((list(b), list(b.sizes)))
                final[r] = planner.state_dict()
        except Exception as e:  # surfaced below
            errors.append(e)
            ex.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out, final


def test_first_wins_defers_every_later_occurrence():
    h = np.array([5, 7, 5, 9, 7, 7], dtype=np.uint64)
    p = np.array([3, 0, 1, 2, 0, 4], dtype=np.int64)
    assert first_wins(h, p).tolist() == [True, False, False, False, False, True]


def test_a_row_beaten_only_by_a_row_set_aside_joins_the_batch(tmp_path):
    """A chain of clashes: row 0 is taken; rows 1 and 2 lost a text to it; row 3 lost only to row 2.
    Once row 2 is set aside, row 3 joins the batch (it used to wait for the next one, leaving a
    batch short at an epoch's end: found by the drill, seed 12854299 case 2)."""
    rows = [{"anchor": "a1", "positive": "p1", "negative": "n1"}, {"anchor": "a1", "positive": "p2", "negative": "n2"},
            {"anchor": "a2", "positive": "p1", "negative": "n3"}, {"anchor": "a2", "positive": "p4", "negative": "n4"}]
    spec = spec_for(write_jsonl(tmp_path / "t.jsonl", rows), 4, shuffle_buffer=1)
    src, table, _ = pieces_of(spec, 1)
    out, _ = run_ranks(spec, src, table, 1, 4)
    assert [[r.row_id for r in b] for b, _ in out[0]] == [[0, 3], [1, 2]]
    assert_full_slices(out, 4, "chain")


@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "csv", "parquet", "jsonl.gz", "shards", "hf"])
def test_pieces_hold_exactly_the_files_rows_with_their_ids(tmp_path, fmt):
    rng = random.Random(SEED)
    rows = corpus(rng.randrange(300, 900), rng, 0.0)
    path = write_format(tmp_path, fmt, rows, rng)
    spec = spec_for(path, 16)
    world = rng.randrange(1, 40)  # small pieces, many of them
    src, table, valid = pieces_of(spec, world)
    assert valid == len(rows)
    got = []
    for piece in table:
        got += [(r.row_id, r.texts) for r in src.rows(piece, None, {})]
    expect = [(i, (r["anchor"], r["positive"], r["negative"])) for i, r in enumerate(rows)]
    assert sorted(got) == expect, f"seed {SEED} {fmt} world {world}"
    for i, piece in enumerate(table):  # a piece read from inside (a resume) gives the rest of it
        whole = [(r.row_id, r.texts) for r in src.rows(piece, None, {})]
        # every piece from a random point; the first and last also from their ends (nothing left)
        for cut in {rng.randrange(len(whole) + 1)} | ({len(whole)} if i in (0, len(table) - 1) else set()):
            at: dict = {}
            it = iter(src.rows(piece, None, at))
            first = [next(it) for _ in range(cut)]
            rest = list(src.rows(piece, dict(at), {}))
            assert [(r.row_id, r.texts) for r in first + rest] == whole, f"seed {SEED} {fmt} {piece} after {cut}"


@pytest.mark.parametrize("case", range(6))
def test_ranks_plan_every_row_once_with_no_text_twice_in_a_global_batch(tmp_path, case):
    rng = random.Random(SEED * 10 + case)
    world, batch = rng.randrange(1, 5), rng.randrange(4, 24)
    rows = corpus(rng.randrange(100, 600), rng)
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    spec = spec_for(path, batch, no_duplicates=rng.random() < 0.8, shuffle_buffer=rng.choice([1, 20, 200]))
    src, table, _ = pieces_of(spec, world)
    note = f"seed {SEED} case {case}: world {world}, batch {batch}, rows {len(rows)}, dedup {spec.no_duplicates}"
    out, _ = run_ranks(spec, src, table, world, batch)
    steps = len(out[0])
    assert all(len(o) == steps for o in out), note  # every rank takes every step: none hangs
    assert_full_slices(out, batch, note, spec.no_duplicates)
    seen = []
    for s in range(steps):
        sizes = out[0][s][1]
        assert all(o[s][1] == sizes for o in out) and all(len(o[s][0]) == sizes[r] for r, o in enumerate(out)), note
        global_rows = [row for o in out for row in o[s][0]]
        assert 0 < len(global_rows) <= batch, note
        if spec.no_duplicates:
            texts = [t for row in global_rows for t in set(row.texts)]
            assert len(texts) == len(set(texts)), (note, s)
        seen += [row.row_id for row in global_rows]
    assert Counter(seen) == Counter(range(len(rows))), note
    again, _ = run_ranks(spec, src, table, world, batch)  # the same seed, data and world: the same batches
    assert ids(again) == ids(out)


def ids(out) -> list:
    return [[[r.row_id for r in b] for b, _ in o] for o in out]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "shards"])
def test_reader_processes_give_the_very_same_batches_states_and_resume(tmp_path, fmt):
    """A rank's pieces read ahead by its own processes: the batches and saved states of reading
    in the planner's thread, a resume from such a state continues them, and the reading really
    happened in other processes."""
    rng = random.Random(SEED * 1000 + len(fmt))
    world, batch = rng.randrange(1, 4), rng.randrange(4, 16)
    rows = corpus(rng.randrange(300, 900), rng)
    spec = spec_for(write_format(tmp_path, fmt, rows, rng), batch)
    src, table, _ = pieces_of(spec, 4 * world)
    note = f"seed {SEED} {fmt}: world {world}, batch {batch}, rows {len(rows)}, pieces {len(table)}"
    plain, plain_states = run_ranks(spec, src, table, world, batch)
    readers = [ReadAhead([src], rng.choice([1, 2])) for _ in range(world)]
    ahead, ahead_states = run_ranks(spec, src, table, world, batch, readers=readers)
    assert ids(ahead) == ids(plain) and ahead_states == plain_states, note
    assert all(r.pids and os.getpid() not in r.pids for r in readers), note
    stop = rng.randrange(1, len(plain[0]))
    first, states = run_ranks(spec, src, table, world, batch, steps=stop, readers=readers)
    rest, _ = run_ranks(spec, src, table, world, batch, states=states, readers=readers)
    assert [a + b for a, b in zip(ids(first), ids(rest))] == ids(plain), note
    for r in readers:
        r.pool.shutdown()


def test_reader_processes_end_with_their_rank(tmp_path):
    """A rank that ends with ``os._exit`` (as workers do) or is killed takes its reader processes
    with it: nothing keeps its output pipes open (a launcher reading them would wait forever)."""
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "t.jsonl", corpus(600, random.Random(SEED), 0.0))
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_sharded import pieces_of, spec_for, ReadAhead
from pathlib import Path
src, table, _ = pieces_of(spec_for(Path({str(path)!r}), 16), 4)
reader = ReadAhead([src], 2)
assert len(list(reader.rows(0, table, 0, None, {{}}, [(1, None), (2, None)]))) > 0
print(*reader.pids, flush=True)
os._exit(0)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr[-2000:]
    pids = [int(p) for p in r.stdout.split()]
    assert pids
    for pid in pids:  # gone (or a zombie of init's, reaped soon)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.parametrize("case", range(4))
def test_resume_at_the_same_or_another_world_size_trains_every_row_once(tmp_path, case):
    rng = random.Random(SEED * 100 + case)
    world, batch = rng.randrange(1, 5), rng.randrange(4, 16)
    rows = corpus(rng.randrange(150, 500), rng)
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    spec = spec_for(path, batch)
    src, table, _ = pieces_of(spec, world)
    full, _ = run_ranks(spec, src, table, world, batch)
    stop = rng.randrange(1, len(full[0]))
    first, states = run_ranks(spec, src, table, world, batch, steps=stop)
    states = [json.loads(json.dumps(s)) for s in states]  # as a checkpoint keeps them
    same, _ = run_ranks(spec, src, table, world, batch, states=states)
    assert [[[r.row_id for r in b] for b, _ in o] for o in same] == \
        [[[r.row_id for r in b] for b, _ in o[stop:]] for o in full], f"seed {SEED} case {case}"
    other = rng.choice([w for w in range(1, 5) if w != world] or [world])
    spec2 = spec_for(path, batch // world * other or other)
    rest, _ = run_ranks(spec2, src, table, other, spec2.global_batch, states=states)
    ids = [r.row_id for o in first for b, _ in o for r in b] + [r.row_id for o in rest for b, _ in o for r in b]
    assert Counter(ids) == Counter(range(len(rows))), f"seed {SEED} case {case}: {world} -> {other} ranks"
    assert_full_slices(rest, spec2.global_batch, f"seed {SEED} case {case}: {world} -> {other} ranks")


@pytest.mark.parametrize("fmt", ["jsonl", "shards"])
def test_a_resume_at_another_world_size_keeps_global_batches_full(tmp_path, fmt):
    """2 ranks stopped mid-epoch, 3 resume: their buffered rows are dealt into the new ranks' shuffle
    buffers (taken in reading order, an anchor's consecutive rows clashed batch after batch: global
    batches of 15-23 rows instead of 24, and a step budget that trained fewer rows)."""
    rng = random.Random(SEED)
    rows = scale_shaped(3000, rng)
    path = write_format(tmp_path, fmt, rows, rng)
    spec2, spec3 = spec_for(path, 16, shuffle_buffer=400), spec_for(path, 24, shuffle_buffer=400)
    src, table, _ = pieces_of(spec2, 2)
    first, states = run_ranks(spec2, src, table, 2, 16, steps=6)
    states = [json.loads(json.dumps(s)) for s in states]
    rest, _ = run_ranks(spec3, src, table, 3, 24, states=states, steps=40)
    sizes = [sum(len(o[s][0]) for o in rest) for s in range(len(rest[0]))]
    assert sizes == [24] * 40, f"seed {SEED}, {fmt}: {sizes}"
    assert_full_slices(rest, 24, f"seed {SEED}, {fmt}")


def test_a_rank_reads_only_its_pieces(tmp_path, monkeypatch):
    rows = corpus(400, random.Random(SEED), 0.0)
    spec = spec_for(write_jsonl(tmp_path / "t.jsonl", rows), 16)
    src, table, _ = pieces_of(spec, 4)
    opened = {r: set() for r in range(4)}
    real = src.rows

    def watched(rank):
        def rows(piece, position, at):
            opened[rank].add(table.index(piece))
            return real(piece, position, at)
        return rows

    for rank in range(4):
        planner = ShardedPlanner(table, watched(rank), LocalExchange(rank, 4), epoch=0, seed=1, shuffle=True,
                                 shuffle_buffer=10, no_duplicates=False, dedup_buffer=None, global_batch=16,
                                 width=3, total_rows=None)
        while planner.next_batch(16) is not None:
            pass
    assert all(opened[a].isdisjoint(opened[b]) for a in range(4) for b in range(a + 1, 4))
    assert set().union(*opened.values()) == set(range(len(table)))


# ---------------------------------------------------------------------------------------------
# real gloo ranks


def _exchange_rank(rank: int, world: int, init: str, seed: int, out) -> None:
    import torch.distributed as dist

    from dist_embed.data.sharded import GlooExchange

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rng = np.random.default_rng(seed * 10 + rank)
    results = []
    for round_ in range(3):
        cands = int(rng.integers(0, 30))  # a rank may have nothing to propose
        per = rng.integers(1, 4, cands)  # texts per candidate
        hashes = rng.integers(1, 60, int(per.sum()), dtype=np.uint64)  # few values: many clashes
        prio = np.repeat(rank * 1000 + np.arange(cands, dtype=np.int64), per)
        ex = GlooExchange(None, rank, world)
        results.append((hashes, prio, ex.lost(hashes, prio), ex.gather((cands, rank)), cands))
    out.put((rank, results))
    out.close()
    out.join_thread()  # the queue's pipe written before the hard exit
    dist.barrier()
    os._exit(0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_gloo_exchange_marks_what_one_rank_holding_everything_would(tmp_path, world):
    """Each rank sends its hashes to their owners and gets its verdicts back: the same as
    ``first_wins`` over every rank's entries at once, whatever the world size."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_exchange_rank, args=(r, world, str(tmp_path / "init"), SEED, q)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(60)
    for round_ in range(3):
        parts = [got[r][round_] for r in range(world)]
        expect = first_wins(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        assert np.concatenate([p[2] for p in parts]).tolist() == expect.tolist(), f"seed {SEED}"
        assert all(p[3] == [(q[4], r) for r, q in enumerate(parts)] for p in parts), f"seed {SEED}"


@pytest.mark.slow
def test_one_two_and_three_ranks_train_every_row_once_and_resume_across_world_sizes(tmp_path, tiny_model):
    """Real training on the sharded plane (gloo ranks): at 1, 2 and 3 ranks every row once per
    epoch and no text twice in a global batch; a 2-rank run resumed mid-epoch by 2 ranks continues
    the very same batches (its pieces read ahead by reader processes, its batches planned in a
    prefetch thread, as on a GPU), by 3 ranks the rest of the epoch, each row once."""
    from conftest import run_cli, tiny_config
    from test_distributed import read_row_log

    rng = random.Random(SEED)
    rows = corpus(rng.randrange(300, 450), rng, 0.2)
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = tiny_config(tmp_path, tiny_model, data, data={"no_duplicates": True, "plane": "sharded",
                                                        "shuffle_buffer": 32},
                      training={"max_steps": -1, "batch_size": 12}, checkpoint={"steps": 1, "keep_last": 1000},
                      model={"dropout": None})
    env = {"DIST_EMBED_LOG_ROW_IDS": "1"}

    def train(name, world, *args):
        out = tmp_path / name
        r = run_cli("train", cfg, f"output_dir={out}", "--nproc", world, f"training.batch_size={36 // world}",
                    *args, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("read ahead by 1 process" in r.stderr) == ("data.read_workers=1" in args), r.stderr[-3000:]
        logs = read_row_log(out)
        assert len({len(v) for v in logs.values()}) == 1  # every rank took every step
        steps = [[i for r in sorted(logs) for i in logs[r][s]["rows"]] for s in range(len(logs[0]))]
        for ids in steps:
            texts = [t for i in ids for t in set(rows[i].values())]
            assert len(texts) == len(set(texts)), f"seed {SEED}: {name}"
        return steps

    for world in (1, 3):
        steps = train(f"w{world}", world)
        assert sorted(i for s in steps for i in s) == list(range(len(rows))), f"seed {SEED}: world {world}"
    two = train("w2", 2)
    assert sorted(i for s in two for i in s) == list(range(len(rows))), f"seed {SEED}: world 2"
    stop = rng.randrange(1, len(two) - 1)
    ckpt = tmp_path / "w2" / "checkpoints" / f"step-{stop}"
    # read ahead by a process per rank; planned (the gloo exchange included), tokenized by a loader
    # worker and handed over in a background thread while the training thread runs its collectives
    same = train("again2", 2, "--resume", ckpt, "data.read_workers=1", "data.prefetch=true", "data.num_workers=1")
    assert same == two[stop:], f"seed {SEED}: stop {stop}"
    other = train("then3", 3, "--resume", ckpt)
    assert sorted(i for s in two[:stop] + other for i in s) == list(range(len(rows))), f"seed {SEED}: stop {stop}"


@pytest.mark.slow
def test_two_ranks_share_a_hugging_face_dataset_by_index(tmp_path, tiny_model):
    """A Hugging Face dataset in local Arrow files is cut by row index: each rank reads its rows."""
    import datasets

    from conftest import run_cli, tiny_config
    from test_distributed import read_row_log

    rng = random.Random(SEED + 3)
    rows = corpus(rng.randrange(150, 260), rng, 0.2)
    path = tmp_path / "hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    cfg = tiny_config(tmp_path, tiny_model, path, data={"no_duplicates": True, "plane": "sharded"},
                      training={"max_steps": -1, "batch_size": 8})
    out = tmp_path / "run"
    r = run_cli("train", cfg, f"output_dir={out}", "--nproc", 2, env={"DIST_EMBED_LOG_ROW_IDS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sharded data plane" in r.stderr
    logs = read_row_log(out)
    assert sorted(i for recs in logs.values() for rec in recs for i in rec["rows"]) == list(range(len(rows)))


@pytest.mark.parametrize("case", range(3))
def test_max_rows_and_skipped_rows_count_across_ranks(tmp_path, case):
    """``data.max_rows`` keeps the data set's first rows whichever ranks hold them; with
    ``on_error: skip`` bad rows in any rank's pieces are skipped and counted once, in total."""
    rng = random.Random(SEED * 7 + case)
    rows = corpus(rng.randrange(200, 500), rng, 0.0)
    lines = [json.dumps(r) for r in rows]
    bad = sorted(rng.sample(range(len(lines)), rng.randrange(1, 6)))
    for i in bad:
        lines[i] = rng.choice(['{"anchor": "a", "positive": null}', "{not json", '{"anchor": ""}'])
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    limit = rng.choice([None, rng.randrange(50, len(rows))])
    world, batch = rng.randrange(1, 5), rng.randrange(4, 16)
    spec = PlanSpec(Source(str(path), max_rows=limit), Schema.for_loss("mnrl"), {}, "skip", 11, batch, True, 30,
                    True, None, plane="sharded")
    src = PieceSource(spec)
    cut = src.cut(world)
    counts = [None] * len(cut)
    for r in range(world):  # each rank counts its pieces; the merge sees every count once
        for i, c in {i: src.count(p) for i, p in enumerate(cut) if i % world == r}.items():
            counts[i] = c
    table, valid, skips = merge_counts(src, cut, counts, world, 1.0)
    kept = [i for i in range(limit or len(rows)) if i not in bad]
    note = f"seed {SEED} case {case}: world {world}, limit {limit}, bad {bad}"
    assert valid == len(kept), note
    assert skips.total == len(bad), note  # counted over the whole file (the limit cuts training, not the scan)
    out, _ = run_ranks(spec, src, table, world, batch)
    assert sorted(r.row_id for o in out for b, _ in o for r in b) == kept, note
