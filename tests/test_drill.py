"""A randomized drill of the distributed core: random shapes, world sizes, losses and stop points.

Each case draws (from a seed printed on failure; set DIST_EMBED_DRILL_SEED to replay one) a world
size 1-3, a per-rank batch, a row count (fewer rows than ranks and a tail of one row included),
2-4 columns, a loss, dropout on/off, grad_accum, no-duplicates on/off, one data set or a mix of
two (the rows cut in two files, proportional sampler), the data plane (global, or
sharded: each rank reads its pieces, often all on one rank here, the hardest tail) and a stop
step, then checks:

- no hang: every run ends well inside a hard timeout (the process group gives up after 20 s);
- every row exactly once (per epoch) in the chain of steps that made the final weights;
- with no-duplicates, no text twice in any global batch (across ranks);
- global batches are full while rows can fill them (on the sharded plane: each rank's slice), at the
  start, after a resume and after a resume at another world size alike (one case in every draw is
  the sharded plane with no-duplicates resumed at another world size);
- resuming at the stop step gives the uninterrupted run's losses and weights (dropout on too);
- resuming at another world size continues the lr curve by samples and ends at zero;
- for DDP with dropout off on the global plane, the run equals one process with the whole global batch.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import quick_triplets, read_metrics, run_cli, train_losses, write_jsonl
from test_distributed import max_weight_diff, read_row_log

pytestmark = pytest.mark.slow
CASES = int(os.environ.get("DIST_EMBED_DRILL_CASES", "6"))
BASE_SEED = int(os.environ.get("DIST_EMBED_DRILL_SEED", random.randrange(10**6)))
HARD_TIMEOUT = 90  # seconds for a whole run (start-up included); a hang would take the 20 s gloo timeout + more


def draw(case: int) -> dict:
    rng = random.Random(BASE_SEED * 1000 + case)
    world = rng.choice([1, 2, 2, 3])
    batch = rng.randint(1, 6)
    loss = rng.choice(["mnrl", "mnrl", "cached_mnrl", "triplet", "cosine"])
    cols = {"triplet": 3, "cosine": 2}.get(loss, rng.randint(2, 4))
    global_batch = world * batch
    if case == 0:
        rows = rng.randint(1, max(world - 1, 1))  # fewer rows than ranks
    elif case == 1:
        rows = global_batch * rng.randint(1, 3) + 1  # a tail of one row
    else:
        rows = rng.randint(1, 6 * global_batch)
    return {"world": world, "batch": batch, "loss": loss, "cols": cols, "rows": rows,
            "dropout": rng.random() < 0.6, "fast_dropout": rng.random() < 0.5, "grad_accum": rng.choice([1, 1, 2]),
            "no_duplicates": rng.random() < 0.6, "workers": rng.choice([0, 0, 2]),
            "epochs": rng.choice([1, 1, 2]), "max_steps": rng.choice([-1, -1, rng.randint(2, 6)]),
            "mini_batch": rng.randint(1, 4), "resume_world": rng.choice([world, world, world, rng.randint(1, 3)]),
            "stop_draw": rng.random(), "rows_seed": rng.randrange(10**6),
            "plane": rng.choice(["auto", "sharded"]), "mix": rng.random() < 0.3,
            "dedup_buffer": rng.choice([4, None])} | (sharded_world_change(rng, world, global_batch) if case == 2 else {})


def sharded_world_change(rng: random.Random, world: int, global_batch: int) -> dict:
    """No-duplicates on the sharded plane, resumed at another world size, with enough rows for the
    resume to land mid-epoch (where global batches must still be full)."""
    return {"plane": "sharded", "no_duplicates": True, "grad_accum": 1, "dedup_buffer": None, "max_steps": -1,
            "rows": rng.randint(4, 8) * global_batch, "resume_world": rng.choice([w for w in (1, 2, 3) if w != world])}


def make_rows(n: int, cols: int, loss: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool = quick_triplets(400)
    out = []
    for i in range(n):
        t = rng.choice(pool)
        first = "anchor" if loss != "cosine" else "sentence1"
        if rng.random() < 0.2 and out:  # repeated texts, for the no-duplicates batcher to defer
            t = dict(t, anchor=rng.choice(out)[first])
        elif rng.random() < 0.25 and out:  # an anchor with several positives, in consecutive rows
            t = dict(t, anchor=out[-1][first])
        if loss == "cosine":
            out.append({"sentence1": t["anchor"], "sentence2": t["positive"], "score": round(rng.random(), 3)})
            continue
        row = {"anchor": t["anchor"], "positive": t["positive"]}
        if cols >= 3:
            row["negative"] = t["negative"]
        if cols >= 4:
            row["negative_2"] = rng.choice(pool)["negative"]
        out.append(row)
    return out


def write_data(tmp: Path, rows: list[dict], c: dict):
    """The training data as ``data.train`` names it, and a function from a logged (dataset, row id)
    to the row's index in ``rows``."""
    if not c["mix"] or len(rows) < 2:
        return str(write_jsonl(tmp / "train.jsonl", rows)), lambda d, i: i
    cut = 1 + random.Random(c["rows_seed"]).randrange(len(rows) - 1)
    files = [write_jsonl(tmp / "a.jsonl", rows[:cut]), write_jsonl(tmp / "b.jsonl", rows[cut:])]
    return [{"name": n, "path": str(f)} for n, f in zip("ab", files)], lambda d, i: i + cut * d


