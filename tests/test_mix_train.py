"""Training on several datasets at once (triplets from shards, query/document pairs from CSV with a
prompt, scored pairs from parquet with the cosine loss), with each sampler: realised shares, exact
resume, per-dataset metrics, the model card; and the Hugging Face path with locally saved datasets."""
import csv
import os
import random
from collections import Counter

import pytest

from dist_embed.data.readers import Source

from conftest import minilm_dir, quick_triplets, read_metrics, run_cli, tiny_config, train_losses, write_jsonl
from test_distributed import max_weight_diff, read_row_log
from test_monitoring import wandb_history

SEED = int(os.environ.get("DIST_EMBED_FUZZ_SEED", random.randrange(1 << 30)))


def three_datasets(tmp_path, rng):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = quick_triplets()
    sizes = [rng.randrange(90, 200), rng.randrange(40, 120), rng.randrange(30, 100)]
    trip = write_jsonl(tmp_path / "trip.jsonl", [{k: f"{v} #{i}" for k, v in base[i].items()} for i in range(sizes[0])])
    shards = tmp_path / "trip-shards"
    r = run_cli("prepare-data", trip, "--out", shards, "--shard-rows", 50, "--block-rows", 10,
                "--tokenizer", minilm_dir(), "--max-seq-length", 48)  # the tiny model's tokenizer and length
    assert r.returncode == 0, r.stderr
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        for i in range(sizes[1]):
            row = base[500 + i]
            w.writerow([f"{row['anchor']} ?{i}", f"{row['positive']} !{i}"])
    scored = tmp_path / "scored.parquet"
    pq.write_table(pa.Table.from_pylist([{"sentence1": base[1000 + i]["anchor"] + f" ~{i}",
                                          "sentence2": base[1000 + i][("positive", "negative")[i % 2]],
                                          "score": float(i % 2 == 0)} for i in range(sizes[2])]), scored)
    datasets = [
        {"name": "nli", "path": str(shards)},
        {"name": "qa", "path": str(pairs), "columns": {"anchor": "question", "positive": "answer"},
         "prompts": {"anchor": "query: "}},
        {"name": "sts", "path": str(scored), "loss": {"name": "cosine"}},
    ]
    return datasets, sizes


@pytest.mark.slow
@pytest.mark.parametrize("sampler,nproc", [("proportional", 1), ("round_robin", 1), ("temperature", 2),
                                           ("weighted", 1)])
