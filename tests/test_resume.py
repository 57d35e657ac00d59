"""Fault tolerance with real processes: exact resume, preemption signals, SIGKILL, corrupt checkpoints."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from dist_embed.outputs.checkpoint import find_resumable, verify
from launch.local import child_pids

from conftest import REPO, quick_triplets, read_metrics, run_cli, tiny_config, train_losses, write_jsonl
from test_distributed import max_weight_diff, read_row_log

pytestmark = pytest.mark.slow
ROWS = {"DIST_EMBED_LOG_ROW_IDS": "1"}


def train(cfg, out, *args, env=None, expect=0):
    r = run_cli("train", cfg, f"output_dir={out}", *args, env=env)
    assert r.returncode == expect, r.stderr[-4000:]
    return r


RESUME_CASES = [  # (nproc, fast_dropout, data workers, grad_accum, loss, layout): dropout ON in every case
    (1, True, 0, 1, "mnrl", "auto"), (1, False, 2, 2, "cached_mnrl", "auto"), (2, True, 2, 1, "cached_mnrl", "auto"),
    (2, False, 0, 2, "mnrl", "padded"), (2, True, 0, 2, "triplet", "auto"), (2, True, 2, 1, "mnrl", "unpadded"),
    (1, True, 0, 1, "cached_mnrl", "unpadded"),
]


@pytest.mark.parametrize("nproc,fast,workers,accum,loss,layout", RESUME_CASES)
def test_resume_gives_the_same_losses_and_weights_with_dropout_on(tmp_path, tiny_model, triplets, nproc, fast,
                                                                   workers, accum, loss, layout):
    cfg = tiny_config(tmp_path, tiny_model, triplets, model={"dropout": None}, data={"no_duplicates": True,
                      "num_workers": workers}, loss={"name": loss, "mini_batch_size": 3},
                      training={"max_steps": 8, "batch_size": 8, "lr": 1e-4, "fast_dropout": fast, "grad_accum": accum,
                                "layout": layout},
                      checkpoint={"steps": 4, "keep_last": 5})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cfg, straight, "--nproc", nproc)
    r = train(cfg, resumed, "--nproc", nproc, "--resume", straight / "checkpoints" / "step-4")
    assert "resumed from" in r.stderr
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    for step in b:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
    diff = max_weight_diff(straight, resumed)
    print(f"max weight diff after resume: {diff:.3g}")
    assert diff < 1e-6


@pytest.mark.parametrize("nproc", [1, 2])
def test_quickstart_resume_is_exact_with_dropout_on(tmp_path, nproc):
    """The issue's scenario as written: configs/quickstart.yaml, 6 steps, resume from step 3."""
    args = ["training.max_steps=6", "checkpoint.steps=3", "eval.sts=[]", "training.log_steps=1",
            "checkpoint.keep_last=5"] + (["--nproc", "2"] if nproc == 2 else [])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(REPO / "configs" / "quickstart.yaml", straight, *args)
    train(REPO / "configs" / "quickstart.yaml", resumed, *args, "--resume", straight / "checkpoints" / "step-3")
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(b) == [4, 5, 6] and all(a[s] == pytest.approx(b[s], rel=1e-6) for s in b), (a, b)
    assert max_weight_diff(straight, resumed) < 1e-6


