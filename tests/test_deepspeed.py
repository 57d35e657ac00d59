"""DeepSpeed ZeRO 1/2/3 through accelerate, 2 real gloo processes, against our DDP path."""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_embed.config import ConfigError, load_config
from dist_embed.backends.deepspeed import fill_ds_config, read_ds_config

from conftest import QUICK, REPO, quick_triplets, read_metrics, run_cli, tiny_config, train_losses, write_jsonl

DS = REPO / "configs" / "deepspeed"
TEXTS = ["A man is playing a guitar.", "Two dogs run through the snow.", "A woman slices an onion."]


def ds_args(name: str) -> list[str]:
    return ["distributed.backend=deepspeed", f"distributed.deepspeed_config={DS / name}.json"]


def train(cfg, out, *args, expect=0):
    r = run_cli("train", cfg, f"output_dir={out}", *args)
    assert r.returncode == expect, r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """A config that exercises every part of a step: cached MNRL (several backward passes per
    step), gradient accumulation, gathered negatives, evaluation and checkpoints; and its DDP run."""
    tmp = tmp_path_factory.mktemp("ds")
    # an odd number of eval batches (240 texts): under ZeRO-3 the rank with fewer batches must still
    # run every gathering forward (lockstep), else the evaluation hangs
    eval_batch = random.Random(os.environ.get("DIST_EMBED_FUZZ_SEED", "0")).choice([48, 56, 80, 96])
    print(f"eval batch size {eval_batch}")
    train_file = write_jsonl(tmp / "train.jsonl", quick_triplets(200))
    sts = tmp / "dev.tsv"
    sts.write_text("\n".join((QUICK / "snli-dev-pairs-1k.tsv").read_text().splitlines()[:121]) + "\n")
    cfg = tiny_config(tmp, tiny_model, train_file, data={"no_duplicates": True},
                      loss={"name": "cached_mnrl", "mini_batch_size": 3},
                      training={"max_steps": 6, "grad_accum": 2, "lr": 1e-3},
                      eval={"steps": 3, "batch_size": eval_batch, "sts": [{"name": "dev", "path": str(sts)}]},
                      checkpoint={"steps": 3, "keep_last": 5})
    ddp = tmp / "ddp"
    train(cfg, ddp, "--nproc", "2")
    return cfg, ddp


def evals(run: Path) -> list[float]:
    return [r["eval/dev/spearman_cosine"] for r in read_metrics(run) if "eval/dev/spearman_cosine" in r]


def embed(path: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(TEXTS)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_zero_stage_matches_ddp(tmp_path, setup, stage):
    cfg, ddp = setup
    out = tmp_path / stage
    r = train(cfg, out, "--nproc", "2", *ds_args(stage))
    assert f"DeepSpeed ZeRO stage {stage[-1]}" in r.stderr
    a, b = train_losses(ddp), train_losses(out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (stage, step, a[step], b[step])
    # evaluation saw the whole model (ZeRO-3: gathered), not a shard
    assert np.allclose(evals(ddp), evals(out), atol=1e-4) and len(evals(out)) == 2
    # every checkpoint and final/ is a complete sentence-transformers model
    assert np.abs(embed(ddp / "final") - embed(out / "final")).max() < 1e-4
    assert np.abs(embed(ddp / "checkpoints" / "step-3") - embed(out / "checkpoints" / "step-3")).max() < 1e-4
    state = out / "checkpoints" / "step-3" / "training_state"
    assert list((state / "deepspeed").glob("*optim_states.pt")), "DeepSpeed's sharded optimizer state is missing"
    assert json.loads((state / "trainer.json").read_text())["backend"] == {
        "backend": "deepspeed", "zero_stage": int(stage[-1]), "world_size": 2}
    filled = json.loads((out / "deepspeed_config.json").read_text())
    assert filled["train_batch_size"] == 8 * 2 * 2 and filled["optimizer"]["params"]["lr"] == 1e-3


@pytest.mark.slow
def test_zero2_stop_and_resume_continues_with_the_same_losses(tmp_path, setup):
    cfg, _ = setup
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cfg, straight, "--nproc", "2", *ds_args("zero2"))
    r = train(cfg, resumed, "--nproc", "2", *ds_args("zero2"), "--resume", straight / "checkpoints" / "step-3")
    assert "resumed from" in r.stderr
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in b:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])
    assert np.abs(embed(straight / "final") - embed(resumed / "final")).max() < 1e-6
    # another stage, another world size or DDP: refused with what is supported
    ckpt = straight / "checkpoints" / "step-3"
    for args in (["--nproc", "2", *ds_args("zero3")], ["--nproc", "1", *ds_args("zero2")], ["--nproc", "2"]):
        r = train(cfg, tmp_path / "other", *args, "--resume", ckpt, expect=2)
        assert "DeepSpeed ZeRO-2 with 2 processes" in r.stderr and "same ZeRO stage and world size" in r.stderr


