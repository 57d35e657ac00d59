"""How a run ends and what a second command does with it: a finished run stays finished under
``--resume latest`` (what every launcher passes), ``--resume OUTPUT/final`` is one line, and Ctrl-C
or a closed terminal on a single process checkpoints and exits 75 as under ``--nproc``."""
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dist_embed.outputs.checkpoint import verify

from conftest import REPO, quick_triplets, read_metrics, run_cli, tiny_config, write_jsonl

pytestmark = pytest.mark.slow


def snapshot(out) -> dict:
    """Every file of a run's output directory, by content."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".dist-embed.lock"}


def test_a_finished_run_is_not_trained_again(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(64))
    cfg = tiny_config(tmp_path, tiny_model, data, training={"max_steps": 5}, checkpoint={"steps": 2})
    out = tmp_path / "run"
    r = run_cli("train", cfg, "--resume", "latest")  # a first submission, as a launcher runs it
    assert r.returncode == 0, r.stderr[-3000:]
    before = snapshot(out)
    assert "final/manifest.json" in before and "checkpoints/step-4/manifest.json" in before
    for extra in ([], ["--nproc", "2"]):  # in this process, and the launcher (which starts no workers)
        r = run_cli("train", cfg, "--resume", "latest", *extra, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "run already complete (final/ at step 5)" in r.stderr, r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "step 6" not in r.stderr
        assert snapshot(out) == before
    # final/ is a model, not a checkpoint: one line, exit 2, nothing written
    r = run_cli("train", cfg, "--resume", out / "final")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"--resume {out / 'final'}: a finished model (at step 5), not a checkpoint" in r.stderr
    assert f"model.name_or_path={out / 'final'}" in r.stderr
    assert snapshot(out) == before
    # a damaged final/ is not a finished run: the last checkpoint goes on and writes it again
    (out / "final" / "modules.json").write_text("[]")
    r = run_cli("train", cfg, "--resume", "latest")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    assert "is not usable" in r.stderr
    assert snapshot(out)["final/modules.json"] == before["final/modules.json"]
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_ctrl_c_on_a_single_process_checkpoints_and_exits_75(tmp_path, tiny_model, sig):
    """The README's first command, stopped with Ctrl-C (SIGINT to the terminal's process group) or
    by its terminal closing (SIGHUP)."""
    from test_resume import wait_for_step

    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(160))
    cfg = tiny_config(tmp_path, tiny_model, data, training={"max_steps": -1, "batch_size": 4})
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(cfg)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_step(out, 2, proc)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "KeyboardInterrupt" not in err and "Traceback" not in err, err[-3000:]
    saved = (out / "PREEMPTED").read_text().strip()
    assert saved and f"stopped by {sig.name} after saving" in err
    assert verify(Path(saved)) is None  # resumable: the drill (test_stops.py) resumes every kind of stop


def test_a_resume_on_changed_files_ends_its_schedule_with_its_epochs(tmp_path, tiny_model):
    """--allow-data-change on other files restarts the epoch on them: the lr decays to zero at the
    end of the new data, not early (the abandoned rows' samples were counted, the last steps ran at 0)."""
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(48))
    cfg = tiny_config(tmp_path, tiny_model, data, training={"max_steps": -1, "epochs": 2, "warmup_steps": 0},
                      checkpoint={"steps": 8, "keep_last": 5})
    out = tmp_path / "run"
    r = run_cli("train", cfg)  # 6 steps an epoch: step 8 is 2 steps into the second
    assert r.returncode == 0, r.stderr[-3000:]
    write_jsonl(data, quick_triplets(112)[48:])  # other files: 64 rows
    r = run_cli("train", cfg, "--resume", out / "checkpoints" / "step-8", "--allow-data-change",
                f"output_dir={tmp_path / 'resumed'}")
    assert r.returncode == 0 and "epoch 1 restarts" in r.stderr, r.stderr[-3000:]
    lrs = [m["lr"] for m in read_metrics(tmp_path / "resumed") if "loss" in m]
    assert len(lrs) == 64 // 8 and lrs[-1] == 0.0 and all(lr > 0 for lr in lrs[:-1]), lrs
    assert all(a > b for a, b in zip(lrs, lrs[1:])), lrs  # still decaying, step after step


def test_a_resumed_run_logs_the_losses_of_the_run_it_continues(tmp_path, tiny_model):
    """A checkpoint between two log steps keeps the window's losses: the resumed run's first record
    averages the same steps (it averaged only its own, a shorter window), per data set too."""
    a = write_jsonl(tmp_path / "a.jsonl", quick_triplets(64))
    b = write_jsonl(tmp_path / "b.jsonl", quick_triplets(128)[64:])
    cfg = tiny_config(tmp_path, tiny_model, a, data={"train": [{"name": "a", "path": str(a)},
                                                               {"name": "b", "path": str(b)}]},
                      training={"max_steps": 8, "log_steps": 4}, checkpoint={"steps": 3, "keep_last": 5})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli("train", cfg, f"output_dir={straight}").returncode == 0
    r = run_cli("train", cfg, f"output_dir={resumed}", "--resume", straight / "checkpoints" / "step-3")
    assert r.returncode == 0, r.stderr[-3000:]

    def losses(out):
        return {m["step"]: {k: v for k, v in m.items() if k == "loss" or k.startswith("loss/")}
                for m in read_metrics(out) if "loss" in m}

    want, got = losses(straight), losses(resumed)
    assert sorted(want) == [4, 8] and sorted(got) == [4, 8]
    for step in want:
        assert want[step].keys() == got[step].keys() and len(want[step]) == 3, (want, got)
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-6), (step, key, want, got)
