from pathlib import Path

import pytest

from dist_embed.config import ConfigError, load_config, parse_override

from conftest import REPO, run_cli


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "output_dir: out\ndata:\n  train: x.jsonl\n"


def test_shipped_configs_validate():
    for name in ("quickstart.yaml", "nli-mnrl.yaml", "multi-dataset.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.loss.name == "mnrl" and cfg.data.no_duplicates
    shipped = [p for p in (REPO / "configs").rglob("*") if p.is_file()] + [REPO / "README.md"]
    assert not [p for p in shipped if "../shared" in p.read_text()], "configs/README must not need ../shared"
    mix = load_config(REPO / "configs" / "multi-dataset.yaml").data.datasets()
    assert [d.loss.name if d.loss else None for d in mix] == [None, "cosine"]
    for d in mix:
        assert (REPO / d.path).is_file()  # shipped data only


@pytest.mark.parametrize("data,message", [
    ("train: []", "an empty list of datasets"),
    ("train: [{name: a, path: x.jsonl}, {name: a, path: y.jsonl}]", "two datasets are named 'a'"),
    ("train: [{name: a, path: x.jsonl}, {name: b, path: y.jsonl, weight: 2}]\n  sampler: weighted",
     "needs a weight on every dataset; 'a' has none"),
    ("train: [{name: a, path: x.jsonl, weight: 1}]", "set data.sampler=weighted"),
    ("train: [{name: 'a b', path: x.jsonl}]", "train.0.name"),
    ("train: [{name: a, path: x.jsonl, loss: {name: nope}}]", "train.0.loss.name"),
    ("train: x.jsonl\n  sampler: random", "data.sampler"),
])
def test_bad_dataset_lists_are_one_line_errors(tmp_path, data, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, f"output_dir: out\ndata:\n  {data}\n"))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["training.lr=3e-5", "training.max_steps=50", "model.normalize=true",
                                              "output_dir=runs/qs"])
    assert cfg.training.lr == 3e-5 and cfg.training.max_steps == 50 and cfg.model.normalize is True
    assert cfg.output_dir == "runs/qs"
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def test_unknown_key_names_file_line_and_key(tmp_path):
    p = write(tmp_path, BASE + "training:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:5: training.batch_sise: unknown key" in str(e.value)


def test_wrong_type_and_bad_value(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:5: training.batch_size: .*integer"):
        load_config(write(tmp_path, BASE + "training:\n  batch_size: many\n"))
    with pytest.raises(ConfigError, match=r"command line: model.pooling"):
        load_config(write(tmp_path, BASE), ["model.pooling=median"])


def test_missing_required_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match="data: missing required key"):
        load_config(write(tmp_path, "output_dir: o\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(write(tmp_path, BASE), ["training.lr"])


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    p = write(tmp_path, BASE + "loss:\n  name: mnrl\n  temperature: 0.05\n")
    r = run_cli("train", p)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "loss.temperature: unknown key" in r.stderr and f"{p}:6" in r.stderr


def test_number_like_strings_stay_strings(tmp_path):
    """A revision "2.0" or a run name "1e3" is text; numeric keys still get numbers."""
    text = BASE + 'model:\n  revision: "2.0"\ntraining:\n  lr: 5e-5\nlogging:\n  wandb:\n    name: "1e3"\n'
    cfg = load_config(write(tmp_path, text))
    assert cfg.model.revision == "2.0" and cfg.logging.wandb.name == "1e3" and cfg.training.lr == 5e-5
    cfg = load_config(write(tmp_path, BASE), ["model.revision=2.0", "logging.wandb.name=1e3", "training.lr=1e-4",
                                              "training.max_grad_norm=2", "data.max_rows=10"])
    assert cfg.model.revision == "2.0" and cfg.logging.wandb.name == "1e3"
    assert cfg.training.lr == 1e-4 and cfg.training.max_grad_norm == 2.0 and cfg.data.max_rows == 10
    r = run_cli("train", write(tmp_path, BASE), "model.revision=2.0", "training.lr=abc")
    assert r.returncode == 2 and "training.lr" in r.stderr and "Traceback" not in r.stderr