# -- the config filling, no processes ------------------------------------------------------------


def _prec(cfg):
    from dist_embed.engine.precision import Precision

    return Precision.for_device(cfg.training.precision, torch.device("cpu"))


def _cfg(tmp_path, **training):
    return load_config(None, [f"output_dir={tmp_path}", "data.train=x.jsonl"] +
                       [f"training.{k}={v}" for k, v in training.items()])


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3-offload"])
def test_shipped_configs_fill_every_auto_from_our_config(tmp_path, name):
    cfg = _cfg(tmp_path, batch_size=16, grad_accum=4, lr=2e-5, max_grad_norm=0.5, precision="bf16", weight_decay=0.1)
    ds = fill_ds_config(read_ds_config(str(DS / f"{name}.json")), cfg, world_size=8, hidden_size=384,
                        precision=_prec(cfg))
    assert "auto" not in json.dumps(ds)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (16, 4, 16 * 4 * 8)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["lr"] == 2e-5 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no fused-Adam JIT build
    assert ds["zero_optimization"]["reduce_bucket_size"] == 384 * 384
    assert ds["managed_gradient_accumulation"] is False


def test_ds_config_errors_name_the_file_and_key(tmp_path):
    cfg = _cfg(tmp_path, batch_size=16)
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2},\n  "train_micro_batch_size_per_gpu": 8\n}\n')
    with pytest.raises(ConfigError, match=r"ds\.json: train_micro_batch_size_per_gpu: 8 contradicts .* 16"):
        fill_ds_config(read_ds_config(str(bad)), cfg, 2, 32, _prec(cfg), origin=str(bad))
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(ConfigError, match=r"ds\.json:2: invalid JSON"):
        read_ds_config(str(bad))
    base = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match="scheduler: remove this section"):
        fill_ds_config({**base, "scheduler": {"type": "WarmupLR"}}, cfg, 2, 32, _prec(cfg))
    with pytest.raises(ConfigError, match=r"no value to fill \"auto\" in zero_optimization.sub_group_size"):
        fill_ds_config({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, cfg, 2, 32, _prec(cfg))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        fp16 = _cfg(tmp_path, precision="fp16")
        fill_ds_config(base, fp16, 2, 32, _prec(fp16))
    with pytest.raises(ConfigError, match="stage: expected 1, 2 or 3"):
        fill_ds_config({"zero_optimization": {"stage": 0}}, cfg, 2, 32, _prec(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("stage,loss", [("zero3", "cached_mnrl"), ("zero2", "mnrl"), ("zero3", "triplet")])
def test_ragged_tail_smaller_than_the_world_trains_under_zero(tmp_path, tiny_model, stage, loss):
    """Rank 1 holds an empty slice in the last batch (7 rows, 2 x 3 per batch: 6 + 1) and rank 0
    has more mini-batches than rank 1 in cached MNRL: under ZeRO every forward and backward
    communicates, so every rank must run as many as the others (placeholder passes)."""
    data = write_jsonl(tmp_path / "seven.jsonl", quick_triplets(7))
    cfg = tiny_config(tmp_path, tiny_model, data, model={"dropout": None},
                      loss={"name": loss, "mini_batch_size": 2},
                      training={"max_steps": -1, "batch_size": 3}, distributed={"timeout_s": 60})
    out = tmp_path / "run"
    r = run_cli("train", cfg, f"output_dir={out}", "--nproc", "2", *ds_args(stage), timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(train_losses(out)) == [1, 2]


@pytest.mark.slow
def test_a_dense_head_trains_and_saves_under_zero3_as_under_ddp(tmp_path, tiny_model):
    """Transformer + Pooling + Dense + Normalize: ZeRO-3 partitions the Dense layer too; it is
    gathered for evaluation and saving, and the result equals our DDP path's."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    base = SentenceTransformer(str(tiny_model), device="cpu")
    SentenceTransformer(modules=[base[0], base[1], modules.Dense(32, 24), modules.Normalize()],
                        device="cpu").save(str(tmp_path / "start"))
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(96))
    cfg = tiny_config(tmp_path, tmp_path / "start", data, training={"max_steps": 4})
    train(cfg, tmp_path / "ddp", "--nproc", "2")
    train(cfg, tmp_path / "z3", "--nproc", "2", *ds_args("zero3"))
    a, b = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "z3")
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    assert (tmp_path / "z3" / "final" / "2_Dense" / "model.safetensors").is_file()
    got = embed(tmp_path / "z3" / "final")
    assert got.shape == (3, 24)
    assert np.abs(embed(tmp_path / "ddp" / "final") - got).max() < 1e-4
