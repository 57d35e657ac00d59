"""Multi-process training with real gloo process groups (2 workers started by --nproc 2)."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import run_cli, tiny_config, train_losses, write_jsonl, quick_triplets

pytestmark = pytest.mark.slow


def weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def max_weight_diff(a: Path, b: Path, skip: tuple[str, ...] = ()) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa if k not in skip)


def train(tmp_path, name, cfg, *args, env=None):
    out = tmp_path / name
    r = run_cli("train", cfg, f"output_dir={out}", *args, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def assert_same_run(a: Path, b: Path, loss_rel=1e-5, weight_abs=1e-5):
    la, lb = train_losses(a), train_losses(b)
    assert la.keys() == lb.keys() and len(la) >= 4
    for step in la:
        assert abs(la[step] - lb[step]) <= loss_rel * abs(la[step]), (step, la[step], lb[step])
    assert max_weight_diff(a, b) < weight_abs


@pytest.mark.parametrize("loss", ["mnrl", "cached_mnrl"])
def test_two_processes_equal_one_process_with_double_batch(tmp_path, tiny_model, triplets, loss):
    """Gathered negatives make --nproc 2 x B exactly one batch of 2B (dropout off, fp32)."""
    cfg = tiny_config(tmp_path, tiny_model, triplets, loss={"name": loss, "mini_batch_size": 3},
                      data={"no_duplicates": True}, training={"max_steps": 5, "lr": 1e-4})
    one = train(tmp_path, "one", cfg, "training.batch_size=16")
    two = train(tmp_path, "two", cfg, "training.batch_size=8", "--nproc", "2")
    assert_same_run(one, two)
    log = (two / "metrics.jsonl").read_text()
    assert '"time/comm"' in log
    if loss == "mnrl":  # rows dealt out to ranks by length (the default) or in contiguous blocks: same run
        plain = train(tmp_path, "contiguous", cfg, "training.batch_size=8", "--nproc", "2",
                      "distributed.balance_ranks=false")
        assert_same_run(two, plain)


def test_cached_mnrl_equals_mnrl_single_process(tmp_path, tiny_model, triplets):
    cfg = tiny_config(tmp_path, tiny_model, triplets, training={"max_steps": 4, "lr": 1e-4})
    plain = train(tmp_path, "plain", cfg)
    cached = train(tmp_path, "cached", cfg, "loss.name=cached_mnrl", "loss.mini_batch_size=3")
    assert_same_run(plain, cached)


def read_row_log(run: Path) -> dict[int, dict]:
    """rank -> list of (epoch, rows) per optimizer step."""
    out = {}
    for f in sorted((run / "row_ids").glob("rank*.jsonl")):
        out[int(f.stem[4:])] = [json.loads(l) for l in f.read_text().splitlines()]
    return out


@pytest.mark.parametrize("nproc,workers", [(1, 0), (2, 0), (2, 2)])
def test_every_row_exactly_once_per_epoch_and_equal_batches(tmp_path, tiny_model, nproc, workers):
    # 101 rows, global batch 16 -> a ragged last batch of 5 rows split 3/2 between two ranks
    train_file = write_jsonl(tmp_path / "t.jsonl", quick_triplets(101))
    cfg = tiny_config(tmp_path, tiny_model, train_file, data={"no_duplicates": True, "num_workers": workers},
                      training={"max_steps": -1, "epochs": 2, "batch_size": 16 // nproc})
    run = train(tmp_path, "run", cfg, "--nproc", str(nproc), env={"DIST_EMBED_LOG_ROW_IDS": "1"})
    logs = read_row_log(run)
    assert sorted(logs) == list(range(nproc))
    steps = [len(v) for v in logs.values()]
    assert len(set(steps)) == 1  # every rank took the same number of steps: no hang at epoch end
    per_step = [sum((logs[r][s]["rows"] for r in range(nproc)), []) for s in range(steps[0])]
    assert len(per_step) == 14  # 2 epochs x ceil(101 / 16)
    epoch0, epoch1 = sum(per_step[:7], []), sum(per_step[7:], [])
    assert sorted(epoch0) == list(range(101)) and sorted(epoch1) == list(range(101))
    assert epoch0 != epoch1  # reshuffled
    # each step is labelled with the epoch its rows belong to (the last one too, not the next epoch)
    assert all([rec["epoch"] for rec in recs] == [0] * 7 + [1] * 7 for recs in logs.values())


def test_global_no_duplicates_across_ranks(tmp_path, tiny_model):
    # many repeated anchors: a per-device de-dup would still let two ranks share a text
    rows = quick_triplets(60)
    rows = [dict(r, anchor=rows[i % 6]["anchor"]) for i, r in enumerate(rows)]
    train_file = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = tiny_config(tmp_path, tiny_model, train_file, data={"no_duplicates": True},
                      training={"max_steps": -1, "epochs": 1, "batch_size": 4})
    run = train(tmp_path, "run", cfg, "--nproc", "2", env={"DIST_EMBED_LOG_ROW_IDS": "1"})
    logs = read_row_log(run)
    for s in range(len(logs[0])):
        ids = logs[0][s]["rows"] + logs[1][s]["rows"]
        texts = [t for i in ids for t in {rows[i]["anchor"], rows[i]["positive"], rows[i]["negative"]}]
        assert len(texts) == len(set(texts)), s
    assert sorted(i for r in logs.values() for rec in r for i in rec["rows"]) == list(range(60))
