"""The unpadded layout (every real token of every text, one variable-length attention): the layout
arithmetic, and the same embeddings, losses and gradients as padded columns, in fp32 on CPU where
a reference attention (SDPA text by text) stands in for the CUDA kernel over the same indexing.
Shapes and texts are drawn from a printed seed (DIST_EMBED_FUZZ_SEED replays one)."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from dist_embed.data.layout import LayoutSpec, build, pack_rows, sub_unpadded
from dist_embed.data.rows import Row
from dist_embed.engine.step import token_ranges

from conftest import MULTILINGUAL, quick_triplets, step_parts
from test_speedups import loss_and_grads

SEED = int(os.environ.get("DIST_EMBED_FUZZ_SEED", random.randrange(10**6)))


def padded(lengths, width=None, left=False, rng=None):
    """A padded column of random token ids with these lengths."""
    width = width or max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        row = slice(width - n, width) if left else slice(0, n)
        ids[i, row] = rng.integers(5, 1000, n)
        mask[i, row] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_unpadded_and_packed_layouts_place_every_token_once():
    rng = np.random.default_rng(SEED)
    for case in range(200):
        cols = [padded(list(rng.integers(1, 40, rng.integers(1, 9))), left=bool(rng.integers(2)), rng=rng)
                for _ in range(rng.integers(1, 4))]
        bucket, offset = int(rng.choice([0, 16, 64])), int(rng.choice([0, 2]))
        note = f"seed {SEED} case {case}"
        lay = build(cols, LayoutSpec("unpadded", pad_id=0, position_offset=offset, bucket=bucket, max_filler=24))
        texts = [f["input_ids"][i][f["attention_mask"][i].astype(bool)] for f in cols for i in range(len(f["input_ids"]))]
        lengths = [len(t) for t in texts]
        assert lay.lengths == tuple(lengths) and list(lay.counts) == lengths, note
        assert lay.column_sizes == tuple(len(f["input_ids"]) for f in cols), note
        cu = lay.cu_seqlens
        assert cu[0] == 0 and cu[-1] == len(lay.input_ids) and (np.diff(cu) > 0).all(), note
        assert (np.diff(cu) <= lay.max_seqlen).all(), note
        if bucket:
            assert len(lay.input_ids) % bucket == 0 and len(lay.input_ids) - sum(lengths) < bucket, note
        for i, text in enumerate(texts):  # each text: its own tokens, positions from the offset
            a, b = cu[i], cu[i + 1]
            assert (lay.input_ids[a:b] == text).all() and (lay.position_ids[a:b] == np.arange(b - a) + offset).all()
        assert sum(lay.lengths) == sum(lengths) and lay.cu_seqlens[len(texts)] == sum(lengths), note  # fillers last
        first, last = sorted(rng.choice(len(texts) + 1, 2, replace=False))
        sub = sub_unpadded(lay, int(first), int(last))
        for j, i in enumerate(range(first, last)):
            assert (sub.input_ids[sub.cu_seqlens[j]:sub.cu_seqlens[j + 1]] == texts[i]).all(), note
        packed = build(cols, LayoutSpec("packed", pad_id=0, position_offset=offset, row_len="auto"))
        flat = packed.input_ids.reshape(-1)
        assert (flat[packed.slot] == np.concatenate(texts)).all(), note
        owner = np.repeat(np.arange(len(texts)), lengths)  # text after text, as the pooling reads them
        assert (packed.segment.reshape(-1)[packed.slot] == owner).all(), note


def test_token_ranges_cover_every_text_once_within_the_budget():
    rng = random.Random(SEED)
    for _ in range(300):
        lengths = [rng.randrange(1, 50) for _ in range(rng.randrange(0, 30))]
        budget = rng.randrange(1, 200)
        ranges = token_ranges(lengths, budget)
        assert [i for a, b in ranges for i in range(a, b)] == list(range(len(lengths)))
        assert all(b - a == 1 or sum(lengths[a:b]) <= budget for a, b in ranges)
    assert pack_rows([3, 2], 5) == [[0, 1]]


def rows_for(loss_name: str, n: int, seed: int):
    rng = random.Random(seed)
    texts = [r[c] for r in quick_triplets(200) for c in ("anchor", "positive", "negative")] + MULTILINGUAL
    pick = lambda: rng.choice(texts)  # noqa: E731
    if loss_name == "cosine":
        return [Row(i, (pick(), pick()), rng.random()) for i in range(n)]
    width = 3 if loss_name in ("triplet", "cached_mnrl") else rng.choice([2, 3, 4])
    return [Row(i, tuple(pick() for _ in range(width)), None) for i in range(n)]


def assert_same(l0, g0, l1, g1, note):
    assert abs(l0 - l1) <= 1e-5 * max(abs(l0), 1e-6), (note, l0, l1)
    assert g0.keys() == g1.keys(), note
    for name in g0:  # relative to the gradient's size where it exceeds 1 (sums over every token)
        scale = max(1.0, float(g0[name].abs().max()))
        assert (g0[name] - g1[name]).abs().max() < 1e-5 * scale, (note, name)


@pytest.mark.parametrize("loss_name", ["mnrl", "cached_mnrl", "triplet", "cosine"])
def test_unpadded_equals_padded_for_bert(tiny_model, loss_name):
    seed = SEED + hash(loss_name) % 1000
    rows = rows_for(loss_name, random.Random(seed).randrange(3, 25), seed)
    budget = random.Random(seed).choice([None, 40, 200])
    kw = dict(mini_batch_size=random.Random(seed).randrange(2, 8), mini_batch_tokens=budget)
    l0, g0 = loss_and_grads(tiny_model, step_parts(loss_name, **kw), rows)
    for bucket in (0, 32):
        l1, g1 = loss_and_grads(tiny_model, step_parts(loss_name, layout="unpadded", bucket=bucket, **kw), rows)
        assert_same(l0, g0, l1, g1, f"seed {seed} {loss_name} bucket {bucket} budget {budget}")


@pytest.fixture(params=["xlmr", "roberta"])
def roberta_family(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def test_unpadded_equals_padded_for_roberta_types(roberta_family):
    """Positions from padding_idx + 1, as RoBERTa and XLM-R number them alone."""
    rows = rows_for("mnrl", 14, SEED)
    l0, g0 = loss_and_grads(roberta_family, step_parts("mnrl"), rows)
    l1, g1 = loss_and_grads(roberta_family, step_parts("mnrl", layout="unpadded"), rows)
    assert_same(l0, g0, l1, g1, f"seed {SEED}")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_unpadded_equals_padded_for_decoders(tmp_path, arch, padding_side):
    """Causal attention within each text, rotary positions from 0, pooled at each text's last token
    (grouped-query heads: 4 query heads share 2 key/value heads)."""
    from test_decoder import make_decoder

    path, _ = make_decoder(tmp_path / "m", arch, padding_side)
    rows = rows_for("mnrl", 10, SEED)
    l0, g0 = loss_and_grads(path, step_parts("mnrl"), rows)
    l1, g1 = loss_and_grads(path, step_parts("mnrl", layout="unpadded"), rows)
    assert_same(l0, g0, l1, g1, f"seed {SEED} {arch} {padding_side}")


def test_attention_dropout_keeps_its_rate_over_unpadded_tokens():
    """The reference varlen attention drops attention probabilities with probability p and scales
    the rest by 1 / (1 - p), as BERT's attention dropout does: uniform attention over L tokens with
    one-hot values makes every output entry (kept / (1 - p)) / L, so the zeros count the drops."""
    from dist_embed.model.varlen import reference_attention

    torch.manual_seed(SEED)
    lengths, p, heads = [37, 64, 5, 90], 0.1, 4
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    width = max(lengths)
    q = k = torch.zeros(sum(lengths), heads, 8)
    v = torch.cat([torch.eye(n, width)[:, None, :].expand(n, heads, width) for n in lengths])  # token t -> e_t
    out = reference_attention(q, k, v, cu, dropout=p)
    kept = torch.cat([(out[a:a + n, :, :n] * n * (1 - p)).reshape(-1) for a, n in zip(cu[:-1].tolist(), lengths)])
    assert torch.allclose(kept[kept > 0.5], torch.ones_like(kept[kept > 0.5]), atol=1e-5)  # survivors scaled
    rate = float((kept < 0.5).float().mean())
    assert abs(rate - p) < 0.01, rate  # ~52k draws: 0.01 is > 7 sigma
