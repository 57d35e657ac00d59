"""Gradient checkpointing changes memory, not maths: the same loss and gradients with dropout on
(the recompute replays the masks), through cached MNRL's replay and packed rows, and exact resume."""
import pytest
import torch

from dist_embed.data.rows import Row
from dist_embed.model.fast_dropout import use_fast_dropout
from dist_embed.model.encoder import Encoder
from dist_embed.engine.setup import enable_checkpointing

from conftest import quick_triplets, run_cli, step_parts, tiny_config, train_losses, write_jsonl


def grads_of(model_dir, spec, rows, checkpointing: bool, fast: bool):
    enc = Encoder.from_pretrained(str(model_dir), dropout=0.1)
    if fast:
        use_fast_dropout(enc.transformer)
    if checkpointing:
        enable_checkpointing(enc.transformer)
    enc.train()
    batch = spec.batch(enc, rows)
    torch.manual_seed(5)
    loss, _ = spec.step(enc, batch)
    return float(loss), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name,pack,fast", [("mnrl", "auto", True), ("mnrl", 0, False),
                                                 ("cached_mnrl", 0, True), ("cached_mnrl", "auto", False)])
def test_same_loss_and_gradients_with_dropout_on(tiny_model, loss_name, pack, fast):
    rows = [Row(i, (r["anchor"], r["positive"], r["negative"]), None) for i, r in enumerate(quick_triplets(20))]
    spec = step_parts(loss_name, mini_batch_size=6, pack=pack, chunk=8)
    l0, g0 = grads_of(tiny_model, spec, rows, False, fast)
    l1, g1 = grads_of(tiny_model, spec, rows, True, fast)
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert (g0[name] - g1[name]).abs().max() < 1e-6 * max(1.0, float(g0[name].abs().max())), name


@pytest.mark.slow
def test_resume_is_exact_with_gradient_checkpointing(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(96))
    cfg = tiny_config(tmp_path, tiny_model, data, model={"dropout": 0.1}, loss={"name": "cached_mnrl",
                      "mini_batch_size": 3}, training={"max_steps": 4, "gradient_checkpointing": True},
                      checkpoint={"steps": 2})
    plain, straight, resumed = tmp_path / "plain", tmp_path / "straight", tmp_path / "resumed"
    runs = [(plain, ["training.gradient_checkpointing=false"]), (straight, []),
            (resumed, ["--resume", str(straight / "checkpoints" / "step-2")])]
    for out, extra in runs:
        r = run_cli("train", cfg, f"output_dir={out}", "--nproc", "2", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b, c = train_losses(plain), train_losses(straight), train_losses(resumed)
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    for step in c:
        assert abs(b[step] - c[step]) <= 1e-6 * abs(b[step]), (step, b[step], c[step])
