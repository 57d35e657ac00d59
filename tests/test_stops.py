"""Stops at any moment and one run per output directory, with real processes and real signals.

The signal drill draws its cases from a seed (printed; DIST_EMBED_DRILL_SEED replays one): world
size 1-3, SIGTERM, SIGUSR1, SIGINT (Ctrl-C) or SIGHUP, and a moment anywhere from the launcher's first instant to the final
save. Every case must end in exit 75 with a usable checkpoint (or, before the first step, nothing
to save), or exit 0 with the final model; and the chain of runs that made the weights must train
every row exactly once.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from dist_embed.outputs.checkpoint import verify
from launch.local import child_pids

from conftest import REPO, quick_triplets, read_metrics, run_cli, tiny_config, write_jsonl
from test_bad_input import assert_one_line_exit_2
from test_distributed import read_row_log
from test_resume import chain_rows, start, wait_for_step

pytestmark = pytest.mark.slow
ROWS = {"DIST_EMBED_LOG_ROW_IDS": "1"}
SEED = int(os.environ.get("DIST_EMBED_DRILL_SEED", random.randrange(10**6)))


def rows_config(tmp_path, tiny_model, n_rows=240, batch=4, checkpoint_steps=5, epochs=1):
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(n_rows))
    return tiny_config(tmp_path, tiny_model, data, data={"no_duplicates": True},
                       training={"max_steps": -1, "epochs": epochs, "batch_size": batch, "log_steps": 1},
                       checkpoint={"steps": checkpoint_steps, "keep_last": 3})


def every_row_once(out, n_rows: int) -> None:
    ids = [i for rows in chain_rows(read_row_log(out)).values() for i in rows]
    assert Counter(ids) == Counter(range(n_rows))


@pytest.mark.parametrize("case", range(3))
def test_a_signal_at_any_moment_stops_cleanly_and_the_run_completes(tmp_path, tiny_model, case):
    rng = random.Random(SEED * 100 + case)
    # from 0.1 s: in its first ~50 ms the Python interpreter runs none of our code yet, and a signal
    # then ends the process as the OS default does (nothing is written by then)
    world, delay = rng.choice([1, 2, 3]), rng.uniform(0.1, 14)
    # SIGINT: Ctrl-C; SIGHUP: the terminal closed; alone or to a launcher
    sig = rng.choice([signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP])
    note = f"(replay: DIST_EMBED_DRILL_SEED={SEED}, case {case}: world {world}, {sig.name} after {delay:.2f}s)"
    print(note)
    cfg = rows_config(tmp_path, tiny_model, batch=4 if world == 1 else 2)
    out = tmp_path / "run"
    nproc = ["--nproc", str(world)] if world > 1 else []
    proc = start(cfg, out, *nproc, env=ROWS)
    time.sleep(delay)
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass
    _, err = proc.communicate(timeout=180)
    assert proc.returncode in (0, 75), f"{note}\n{err[-3000:]}"
    assert "Traceback" not in err, f"{note}\n{err[-3000:]}"
    if proc.returncode == 75:
        saved = (out / "PREEMPTED").read_text().strip()
        if saved:  # stopped after a step: its checkpoint is whole
            assert verify(out / "checkpoints" / saved.rsplit("/", 1)[-1]) is None, note
        else:
            assert "before the first step" in err or "before the workers started" in err, f"{note}\n{err[-2000:]}"
        r = run_cli("train", cfg, f"output_dir={out}", *nproc, "--resume", "latest", env=ROWS)
        assert r.returncode == 0, f"{note}\n{r.stderr[-3000:]}"
        if not saved:
            assert "resumed from" not in r.stderr, note
    assert (out / "final" / "model.safetensors").is_file(), note
    every_row_once(out, 240)
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert len(steps) == len(set(steps)) and steps == sorted(steps), note  # one history


@pytest.mark.parametrize("world", [1, 2])
def test_signals_after_the_final_save_leave_a_finished_run_finished(tmp_path, tiny_model, world):
    """Once the final model is saved, stop signals (one every few milliseconds until the process
    is gone, through its interpreter's shutdown) change nothing: exit 0, no traceback."""
    cfg = rows_config(tmp_path, tiny_model, batch=2)
    out = tmp_path / "run"
    proc = start(cfg, out, *(["--nproc", str(world)] if world > 1 else []))
    while not (out / "final" / "model.safetensors").is_file() and proc.poll() is None:
        time.sleep(0.002)
    sent = 0
    while proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{sent} signals: exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == list(range(1, 240 // (2 * world) + 1)), sent  # the whole run, once


def test_a_used_output_dir_is_refused_unless_resumed_or_overwritten(tmp_path, tiny_model, triplets):
    cfg = tiny_config(tmp_path, tiny_model, triplets, training={"max_steps": 6}, checkpoint={"steps": 3})
    out = tmp_path / "run"
    assert run_cli("train", cfg, f"output_dir={out}").returncode == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    r = run_cli("train", cfg, f"output_dir={out}", "training.max_steps=4", "--nproc", "2")
    assert_one_line_exit_2(r, f"output_dir {out} holds another run's checkpoints (checkpoints/step-3, final/)",
                           "--resume latest", "--overwrite")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing touched
    r = run_cli("train", cfg, f"output_dir={out}", "--overwrite", "--resume", "latest")
    assert_one_line_exit_2(r, "pass one of them")
    r = run_cli("train", cfg, f"output_dir={out}", "training.max_steps=4", "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4]  # only this run's history


def test_a_second_live_run_is_refused_naming_the_first(tmp_path, tiny_model):
    cfg = rows_config(tmp_path, tiny_model, n_rows=1200, epochs=50)
    out = tmp_path / "run"
    first = start(cfg, out, "--nproc", "2")
    try:
        wait_for_step(out, 2, first)
        for extra in ([], ["--nproc", "2"], ["--resume", "latest"]):
            r = run_cli("train", cfg, f"output_dir={out}", *extra)
            assert_one_line_exit_2(r, f"output_dir {out}: in use by a live run", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 75
    r = run_cli("train", cfg, f"output_dir={out}", "--resume", "latest", "training.max_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]  # the lock of a run that ended is free


def test_a_killed_worker_is_named_and_a_fresh_start_keeps_one_history(tmp_path, tiny_model):
    cfg = rows_config(tmp_path, tiny_model, n_rows=1200, checkpoint_steps=0, epochs=50)
    out = tmp_path / "run"
    proc = start(cfg, out, "--nproc", "2", env=ROWS)
    wait_for_step(out, 3, proc)
    worker = child_pids(proc.pid)[1]
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 76  # a lost peer: the Slurm script runs the step again
    assert re.fullmatch(rf"dist-embed: rank 1 \(pid {worker}\) was killed by SIGKILL after step \d+; exit 76: run "
                        r"again with --resume latest to continue from the start \(no checkpoint yet\)",
                        err.strip().splitlines()[-1]), err[-2000:]
    assert not (out / "checkpoints").exists()
    r = run_cli("train", cfg, f"output_dir={out}", "--nproc", "2", "--resume", "latest", "training.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4]


def test_workers_die_with_a_killed_launcher(tmp_path, tiny_model):
    cfg = rows_config(tmp_path, tiny_model, n_rows=1200, epochs=50)
    out = tmp_path / "run"
    proc = start(cfg, out, "--nproc", "2")
    wait_for_step(out, 2, proc)
    workers = child_pids(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.time() + 20
    while any(os.path.exists(f"/proc/{w}") and "zombie" not in _state(w) for w in workers):
        assert time.time() < deadline, f"workers {workers} outlived their launcher"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((l for l in f if l.startswith("State:")), "").lower()
    except OSError:
        return "zombie"


def test_worker_signals_are_never_lost_while_it_starts(tmp_path, tiny_model):
    """A stop signal forwarded while the workers are still importing libraries is held pending,
    not fatal: the whole job says it stopped before the first step and exits 75."""
    cfg = rows_config(tmp_path, tiny_model)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(cfg), f"output_dir={out}",
                             "--nproc", "2"], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while len(child_pids(proc.pid)) < 2:  # the workers exist, and are importing torch
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("dist-embed: stopped by SIGUSR1 before the first step"), err[-2000:]
    assert (out / "PREEMPTED").read_text().strip() == ""  # no checkpoint: --resume latest starts afresh
