"""Every speed-up must leave the maths alone: same loss and gradients as the plain path (fp32)."""
import pytest
import torch

from dist_embed.data.loader import collate
from dist_embed.data.readers import Row
from dist_embed.distributed import DistState
from dist_embed.model import Encoder
from dist_embed.step import StepSpec, forward_backward

from conftest import quick_triplets


def loss_and_grads(model_dir, spec, rows):
    torch.manual_seed(0)
    enc = Encoder.from_pretrained(str(model_dir), dropout=0.0)
    enc.train()
    batch = collate(rows, enc.tokenizer, enc.max_seq_length)
    batch.update(global_size=len(rows), sizes=[len(rows)])
    loss, _ = forward_backward(enc, batch, spec, DistState())
    grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    return loss, grads


@pytest.mark.parametrize("loss_name", ["mnrl", "triplet", "cached_mnrl"])
@pytest.mark.parametrize("chunk,pack", [(1, 0), (5, 0), (16, 0), (0, 32), (0, 128)])
def test_length_sorted_chunks_and_packing_change_nothing(tiny_model, loss_name, chunk, pack):
    rows = [Row(i, (r["anchor"], r["positive"], r["negative"]), None) for i, r in enumerate(quick_triplets(24))]
    plain = StepSpec(loss_name, mini_batch_size=7)
    fast = StepSpec(loss_name, mini_batch_size=7, chunk=chunk, pack=pack)
    l0, g0 = loss_and_grads(tiny_model, plain, rows)
    l1, g1 = loss_and_grads(tiny_model, fast, rows)
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-5), name
    scale = max(float(g.abs().max()) for g in g0.values())
    assert max(float((g0[n] - g1[n]).abs().max()) for n in g0) < 1e-5 * max(scale, 1.0)


def test_chunks_really_cut_padding(tiny_model):
    """Sanity check on what the speed-up is for: the chunked path pads far less."""
    enc = Encoder.from_pretrained(str(tiny_model))
    rows = [Row(i, (r["anchor"], r["positive"], r["negative"]), None) for i, r in enumerate(quick_triplets(64))]
    batch = collate(rows, enc.tokenizer, enc.max_seq_length)
    real = batch["real_tokens"]
    per_column = batch["padded_tokens"]
    lengths = sorted((int(m) for f in batch["features"] for m in f["attention_mask"].sum(1)), reverse=True)
    chunked = sum(max(lengths[i:i + 16]) * len(lengths[i:i + 16]) for i in range(0, len(lengths), 16))
    assert real / chunked > 0.85 and real / per_column < 0.75


def test_fast_tokenization_equals_the_tokenizer_call(minilm):
    from transformers import AutoTokenizer

    from dist_embed.data.loader import tokenize_columns

    tok = AutoTokenizer.from_pretrained(str(minilm))
    rows = quick_triplets(300)
    columns = [[r[c] for r in rows] for c in ("anchor", "positive", "negative")]
    columns[0][5] = "word " * 300  # longer than max_length: truncated the same way
    ours = tokenize_columns(tok, columns, 64)
    for col, feat in zip(columns, ours):
        ref = tok(col, padding=True, truncation=True, max_length=64, return_tensors="pt")
        assert feat.keys() == dict(ref).keys()
        for k in feat:
            assert torch.equal(feat[k], ref[k]), k


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", False)])
def test_packed_embeddings_equal_one_text_at_a_time(tiny_model, pooling, normalize):
    from dist_embed.step import embed_packed

    enc = Encoder.from_pretrained(str(tiny_model), pooling=pooling, normalize=normalize, dropout=0.0).eval()
    rows = quick_triplets(20)
    cols = [[r["anchor"] for r in rows], [r["positive"] for r in rows]]
    feats = [enc.tokenize(c) for c in cols]
    with torch.no_grad():
        packed = embed_packed(enc, feats, 64)
        for col, emb in zip(cols, packed):
            alone = torch.cat([enc(enc.tokenize([t])) for t in col])
            assert (emb - alone).abs().max() < 1e-5