def test_ragged_tail_smaller_than_the_world_does_not_hang(tmp_path):
    """9 triplets, 2 processes x batch 4: the last global batch has 1 row, rank 1's slice is empty."""
    nine = write_jsonl(tmp_path / "nine.jsonl", quick_triplets(9))
    out = tmp_path / "run"
    r = run_cli("train", REPO / "configs" / "quickstart.yaml", f"output_dir={out}", f"data.train={nine}",
                "training.batch_size=4", "training.max_steps=-1", "eval.sts=[]", "distributed.timeout_s=30",
                "--nproc", "2", env=ROWS, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = [i for rows in chain_rows(read_row_log(out)).values() for i in rows]
    assert Counter(ids) == Counter(range(9))


def lr_by_step(out: Path) -> dict[int, float]:
    return {m["step"]: m["lr"] for m in read_metrics(out) if "lr" in m}


@pytest.mark.parametrize("budget", ["max_steps", "epochs"])
def test_world_size_change_continues_the_lr_curve_and_ends_at_zero(tmp_path, tiny_model, budget):
    train_file = write_jsonl(tmp_path / "t.jsonl", quick_triplets(150))
    training = {"batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.1, "warmup_steps": 0, "log_steps": 1}
    training.update({"max_steps": 12} if budget == "max_steps" else {"max_steps": -1, "epochs": 2})
    cfg = tiny_config(tmp_path, tiny_model, train_file, data={"no_duplicates": True}, training=training,
                      checkpoint={"steps": 4, "keep_last": 10})
    two, one = tmp_path / "two", tmp_path / "one"
    train(cfg, two, "--nproc", 2, env=ROWS)
    r = train(cfg, one, "--resume", two / "checkpoints" / "step-4", env=ROWS)  # 1 process now
    assert "resuming a 2-process run with 1 processes" in r.stderr
    before, after = lr_by_step(two), lr_by_step(one)
    meta = json.loads((two / "checkpoints" / "step-4" / "training_state" / "trainer.json").read_text())["schedule"]
    # a 1-process step trains half the samples of a 2-process one: the next lr is half a step further on
    expect = 1e-3 * (meta["total"] - meta["samples"] - (8 if budget == "max_steps" else 0)) / (
        meta["total"] - meta["warmup"])
    if budget == "max_steps":
        assert after[5] == pytest.approx(expect, rel=1e-9)
        assert len(after) == 16  # 8 two-process steps left = 16 one-process steps: same samples in all
    assert before[4] > after[5] > after[6]  # no jump up, decaying
    assert after[max(after)] == 0.0 and before[max(before)] == 0.0
    if budget == "epochs":  # every row once per epoch across the change
        done = chain_rows(read_row_log(two), upto=4)
        rest = chain_rows(read_row_log(one))
        ids = [i for rows in list(done.values()) + list(rest.values()) for i in rows]
        assert Counter(ids) == Counter({i: 2 for i in range(150)})


def test_resume_skips_the_scan_and_refuses_changed_data(tmp_path, tiny_model, triplets):
    cfg = tiny_config(tmp_path, tiny_model, triplets, training={"max_steps": 6},
                      checkpoint={"steps": 2, "keep_last": 5})
    out = tmp_path / "run"
    first = train(cfg, out)
    assert "rows checked" in first.stderr
    ckpt = out / "checkpoints" / "step-4"
    r = train(cfg, tmp_path / "again", "--resume", ckpt)
    assert "rows checked" not in r.stderr  # the data position and row count come from the checkpoint
    r = train(cfg, tmp_path / "seed", "training.seed=8", "--resume", ckpt, expect=2)
    assert r.stderr.strip().splitlines()[-1].endswith(
        "the data configuration differs from the checkpoint's (seed); resuming would not continue the same data "
        "order. Use the original data and settings, or pass --allow-data-change to continue anyway")
    with open(triplets, "a") as f:  # the data file grows
        f.write(json.dumps(quick_triplets(201)[-1]) + "\n")
    r = train(cfg, tmp_path / "grown", "--resume", ckpt, expect=2)
    assert "data files (names, sizes or modification times)" in r.stderr
    r = train(cfg, tmp_path / "grown", "--resume", ckpt, "--allow-data-change")
    assert "epoch 0 restarts from the beginning of the new data" in r.stderr


def chain_rows(logs: dict, upto: int | None = None) -> dict[int, list[int]]:
    """step -> rows of all ranks; a later record of the same step (after a resume) wins."""
    steps: dict[int, list[int]] = {}
    for rank in sorted(logs):
        seen = {}
        for rec in logs[rank]:
            seen[rec["step"]] = rec["rows"]
        for step, rows in seen.items():
            if upto is None or step <= upto:
                steps.setdefault(step, []).extend(rows)
    return steps


def test_resume_with_another_world_size_neither_repeats_nor_loses_rows(tmp_path, tiny_model):
    train_file = write_jsonl(tmp_path / "t.jsonl", quick_triplets(120))
    cfg = tiny_config(tmp_path, tiny_model, train_file, data={"no_duplicates": True},
                      training={"max_steps": -1, "epochs": 1, "batch_size": 8},
                      checkpoint={"steps": 3, "keep_last": 10})
    first, second = tmp_path / "first", tmp_path / "second"
    train(cfg, first, "--nproc", 2, env=ROWS)
    r = train(cfg, second, "--resume", first / "checkpoints" / "step-3", env=ROWS)  # 1 process now
    assert "resuming a 2-process run with 1 processes" in r.stderr
    done = chain_rows(read_row_log(first), upto=3)
    rest = chain_rows(read_row_log(second))
    ids = [i for rows in list(done.values()) + list(rest.values()) for i in rows]
    assert Counter(ids) == Counter(range(120))
    # the model card tells the chain as it ran, not the last run's world size as the whole run's
    card = (second / "final" / "README.md").read_text()
    assert "- `world_size`: 2 (steps 1-3), 1 (steps 4-)" in card, card
    assert "- `global_batch_size`: 16 (steps 1-3), 8 (steps 4-)" in card


def start(cfg, out, *args, env=None) -> subprocess.Popen:
    full = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(cfg), f"output_dir={out}", *args],
                            cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        f = out / "metrics.jsonl"
        if f.exists() and any(json.loads(l).get("step", 0) >= step and "loss" in l for l in f.read_text().splitlines()):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def long_config(tmp_path, tiny_model, **ck):
    train_file = write_jsonl(tmp_path / "t.jsonl", quick_triplets(1200))
    return tiny_config(tmp_path, tiny_model, train_file, data={"no_duplicates": True},
                       training={"max_steps": -1, "epochs": 1, "batch_size": 4, "log_steps": 1},
                       checkpoint={"keep_last": 10, **ck})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_resume_finishes_the_epoch(tmp_path, tiny_model, sig):
    cfg = long_config(tmp_path, tiny_model)
    out = tmp_path / "run"
    proc = start(cfg, out, "--nproc", "2", env=ROWS)
    wait_for_step(out, 3, proc)
    proc.send_signal(sig)
    time.sleep(0.05)
    proc.send_signal(sig)  # a second signal while stopping must not break the checkpoint
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    ckpt = find_resumable(out / "checkpoints")
    assert ckpt is not None and verify(ckpt) is None
    stopped_at = int(ckpt.name.split("-")[1])
    assert (out / "PREEMPTED").read_text().strip() == str(ckpt)
    r = run_cli("train", cfg, f"output_dir={out}", "--nproc", "2", "--resume", "latest", env=ROWS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt} at step {stopped_at}" in r.stderr
    ids = [i for rows in chain_rows(read_row_log(out)).values() for i in rows]
    assert Counter(ids) == Counter(range(1200))


def test_sigkill_drill_every_row_once_in_the_chain_that_made_the_weights(tmp_path, tiny_model):
    """Kill one worker with SIGKILL mid-run, resume with --resume latest, audit the row ids."""
    cfg = long_config(tmp_path, tiny_model, steps=5)
    out = tmp_path / "run"
    proc = start(cfg, out, "--nproc", "2", env=ROWS)
    wait_for_step(out, 12, proc)
    workers = child_pids(proc.pid)  # --nproc starts the workers itself
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    ckpt = find_resumable(out / "checkpoints")
    kept = int(ckpt.name.split("-")[1])
    assert kept >= 10
    lost = max(rec["step"] for rec in read_row_log(out)[0])
    r = run_cli("train", cfg, f"output_dir={out}", "--nproc", "2", "--resume", "latest", env=ROWS)
    assert r.returncode == 0, r.stderr[-3000:]
    # the chain: steps 1..kept of the first run, then everything the resumed run did (it restarts at kept+1,
    # overwriting the record of any step the killed run had done after its last checkpoint)
    logs = read_row_log(out)
    chain = chain_rows(logs)
    assert lost >= kept and min(chain) == 1
    ids = [i for rows in chain.values() for i in rows]
    assert Counter(ids) == Counter(range(1200))
    assert (out / "final" / "model.safetensors").exists()
    # one history: each step once in metrics.jsonl, from the chain that made the weights
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert len(steps) == len(set(steps)) and sorted(steps) == list(range(1, max(steps) + 1))


def test_corrupt_checkpoints_are_reported_and_skipped(tmp_path, tiny_model, triplets):
    cfg = tiny_config(tmp_path, tiny_model, triplets, training={"max_steps": 6},
                      checkpoint={"steps": 2, "keep_last": 5})
    out = tmp_path / "run"
    train(cfg, out)
    root = out / "checkpoints"
    assert [p.name for p in sorted(root.iterdir())] == ["step-2", "step-4"]
    with open(root / "step-4" / "model.safetensors", "r+b") as f:  # truncate the newest
        f.truncate(1000)
    assert "size 1000" in verify(root / "step-4")
    shutil.rmtree(out / "final")  # as if killed after its last checkpoint: a finished run is not trained again
    r = train(cfg, out, "--resume", "latest")
    assert f"checkpoint {root / 'step-4'} is not usable" in r.stderr
    assert f"resumed from {root / 'step-2'} at step 2" in r.stderr
    assert verify(root / "step-4") is None  # rewritten by the resumed run
    # no manifest = an interrupted write: never resumed from
    for d in root.iterdir():
        (d / "manifest.json").unlink()
    shutil.rmtree(out / "final")
    assert find_resumable(root) is None
    r = train(cfg, out, "--resume", "latest", expect=2)  # never start over on top of the evidence
    assert r.stderr.strip().splitlines()[-1].endswith(
        "refusing to start over and overwrite them. Move them away, or pass --resume-or-start-fresh to start "
        "from scratch")
    assert not (root / "step-2" / "manifest.json").exists()
    r = train(cfg, out, "--resume", "latest", "--resume-or-start-fresh")
    assert "no usable checkpoint" in r.stderr


def test_nan_steps_are_skipped_then_abort(tmp_path, tiny_model, triplets):
    cfg = tiny_config(tmp_path, tiny_model, triplets, training={"max_steps": 20, "lr": 1e30, "warmup_steps": 0,
                                                                 "max_grad_norm": None},
                      health={"max_bad_steps": 3})
    out = tmp_path / "run"
    r = train(cfg, out, expect=1)
    assert "3 optimizer steps in a row had a non-finite loss" in r.stderr
    events = [m for m in read_metrics(out) if m.get("event") == "nonfinite_step"]
    assert len(events) == 2 and events[-1]["health/bad_steps"] == 2
    assert not (out / "final").exists()


def test_keep_best_protects_the_best_checkpoint_from_pruning(tmp_path, tiny_model, triplets):
    from conftest import QUICK

    metric = "eval/snli/spearman_cosine"
    cfg = tiny_config(tmp_path, tiny_model, triplets, training={"max_steps": 8, "lr": 3e-3},
                      eval={"sts": [{"name": "snli", "path": str(QUICK / "snli-dev-pairs-1k.tsv")}], "steps": 2},
                      checkpoint={"steps": 2, "keep_last": 1, "keep_best": metric})
    out = tmp_path / "run"
    train(cfg, out)
    evals = {m["step"]: m[metric] for m in read_metrics(out) if metric in m and 0 < m["step"] < 8}
    best_step = max(evals, key=evals.get)
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["path"].endswith(f"step-{best_step}") and best["value"] == pytest.approx(evals[best_step])
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == sorted({f"step-{best_step}", "step-6"})  # the best one and the newest one
