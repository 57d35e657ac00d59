"""Hard negatives re-mined during training, end to end with real gloo ranks: the same negatives at
1, 2 and 3 ranks, no text twice in a global batch with the refreshed columns, exact resume between
refreshes, during one (a stop signal) and at another world size; the sharded plane with a mix;
DeepSpeed ZeRO-3 with LoRA."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dist_embed.mining.tables import referenced

from conftest import quick_triplets, read_metrics, run_cli, tiny_config, train_losses, write_jsonl
from test_distributed import read_row_log
from test_monitoring import wandb_history
from test_resume import chain_rows, start

pytestmark = pytest.mark.slow
ROWS = {"DIST_EMBED_LOG_ROW_IDS": "1"}
HN = {"every_steps": 3, "num_negatives": 2, "chunk_size": 24, "batch_size": 16}


def pairs(tmp_path: Path, n: int, name: str = "pairs.jsonl") -> Path:
    return write_jsonl(tmp_path / name, [{"anchor": r["anchor"], "positive": r["positive"]} for r in quick_triplets(n)])


def train(cfg, out, *args, env=None, expect=0):
    r = run_cli("train", cfg, f"output_dir={out}", *args, env={**ROWS, **(env or {})})
    assert r.returncode == expect, r.stderr[-4000:]
    return r


def tables(out: Path, name: str = "train") -> dict[int, np.ndarray]:
    """refresh step -> its table, for every refresh the run still holds."""
    return {int(d.name.split("-")[1]): np.load(d / f"{name}.npy") for d in sorted((out / "negatives").glob("step-*"))
            if (d / f"{name}.npy").is_file()}


def texts_of(data: Path, extra: Path | None = None) -> tuple[list[tuple], list[str]]:
    """Each row's (anchor, positive, [negative]) and the corpus ids the refresh uses: positives
    in row order, then the corpus file's texts, each text once."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    more = [json.loads(line)["text"] for line in extra.read_text().splitlines()] if extra else []
    return [tuple(r.values()) for r in rows], list(dict.fromkeys([r["positive"] for r in rows] + more))


def audit(out: Path, data: Path, name: str = "train", dataset: int = 0, extra: Path | None = None) -> int:
    """No text twice in any global batch of ``dataset``, with each row's columns as the refresh in
    force at that step gave them (a refresh at step s is used from step s + 1; before the first,
    the data's own); returns the steps audited."""
    rows, corpus = texts_of(data, extra)
    held = tables(out, name)
    logs = read_row_log(out)
    audited = 0
    for step, ids in sorted(chain_rows(logs).items()):
        ds = {d for recs in logs.values() for rec in recs if rec["step"] == step for d in rec["datasets"]}
        assert len(ds) == 1, (step, ds)  # a global batch comes from one data set
        if ds != {dataset}:
            continue
        since = max((s for s in held if s < step), default=None)
        texts = [t for i in ids for t in (rows[i] if since is None else
                                          rows[i][:2] + tuple(corpus[j] for j in held[since][i]))]
        assert len(texts) == len(set(texts)), step
        audited += 1
    return audited


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, tiny_model):
    """The same run (global batch 12) at 1, 2 and 3 ranks; dropout off: the runs agree to float noise."""
    tmp = tmp_path_factory.mktemp("worlds")
    data = pairs(tmp, 200)
    cfg = tiny_config(tmp, tiny_model, data, data={"no_duplicates": True, "hard_negatives": HN},
                      training={"max_steps": 5}, checkpoint={"steps": 1, "keep_last": 20})
    outs, errs = {}, {}
    for n in (1, 2, 3):
        outs[n] = tmp / f"w{n}"
        errs[n] = train(cfg, outs[n], "--nproc", n, f"training.batch_size={12 // n}").stderr
    assert "refresh=" in errs[1] and "hard negatives mined at step 3" in errs[3]  # the progress line, the log
    return cfg, data, outs


def test_same_negatives_at_one_two_and_three_ranks_and_no_text_twice(worlds):
    cfg, data, outs = worlds
    first = {n: tables(out) for n, out in outs.items()}
    assert sorted(first[1]) == [0, 3]
    for n in (2, 3):  # the same weights: the same negatives, to the id
        assert (first[n][0] == first[1][0]).all()
    rows, corpus = texts_of(data)
    t = first[1][0]
    assert (t >= 0).all() and t.shape == (200, 2)
    for i, (a, p) in enumerate(rows):  # never the row's own positive (nor a text equal to one), never itself
        assert not {corpus[j] for j in t[i]} & ({p, a} | {q for b, q in rows if b == a}), i
    assert len({tuple(x) for x in t}) > 60  # hard negatives differ from row to row
    for n, out in outs.items():
        assert audit(out, data) == 5
        rec = [r for r in read_metrics(out) if "refresh/seconds" in r]
        assert [r["step"] for r in rec] == [0, 3] and all(
            r["refresh/embed_seconds"] > 0 and 0 < r["refresh/share_of_run"] < 1 for r in rec)
        assert any("time/refresh" in r for r in read_metrics(out))