def config(tmp: Path, model: Path, train, c: dict) -> Path:
    cfg = {
        "output_dir": str(tmp / "unused"),
        "model": {"name_or_path": str(model), "max_seq_length": 32, **({} if c["dropout"] else {"dropout": 0.0})},
        "data": {"train": train, "shuffle_buffer": 16, "no_duplicates": c["no_duplicates"],
                 "dedup_buffer": c["dedup_buffer"], "num_workers": c["workers"], "plane": c["plane"]},
        "loss": {"name": c["loss"], "mini_batch_size": c["mini_batch"]},
        "training": {"batch_size": c["batch"], "max_steps": c["max_steps"], "epochs": c["epochs"], "lr": 1e-3,
                     "warmup_ratio": 0.3, "log_steps": 1, "seed": 11, "grad_accum": c["grad_accum"],
                     "fast_dropout": c["fast_dropout"]},
        "eval": {"before_training": False},
        "checkpoint": {"steps": 1, "keep_last": 1000},
        "distributed": {"timeout_s": 20},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cfg: Path, out: Path, world: int, *args) -> str:
    """Train; the data plane the run used."""
    extra = ["--nproc", str(world)] if world > 1 else []
    r = run_cli("train", cfg, f"output_dir={out}", *extra, *args, env={"DIST_EMBED_LOG_ROW_IDS": "1"},
                timeout=HARD_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return "sharded" if "(sharded data plane)" in r.stderr else "global"


def chain_rows(logs: dict, upto: int | None = None, after: int | None = None, index=lambda d, i: i) -> list[int]:
    out = []
    for recs in logs.values():
        for rec in recs:
            if (upto is None or rec["step"] <= upto) and (after is None or rec["step"] > after):
                out.extend(index(d, i) for d, i in zip(rec["datasets"], rec["rows"]))
    return out


def assert_no_text_twice(logs: dict, rows: list[dict], index, note: str) -> None:
    """Every global batch (one optimizer step of one micro-batch: the union of the ranks' rows)
    holds each text once."""
    for s in range(len(logs[0])):
        texts = [t for r in logs for d, i in zip(logs[r][s]["datasets"], logs[r][s]["rows"])
                 for t in {v for k, v in rows[index(d, i)].items() if k != "score"}]
        assert len(texts) == len(set(texts)), (s, note)


def assert_full_batches(logs: dict, rows: list[dict], index, c: dict, plane: str, note: str) -> None:
    """Global batches are full while rows can fill them: a global batch (the sharded plane: a rank's
    slice) is short only when every row trained after it in the same epoch and data set (the
    sharded plane: by that rank) repeats one of its texts (without no-duplicates: when none is)."""
    from dist_embed.data.batching import split_sizes

    world = len(logs)
    share = split_sizes(c["batch"] * world, world)

    def texts(d, i):
        return {v for k, v in rows[index(d, i)].items() if k != "score"}

    for s in range(len(logs[0])):
        batch = {t for r in logs for d, i in zip(logs[r][s]["datasets"], logs[r][s]["rows"]) for t in texts(d, i)}
        sizes = [len(logs[r][s]["rows"]) for r in range(world)]
        data_set = next(d for r in logs for d in logs[r][s]["datasets"])
        short = [r for r in range(world) if sizes[r] < share[r]] if plane == "sharded" else \
            (list(range(world)) if sum(sizes) < sum(share) else [])
        for r in short:
            later = [(d, i) for q in ([r] if plane == "sharded" else range(world)) for rec in logs[q][s + 1:]
                     if rec["epoch"] == logs[q][s]["epoch"] for d, i in zip(rec["datasets"], rec["rows"])
                     if d == data_set]
            free = [i for d, i in later if not c["no_duplicates"] or batch.isdisjoint(texts(d, i))]
            assert not free, (f"step {logs[r][s]['step']}: rank {r} took {sizes[r]} of {share[r]} rows, though "
                              f"rows {free[:5]} could have joined", note)


def lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(out) if "lr" in r}


