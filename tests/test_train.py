"""End-to-end single-process runs of the real CLI on the tiny model."""
import json
import re

import numpy as np

from dist_embed.outputs.checkpoint import verify

from conftest import QUICK, read_metrics, run_cli, tiny_config, write_jsonl, quick_triplets


def test_train_writes_metrics_checkpoints_and_final(tmp_path, tiny_model, triplets):
    cfg = tiny_config(tmp_path, tiny_model, triplets,
                      eval={"sts": [{"name": "snli", "path": str(QUICK / "snli-dev-pairs-1k.tsv")}], "steps": 3,
                            "before_training": True},
                      checkpoint={"steps": 2, "keep_last": 2})
    r = run_cli("train", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    metrics = read_metrics(out)
    train_lines = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3, 4, 5, 6]
    for m in train_lines:
        assert {"epoch", "loss", "lr", "samples_per_second", "tokens_per_second"} <= m.keys()
        assert np.isfinite(m["loss"])
    # the progress lines report the logging window's rate (not the freshly reset one: 0)
    rates = [float(x) for x in re.findall(r"samples/s=([0-9.e+-]+)", r.stderr)]
    assert rates and all(x > 0 for x in rates), r.stderr[-2000:]
    evals = [m for m in metrics if "eval/snli/spearman_cosine" in m]
    assert [m["step"] for m in evals] == [0, 3, 6]
    # warm-up: lr rises for 2 steps then decays linearly to 0
    lrs = [m["lr"] for m in train_lines]
    assert lrs[0] < lrs[1] and lrs[-1] == 0.0 and lrs[1] > lrs[2] > lrs[3]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-4"]  # keep_last=2 pruned step-... and final is separate
    for d in [out / "checkpoints" / "step-4", out / "final"]:
        assert verify(d) is None
        for f in ["model.safetensors", "config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json",
                  "config_sentence_transformers.json", "1_Pooling/config.json"]:
            assert (d / f).is_file(), f
    state = out / "checkpoints" / "step-4" / "training_state"
    assert {p.name for p in state.iterdir()} >= {"optimizer.pt", "scheduler.pt", "rng-rank0.pt", "trainer.json"}
    assert json.loads((state / "trainer.json").read_text())["step"] == 4
    # `dist-embed eval` on the result prints one JSON object as its last line, same numbers as the run
    r = run_cli("eval", out / "final", "--sts", f"snli={QUICK / 'snli-dev-pairs-1k.tsv'}")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(got["eval/snli/spearman_cosine"] - evals[-1]["eval/snli/spearman_cosine"]) < 1e-6


def test_bad_row_stops_before_training_and_writes_nothing(tmp_path, tiny_model):
    rows = quick_triplets(40)
    rows[17] = {"anchor": "fine", "positive": "   ", "negative": "x"}
    train = write_jsonl(tmp_path / "bad.jsonl", rows)
    r = run_cli("train", tiny_config(tmp_path, tiny_model, train))
    assert r.returncode == 2
    assert f"{train}:18: column 'positive': empty or whitespace-only text" in r.stderr
    out = tmp_path / "run"
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def test_skip_mode_trains_and_reports(tmp_path, tiny_model):
    rows = quick_triplets(60)
    rows[3] = {"anchor": None, "positive": "p", "negative": "n"}
    train = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = tiny_config(tmp_path, tiny_model, train, data={"on_error": "skip", "max_skip_fraction": 0.05},
                      training={"max_steps": 2})
    r = run_cli("train", cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 rows skipped: 1 column 'anchor': null text" in r.stderr


def test_fp16_on_cpu_is_refused_not_silently_fp32(tmp_path, tiny_model, triplets):
    r = run_cli("train", tiny_config(tmp_path, tiny_model, triplets), "training.precision=fp16")
    assert r.returncode == 2 and "fp16 needs a CUDA GPU" in r.stderr


def test_bf16_and_other_losses_run(tmp_path, tiny_model, triplets):
    for i, extra in enumerate([["training.precision=bf16"], ["loss.name=triplet"],
                               ["loss.name=cached_mnrl", "loss.mini_batch_size=3"]]):
        r = run_cli("train", tiny_config(tmp_path, tiny_model, triplets), f"output_dir={tmp_path}/r{i}",
                    "training.max_steps=2", *extra)
        assert r.returncode == 0, (extra, r.stderr[-2000:])
        assert (tmp_path / f"r{i}" / "final" / "model.safetensors").exists()