def test_three_dataset_mix_shares_resume_metrics_card(tmp_path, tiny_model, sampler, nproc):
    rng = random.Random(SEED + len(sampler))
    datasets, sizes = three_datasets(tmp_path, rng)
    if sampler == "weighted":
        for d, w in zip(datasets, (1.0, 2.0, 1.0)):
            d["weight"] = w
    wandb = {"wandb": {"project": "dist-embed-test", "mode": "offline"}} if sampler == "proportional" else {}
    cfg = tiny_config(tmp_path, tiny_model, "unused", data={"train": datasets, "sampler": sampler, "temperature": 3.0,
                                                            "no_duplicates": True},
                      training={"max_steps": -1, "batch_size": 8 // nproc}, checkpoint={"steps": 1, "keep_last": 100},
                      model={"dropout": None}, logging=wandb)
    env = {"DIST_EMBED_LOG_ROW_IDS": "1"}
    straight = tmp_path / "straight"
    r = run_cli("train", cfg, f"output_dir={straight}", "--nproc", nproc, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = read_row_log(straight)
    steps = [(rec["datasets"] + [d for other in range(1, nproc) for d in logs[other][i]["datasets"]],
              rec["rows"] + [x for other in range(1, nproc) for x in logs[other][i]["rows"]])
             for i, rec in enumerate(logs[0])]
    drawn = [set(ds) for ds, _ in steps]
    assert all(len(d) == 1 for d in drawn if d), "a global batch mixed datasets"
    per_step = [d.pop() if d else None for d in drawn]
    n = len(steps)
    note = f"seed {SEED}: sizes {sizes}, {n} steps, sampler {sampler}"
    rows = Counter()
    for (ds, ids) in steps:
        rows.update(ds)
    if sampler == "proportional":
        for d, size in enumerate(sizes):
            got = sorted(i for ds, ids in steps for dd, i in zip(ds, ids) if dd == d)
            assert got == list(range(size)), note
    elif sampler == "round_robin":
        assert [d for d in per_step if d is not None] == [i % 3 for i in range(n)], note
    else:
        assert sum(rows.values()) == sum(sizes), note
        expected = [s ** (1 / 3.0) for s in sizes] if sampler == "temperature" else [1.0, 2.0, 1.0]
        expected = [e / sum(expected) for e in expected]
        counts = Counter(per_step)
        for d, p in enumerate(expected):
            tol = 4 * (p * (1 - p) / n) ** 0.5 + 1 / n
            assert abs(counts[d] / n - p) <= tol, (d, counts[d] / n, p, tol, note)
    # per-dataset metrics
    recs = [m for m in read_metrics(straight) if "loss" in m]
    names = ["nli", "qa", "sts"]
    assert all(f"data/{name}/rows" in recs[-1] for name in names), recs[-1]
    assert [recs[-1][f"data/{name}/rows"] for name in names] == [rows[d] for d in range(3)], note
    for d, name in enumerate(names):
        assert any(f"loss/{name}" in m for m in recs) == (rows[d] > 0)
    report = run_cli("report", straight).stdout
    for d, name in enumerate(names):
        assert f"dataset {name}: {rows[d]} rows trained" in report, report
    if wandb:  # W&B has the per-dataset series too (read back with wandb's own tool)
        run_id = (straight / "wandb_run_id").read_text().strip()
        hist = wandb_history(sorted((straight / "wandb").glob(f"offline-run-*-{run_id}"))[0])
        last = [h for h in hist if "data/nli/rows" in h][-1]
        assert [last[f"data/{name}/rows"] for name in names] == [rows[d] for d in range(3)]
        assert any("loss/sts" in h for h in hist)
    card = (straight / "final" / "README.md").read_text()
    for name, loss in zip(names, ("MultipleNegativesRankingLoss", "MultipleNegativesRankingLoss",
                                  "CosineSimilarityLoss")):
        assert f"#### {name}" in card and loss in card
    assert f"`{sampler}` sampler" in card
    # resume from a random step: same losses, same datasets and rows, same weights
    stop = rng.randrange(1, n - 1)
    resumed = tmp_path / "resumed"
    r = run_cli("train", cfg, f"output_dir={resumed}", "--nproc", nproc, "--resume",
                straight / "checkpoints" / f"step-{stop}", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    after = read_row_log(resumed)[0]
    assert [(rec["datasets"], rec["rows"]) for rec in after] == \
        [(rec["datasets"], rec["rows"]) for rec in logs[0][stop:]], note
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(b) == list(range(stop + 1, n + 1)), note
    for s in b:
        assert abs(a[s] - b[s]) <= 1e-6 * max(abs(a[s]), 1e-6), (s, a[s], b[s], note)
    assert max_weight_diff(straight, resumed) < 1e-6
    print(note, f"stop {stop}", dict(Counter(per_step)))


def _hf_rows(n):
    return [{"anchor": f"{t['anchor']} {i}", "positive": t["positive"], "negative": t["negative"]}
            for i, t in enumerate(quick_triplets(n))]


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet_repo"])
@pytest.mark.parametrize("streaming", [True, False])
def test_hugging_face_datasets_saved_locally(tmp_path, layout, streaming):
    """The hub code path (``datasets``) on a dataset saved locally: its own save/load, and a
    hub-style parquet repository (data/train-*.parquet); streaming and not; positions resume."""
    import datasets

    rows = _hf_rows(120)
    path = tmp_path / layout
    if layout == "save_to_disk":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
        fmt = "auto"
    else:
        (path / "data").mkdir(parents=True)
        datasets.Dataset.from_list(rows[:70]).to_parquet(str(path / "data" / "train-00000-of-00002.parquet"))
        datasets.Dataset.from_list(rows[70:]).to_parquet(str(path / "data" / "train-00001-of-00002.parquet"))
        fmt = "hf"
    src = Source(str(path), fmt, None, "train", streaming)
    assert src.format == "hf"
    got = [r.fields for r in src.records()]
    assert [{k: g[k] for k in ("anchor", "positive", "negative")} for g in got] == rows
    cur = src.records()
    it = iter(cur)
    for _ in range(45):
        next(it)
    assert [r.fields["anchor"] for r in src.records(cur.position)] == [r["anchor"] for r in rows[45:]]


@pytest.mark.slow
def test_training_on_a_locally_saved_hugging_face_dataset(tmp_path, tiny_model):
    """Trained directly (every row once), and turned into shards by prepare-data (same rows)."""
    import datasets

    path = tmp_path / "ds"
    rows = _hf_rows(64)
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    cfg = tiny_config(tmp_path, tiny_model, path, data={"streaming": False}, training={"max_steps": -1})
    r = run_cli("train", cfg, env={"DIST_EMBED_LOG_ROW_IDS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ids = sorted(i for rec in read_row_log(tmp_path / "run")[0] for i in rec["rows"])
    assert ids == list(range(64))
    r = run_cli("prepare-data", path, "--out", tmp_path / "shards", "--shard-rows", 20, "--block-rows", 8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [r.fields for r in Source(str(tmp_path / "shards")).records()] == rows
