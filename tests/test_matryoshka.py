"""Matryoshka training end to end: gathered negatives across 2 processes, each dimension evaluated,
the card notes them, bad settings refused in one line."""
import pytest

from conftest import QUICK, quick_triplets, read_metrics, run_cli, tiny_config, train_losses, write_jsonl

pytestmark = pytest.mark.slow


def test_matryoshka_with_gathered_negatives_equals_one_process_and_reports_each_dim(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(96))
    dev = tmp_path / "dev.tsv"
    dev.write_text("\n".join((QUICK / "snli-dev-pairs-1k.tsv").read_text().splitlines()[:81]) + "\n")
    cfg = tiny_config(tmp_path, tiny_model, data, loss={"name": "mnrl", "matryoshka_dims": [32, 16, 8],
                                                       "matryoshka_weights": [1, 1, 0.5]},
                      training={"max_steps": 4}, eval={"sts": [{"name": "dev", "path": str(dev)}]})
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"n{nproc}"
        # the same global batch (16) at both world sizes
        r = run_cli("train", cfg, f"output_dir={outs[nproc]}", "--nproc", str(nproc),
                    f"training.batch_size={16 // nproc}")
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = train_losses(outs[1]), train_losses(outs[2])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:  # dropout 0: the maths must match across world sizes
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    last = [m for m in read_metrics(outs[2]) if "eval/dev/spearman_cosine" in m][-1]
    for name in ("dev", "dev-dim16", "dev-dim8"):
        assert f"eval/{name}/spearman_cosine" in last and f"eval/{name}/pearson_dot" in last
    assert "eval/dev-dim32/spearman_cosine" not in last  # the full width is "dev" itself
    card = (outs[2] / "final" / "README.md").read_text()
    assert "**Matryoshka dimensions:** 32, 16, 8" in card and "loss:MatryoshkaLoss" in card
    assert '"matryoshka_dims": [\n    32,\n    16,\n    8\n  ]' in card
    assert "#### MatryoshkaLoss" in card


@pytest.mark.parametrize("override,message", [
    ("loss.matryoshka_dims=[64,16]", "loss.matryoshka_dims: [64] wider than the model's 32-dimensional embeddings"),
    ("loss.matryoshka_weights=[1,2]", "matryoshka_weights: 2 weights for 0 matryoshka_dims"),
    ("loss.matryoshka_dims=[16,16]", "names a dimension twice"),
])
def test_bad_matryoshka_settings_are_one_line(tmp_path, tiny_model, override, message):
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(20))
    r = run_cli("train", tiny_config(tmp_path, tiny_model, data), override)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert message in r.stderr.strip().splitlines()[-1], r.stderr[-500:]
