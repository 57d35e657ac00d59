"""Token-budget mini-batches for cached MNRL: groups within the budget, and the same loss and
gradients as fixed-size mini-batches, in one process and across 2 gloo ranks."""
import random

import pytest
import torch

from dist_embed.data.rows import Row
from dist_embed.engine.step import token_chunks

from conftest import quick_triplets, run_cli, step_parts, tiny_config, train_losses, write_jsonl
from test_speedups import loss_and_grads


def test_token_chunks_cover_every_row_once_within_the_budget():
    seed = random.SystemRandom().randrange(10**6)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(200):
        n, width = rng.randrange(0, 40), rng.randrange(1, 60)
        lengths = [rng.randrange(1, width + 1) for _ in range(n)]
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, length in enumerate(lengths):
            mask[i, :length] = 1
        budget = rng.randrange(1, 400)
        groups = token_chunks({"attention_mask": mask}, budget)
        assert sorted(int(i) for g in groups for i in g) == list(range(n))
        for g in groups:
            longest = max(lengths[int(i)] for i in g)
            assert len(g) == 1 or len(g) * longest <= budget


@pytest.mark.parametrize("budget", [1, 40, 150, 10_000])
def test_token_budget_gives_the_fixed_mini_batch_loss_and_gradients(tiny_model, budget):
    rows = [Row(i, (r["anchor"], r["positive"], r["negative"]), None) for i, r in enumerate(quick_triplets(30))]
    l0, g0 = loss_and_grads(tiny_model, step_parts("cached_mnrl", mini_batch_size=7), rows)
    l1, g1 = loss_and_grads(tiny_model, step_parts("cached_mnrl", mini_batch_tokens=budget), rows)
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    assert g0.keys() == g1.keys()
    scale = max(float(g.abs().max()) for g in g0.values())
    for name in g0:
        assert (g0[name] - g1[name]).abs().max() < 1e-5 * max(scale, 1.0), name


@pytest.mark.slow
def test_token_budget_across_ranks_equals_fixed_mini_batches(tmp_path, tiny_model):
    """2 ranks whose slices need different numbers of mini-batches give the losses of fixed-size
    mini-batches. Dropout 0: other groupings draw other dropout masks, so only the dropout-free
    maths can be equal (the replay of each grouping is exact either way: test_resume)."""
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(64))
    cfg = tiny_config(tmp_path, tiny_model, data,
                      loss={"name": "cached_mnrl", "mini_batch_size": 4}, training={"max_steps": 3})
    a, b = tmp_path / "rows", tmp_path / "tokens"
    for out, extra in ((a, []), (b, ["loss.mini_batch_tokens=96"])):
        r = run_cli("train", cfg, f"output_dir={out}", "--nproc", "2", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3]
    for step in la:
        assert abs(la[step] - lb[step]) <= 1e-5 * abs(la[step]), (step, la[step], lb[step])
