"""W&B (offline, read back with wandb's own tool), model cards, the report command."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICK, read_metrics, run_cli, tiny_config

SECRET = "0123456789abcdef0123456789abcdef01234567"  # a fake W&B API key that must never be written


def wandb_summary(run_dir: Path) -> dict:
    exe = Path(sys.executable).parent / "wandb"
    r = subprocess.run([str(exe), "leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wandb_history(run_dir: Path) -> list[dict]:
    exe = Path(sys.executable).parent / "wandb"
    r = subprocess.run([str(exe), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    return [x["history"]["item"] for x in recs if x.get("type") == "history"]


@pytest.fixture
def monitored_run(tmp_path, tiny_model, triplets):
    cfg = tiny_config(tmp_path, tiny_model, triplets,
                      eval={"sts": [{"name": "snli", "path": str(QUICK / "snli-dev-pairs-1k.tsv")}], "steps": 2},
                      training={"max_steps": 4}, checkpoint={"steps": 2},
                      logging={"wandb": {"project": "dist-embed-test", "mode": "offline", "tags": ["ci"]}})
    r = run_cli("train", cfg, env={"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, tmp_path / "run", r


def test_wandb_offline_run_reads_back(monitored_run):
    cfg, out, r = monitored_run
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    s = wandb_summary(runs[0])
    assert s["run_id"] == run_id and s["project"] == "dist-embed-test" and s["state"] == "finished"
    assert s["config"]["training"]["max_steps"] == 4 and s["config"]["system"]["world_size"] == 1
    assert "eval/snli/spearman_cosine" in s["summary"]
    hist = wandb_history(runs[0])
    losses = [h["train/loss"] for h in hist if "train/loss" in h]
    assert len(losses) == 4
    ours = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert losses == pytest.approx(ours)
    # the same W&B run continues after --resume
    r2 = run_cli("train", cfg, "training.max_steps=6", "--resume", "latest", env={"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert (out / "wandb_run_id").read_text().strip() == run_id
    assert len(sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1
    # the key is nowhere in what we wrote or printed
    for text in [r.stderr, r.stdout, r2.stderr, r2.stdout]:
        assert SECRET not in text
    for f in out.rglob("*"):
        if f.is_file() and "wandb" not in f.parts and f.suffix not in (".safetensors", ".pt"):
            assert SECRET not in f.read_text(errors="ignore"), f


def test_model_card_renders_and_directory_still_loads(monitored_run):
    from sentence_transformers import SentenceTransformer

    _, out, _ = monitored_run
    card = (out / "final" / "README.md").read_text()
    assert card.startswith("---\ntags:\n- sentence-transformers")
    assert "pipeline_tag: sentence-similarity" in card and "library_name: sentence-transformers" in card
    for section in ["### Full Model Architecture", "## Usage", "### Training Dataset", "Approximate statistics",
                    "* Loss: `MultipleNegativesRankingLoss`", '"scale": 20.0', "#### Non-Default Hyperparameters",
                    "#### All Hyperparameters", "### Training Logs", "#### Semantic Similarity", "* Dataset: `snli`",
                    "### Framework Versions", "henderson2017efficient", "reimers-2019-sentence-bert"]:
        assert section in card, section
    assert "| **" in card and "**4**" in card  # the saved step's row in bold
    ck = (out / "checkpoints" / "step-2" / "README.md").read_text()
    assert "**2**" in ck
    model = SentenceTransformer(str(out / "final"), device="cpu")
    assert model.encode(["a dog"]).shape == (1, 32)


def test_report_summary_and_plot(monitored_run):
    _, out, _ = monitored_run
    r = run_cli("report", out)
    assert r.returncode == 0, r.stderr
    assert "eval/snli/spearman_cosine" in r.stdout and "steps        4" in r.stdout
    png = out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert run_cli("report", out / "nope").returncode == 2


def test_wandb_without_key_or_mode_runs_offline_and_says_where(tmp_path, tiny_model, triplets):
    """Offline without a key, its files where the user's WANDB_DIR says (else OUTPUT_DIR/wandb:
    the resume test below)."""
    cfg = tiny_config(tmp_path, tiny_model, triplets, training={"max_steps": 1},
                      logging={"wandb": {"project": "p"}})
    elsewhere = tmp_path / "wandb-files"
    elsewhere.mkdir()
    r = run_cli("train", cfg, env={"WANDB_API_KEY": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none"),
                                   "WANDB_DIR": str(elsewhere)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "W&B: no API key found; logging offline" in r.stderr
    assert f"wandb sync {elsewhere / 'wandb'}" in r.stderr
    assert list((elsewhere / "wandb").glob("offline-run-*")) and not (tmp_path / "run" / "wandb").exists()


def test_wandb_and_metrics_hold_one_history_after_a_resume(tmp_path, tiny_model, triplets):
    """Resuming from an earlier checkpoint redoes steps: metrics.jsonl keeps them once (the redone
    ones), W&B (which cannot take back a step) is not sent them again; with exact resume both agree."""
    cfg = tiny_config(tmp_path, tiny_model, triplets, model={"dropout": None}, training={"max_steps": 6},
                      checkpoint={"steps": 2, "keep_last": 5},
                      logging={"wandb": {"project": "dist-embed-test", "mode": "offline"}})
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline"}
    assert run_cli("train", cfg, env=env).returncode == 0
    r = run_cli("train", cfg, "--resume", str(out / "checkpoints" / "step-2"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # steps 3-6 and the first run's closing record (its whole-run peak memory at step 6)
    assert "dropped 5 records after step 2" in r.stderr
    ours = {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    run_id = (out / "wandb_run_id").read_text().strip()
    logged = {}
    for run_dir in sorted((out / "wandb").glob(f"offline-run-*-{run_id}")):
        for h in wandb_history(run_dir):
            if "train/loss" in h:
                assert h["_step"] not in logged, "a step sent to W&B twice"
                logged[h["_step"]] = h["train/loss"]
    assert logged == pytest.approx(ours)