def test_resume_at_another_world_size_uses_the_checkpoints_negatives(tmp_path, worlds):
    cfg, data, outs = worlds
    resumed = tmp_path / "resumed"
    r = train(cfg, resumed, "--nproc", 2, "training.batch_size=6", "--resume", outs[1] / "checkpoints" / "step-2")
    assert "resuming a 1-process run with 2 processes" in r.stderr and "mining for train at step 3" in r.stderr
    a, b = train_losses(outs[1]), train_losses(resumed)
    assert sorted(b) == [3, 4, 5]
    for step in (3,):  # before the next refresh: the checkpoint's negatives (other ones give other losses)
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    named = referenced(resumed)  # what its own checkpoints name, it holds
    assert named and all((resumed / rel / "train.npy").is_file() for rel in named)


def test_deepspeed_zero3_with_lora_mines_the_same_negatives(tmp_path, worlds):
    """ZeRO-3 (forwards gather the weights: every rank embeds in lockstep) with LoRA adapters (zero
    at the start): the negatives of the plain run at step 0."""
    from conftest import REPO

    cfg, data, outs = worlds
    out = tmp_path / "zero3"
    train(cfg, out, "--nproc", 2, "training.batch_size=6", "training.max_steps=2", "distributed.backend=deepspeed",
          f"distributed.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero3.json'}",
          "model.lora={r: 4, alpha: 8}")
    assert (tables(out)[0] == tables(outs[1])[0]).all()


def stderr_lines(proc) -> list[str]:
    """The process's stderr, read as it comes (a thread keeps appending)."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    return lines


def test_resume_during_a_refresh_is_exact(tmp_path, tiny_model):
    """Dropout on, 2 ranks: a run stopped by SIGTERM in the middle of a refresh saves the step with
    the old negatives (the refresh leaves nothing behind); resumed, it mines again and continues
    with the straight run's losses and negatives, through the next checkpoint between refreshes.
    (A resume between refreshes, at another world size: the test above.)"""
    data = pairs(tmp_path, 200)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": r["negative"]} for r in quick_triplets(2000)])
    cfg = tiny_config(tmp_path, tiny_model, data, model={"dropout": None},
                      data={"no_duplicates": True, "hard_negatives": {**HN, "corpus": str(corpus), "chunk_size": 32}},
                      training={"max_steps": 5}, checkpoint={"steps": 2, "keep_last": 10})
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(cfg, straight, "--nproc", 2)
    proc = start(cfg, stopped, "--nproc", "2", env=ROWS)
    lines = stderr_lines(proc)
    deadline = time.time() + 240
    while not any("mining for train at step 3" in line for line in lines) and time.time() < deadline:
        assert proc.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 75, "".join(lines)[-3000:]
    err = "".join(lines)
    assert "refresh at step 3 stopped by a signal" in err, err[-3000:]
    assert (stopped / "PREEMPTED").read_text().strip().endswith("step-3")
    assert sorted(tables(stopped)) == [0]  # the cut refresh left nothing behind
    r = train(cfg, stopped, "--nproc", 2, "--resume", "latest")
    assert "mining for train at step 3" in r.stderr
    want, got = train_losses(straight), train_losses(stopped)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in got:
        assert abs(want[step] - got[step]) <= 1e-6 * abs(want[step]), (step, want[step], got[step])
    assert sorted(tables(stopped)) == sorted(tables(straight)) == [0, 3]
    for s, t in tables(stopped).items():
        assert (t == tables(straight)[s]).all(), s
    assert audit(stopped, data, extra=corpus) == 5


def test_sharded_plane_with_a_mix_batches_the_refreshed_columns(tmp_path, tiny_model):
    """Two data sets on the sharded plane (each rank plans its share): pairs mined from the start,
    triplets keep their own negative until the first periodic refresh replaces it."""
    p = pairs(tmp_path, 160)
    trip = write_jsonl(tmp_path / "trip.jsonl", quick_triplets(400)[200:])
    cfg = tiny_config(tmp_path, tiny_model, p, data={
        "train": [{"name": "pairs", "path": str(p)}, {"name": "trip", "path": str(trip)}], "plane": "sharded",
        "no_duplicates": True, "hard_negatives": {**HN, "num_negatives": 1}}, training={"max_steps": 8},
        checkpoint={"steps": 1, "keep_last": 20})
    out = tmp_path / "run"
    r = train(cfg, out, "--nproc", 2, "training.batch_size=5", "logging.wandb={project: t, mode: offline}")
    assert "sharded data plane" in r.stderr
    assert sorted(tables(out, "pairs")) == [0, 3, 6] and sorted(tables(out, "trip")) == [3, 6]
    assert audit(out, p, "pairs", 0) + audit(out, trip, "trip", 1) == 8
    # the refreshes' costs reach W&B (read back with wandb's own tool) as metrics.jsonl has them
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    got = [h for h in wandb_history(run_dir) if "refresh/seconds" in h]
    want = [m for m in read_metrics(out) if "refresh/seconds" in m]
    assert len(got) == len(want) == 3
    assert [h["refresh/search_seconds"] for h in got] == pytest.approx([m["refresh/search_seconds"] for m in want])
