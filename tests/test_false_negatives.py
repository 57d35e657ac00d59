"""False negatives in the gathered batch: same-text and guided masks pinned by hand, with gathered
negatives across real gloo ranks and with cached MNRL."""
import math
import random

import pytest
import torch

from dist_embed.distributed import DistState
from dist_embed.model.encoder import Encoder
from dist_embed.data.batch import Batch
from dist_embed.engine.losses import compute

from conftest import quick_triplets, run_cli, step_parts, tiny_config, train_losses, write_jsonl


def by_hand(a, cands, keep, labels, scale=20.0):
    """Cross-entropy of each anchor over the candidates it keeps."""
    total = 0.0
    for i in range(len(a)):
        sims = [scale * float(torch.nn.functional.cosine_similarity(a[i], c, dim=0)) for c in cands]
        kept = [s for j, s in enumerate(sims) if keep[i][j]]
        total += -sims[labels[i]] + math.log(sum(math.exp(s) for s in kept))
    return total / len(a)


@pytest.mark.parametrize("mode", ["same_text", "guided", "both"])
def test_masks_by_hand(tiny_model, mode):
    seed = random.SystemRandom().randrange(10**6)
    print("seed", seed)
    rng = random.Random(seed)
    rows = quick_triplets(40)
    n = rng.randrange(3, 12)
    pick = rng.sample(rows, n)
    texts = [[r["anchor"] for r in pick], [r["positive"] for r in pick], [r["negative"] for r in pick]]
    for _ in range(rng.randrange(1, 4)):  # repeated texts: an anchor's positive elsewhere in the batch
        i, j = rng.sample(range(n), 2)
        texts[rng.choice([1, 2])][j] = texts[1][i]
    g = torch.Generator().manual_seed(seed)
    embs = [torch.randn(n, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    guide = Encoder.from_pretrained(str(tiny_model)).eval() if mode != "same_text" else None
    margin = rng.choice([0.0, 0.05, 0.2])
    loss_fn = step_parts("mnrl", gather=False, mask_same_text=mode != "guided", guide=guide, guide_margin=margin).loss
    batch = Batch(features=[], texts=texts, row_ids=list(range(n)), scores=None, real_tokens=0, padded_tokens=0,
                  global_size=n, sizes=(n,), n_cols=3)
    loss, _ = compute(loss_fn, embs, batch, DistState())
    cand_texts = texts[1] + texts[2]
    keep = [[True] * (2 * n) for _ in range(n)]
    if mode != "guided":
        for i in range(n):
            for j, t in enumerate(cand_texts):
                if t == texts[1][i] and j != i:
                    keep[i][j] = False
    if guide is not None:
        ga, gc = guide.encode(texts[0]), guide.encode(cand_texts)
        for i in range(n):
            s = [float(torch.nn.functional.cosine_similarity(torch.tensor(ga[i]), torch.tensor(c), dim=0)) for c in gc]
            for j in range(2 * n):
                if s[j] > s[i] - margin + 1e-6 and j != i:
                    keep[i][j] = False
    assert sum(not k for row in keep for k in row) > 0 or mode == "guided"
    assert float(loss) == pytest.approx(by_hand(embs[0], torch.cat([embs[1], embs[2]]), keep,
                                                list(range(n))), rel=1e-6)


@pytest.mark.slow
def test_masks_with_gathered_negatives_and_cached_mnrl_equal_one_process(tmp_path, tiny_model):
    """2 ranks (gathered candidates) == 1 process, mnrl == cached_mnrl, with both masks on and texts
    repeated across ranks (no_duplicates off, so the same-text mask has work to do)."""
    rows = quick_triplets(48)
    for i in range(0, 48, 4):
        rows[i + 1]["positive"] = rows[i]["positive"]  # same positive text, often on the other rank
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    loss = {"mask_same_text": True, "guide_model": str(tiny_model), "guide_margin": 0.1}
    cfg = tiny_config(tmp_path, tiny_model, data, data={"no_duplicates": False, "shuffle": False},
                      loss=loss, training={"max_steps": 3, "batch_size": 16})
    runs = {}
    for name, args in {"one": ["--nproc", "1"], "two": ["--nproc", "2", "training.batch_size=8"],
                       "cached": ["--nproc", "2", "training.batch_size=8", "loss.name=cached_mnrl",
                                  "loss.mini_batch_size=3"]}.items():
        runs[name] = tmp_path / name
        r = run_cli("train", cfg, f"output_dir={runs[name]}", *args)
        assert r.returncode == 0, r.stderr[-3000:]
    a = train_losses(runs["one"])
    for other in ("two", "cached"):
        b = train_losses(runs[other])
        assert sorted(a) == sorted(b) == [1, 2, 3]
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (other, step, a[step], b[step])
    card = (runs["two"] / "final" / "README.md").read_text()
    assert '"mask_same_text": true' in card and '"guide_margin": 0.1' in card


def test_masks_need_in_batch_negatives(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(10))
    r = run_cli("train", tiny_config(tmp_path, tiny_model, data), "loss.name=triplet", "loss.mask_same_text=true")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "loss triplet has none" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_masks_and_token_budget_with_an_empty_slice_do_not_hang(tmp_path, tiny_model, backend):
    """7 rows, 2 ranks x 3: the last global batch has 1 row and rank 1 an empty slice. The masks'
    gathers and the token budget's mini-batch count still pair up across ranks (under ZeRO-3 every
    forward communicates); dropout on."""
    from test_deepspeed import ds_args

    rows = quick_triplets(7)
    rows[3]["positive"] = rows[0]["positive"]
    data = write_jsonl(tmp_path / "seven.jsonl", rows)
    cfg = tiny_config(tmp_path, tiny_model, data, model={"dropout": 0.1},
                      data={"no_duplicates": False},
                      loss={"name": "cached_mnrl", "mini_batch_tokens": 40, "mask_same_text": True,
                            "guide_model": str(tiny_model)},
                      training={"max_steps": -1, "batch_size": 3}, distributed={"timeout_s": 60})
    extra = ds_args("zero3") if backend == "zero3" else []
    r = run_cli("train", cfg, "--nproc", "2", *extra, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]