@pytest.mark.parametrize("case", range(CASES))
def test_drill(tmp_path, tiny_model, case):
    c = draw(case)
    print(f"drill seed {BASE_SEED} case {case}: {json.dumps(c)}")  # shown by pytest on failure
    note = f"(replay: DIST_EMBED_DRILL_SEED={BASE_SEED}, case {case}: {c})"
    rows = make_rows(c["rows"], c["cols"], c["loss"], c["rows_seed"])
    data, index = write_data(tmp_path, rows, c)
    cfg = config(tmp_path, tiny_model, data, c)
    straight = tmp_path / "straight"
    plane = run(cfg, straight, c["world"])
    full_checked = c["grad_accum"] == 1 and not (c["no_duplicates"] and c["dedup_buffer"])  # no cap to hit
    losses = train_losses(straight)
    steps = max(losses)
    epochs = c["epochs"] if c["max_steps"] <= 0 else None

    # every row exactly once per epoch (epoch runs), and never twice within an epoch (step-budget runs)
    ids = Counter(chain_rows(read_row_log(straight), index=index))
    if epochs:
        assert ids == Counter({i: epochs for i in range(c["rows"])}), note
    if c["no_duplicates"] and c["grad_accum"] == 1:
        assert_no_text_twice(read_row_log(straight), rows, index, note)
    if full_checked:
        assert_full_batches(read_row_log(straight), rows, index, c, plane, note)
    final_lr = lrs(straight)[steps]
    assert final_lr == pytest.approx(0.0, abs=1e-12), note

    if steps >= 2:
        stop = 1 + int(c["stop_draw"] * (steps - 1))  # 1 .. steps-1
        ckpt = straight / "checkpoints" / f"step-{stop}"
        resumed = tmp_path / "resumed"
        resumed_plane = run(cfg, resumed, c["resume_world"], "--resume", ckpt)
        rest = train_losses(resumed)
        chain = chain_rows(read_row_log(straight), upto=stop, index=index) + \
            chain_rows(read_row_log(resumed), after=stop, index=index)
        if epochs:
            assert Counter(chain) == Counter({i: epochs for i in range(c["rows"])}), note
        if c["no_duplicates"] and c["grad_accum"] == 1:
            assert_no_text_twice(read_row_log(resumed), rows, index, note)
        if full_checked:
            assert_full_batches(read_row_log(resumed), rows, index, c, resumed_plane, note)
        if c["resume_world"] == c["world"]:
            assert sorted(rest) == list(range(stop + 1, steps + 1)), note
            for s in rest:
                assert rest[s] == pytest.approx(losses[s], rel=1e-6, abs=1e-7), (s, note)
            assert max_weight_diff(straight, resumed) < 1e-6, note
        else:  # another world size: the lr curve continues by samples and still ends at zero
            meta = json.loads((ckpt / "training_state" / "trainer.json").read_text())["schedule"]
            peak = 1e-3
            first = min(rest)
            batch_samples = (c["batch"] * c["resume_world"] * c["grad_accum"] if c["max_steps"] > 0 else None)
            if batch_samples:  # a step-budget run: the next step's position is known exactly
                pos = meta["samples"] + batch_samples
                expect = peak * (pos / meta["warmup"] if pos < meta["warmup"] else
                                 max(0.0, (meta["total"] - pos) / (meta["total"] - meta["warmup"])))
                assert lrs(resumed)[first] == pytest.approx(expect, rel=1e-6, abs=1e-12), note
            assert lrs(resumed)[max(rest)] == pytest.approx(0.0, abs=1e-12), note

    if not c["dropout"] and c["world"] > 1 and c["grad_accum"] == 1 and c["plane"] == "auto":  # small: global
        one = tmp_path / "one"
        run(cfg, one, 1, f"training.batch_size={c['batch'] * c['world']}")
        la = train_losses(one)
        assert la.keys() == losses.keys(), note
        for s in la:
            assert losses[s] == pytest.approx(la[s], rel=1e-5, abs=1e-6), (s, note)
        # Adam divides each gradient coordinate by its own running RMS, so where the true gradient
        # is ~0 the rounding noise of another summation order becomes a step of up to lr (1e-3 here):
        # weights agree to 0.1 x lr. Triplet loss with a euclidean distance between mean-pooled
        # embeddings cannot see the last layer's output LayerNorm bias at all (it shifts every
        # embedding by the same vector): its gradient is pure noise, so it is left out.
        invariant = ("encoder.layer.1.output.LayerNorm.bias",) if c["loss"] == "triplet" else ()
        assert max_weight_diff(straight, one, skip=invariant) < 1e-4, note
