"""Every speed-up must leave the maths alone: same loss and gradients as the plain path (fp32)."""
import os
from pathlib import Path

import pytest
import torch

from dist_embed.data.loader import collate
from dist_embed.data.rows import Row
from dist_embed.model.encoder import Encoder

from conftest import quick_triplets, step_parts


def loss_and_grads(model_dir, case, rows, dropout: float = 0.0, seed: int = 0):
    """A step's loss (a float) and gradients, from a fresh model and the same seed."""
    torch.manual_seed(seed)
    enc = Encoder.from_pretrained(str(model_dir), dropout=dropout)
    enc.train()
    batch = case.batch(enc, rows)
    loss, _ = case.step(enc, batch)
    grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    return float(loss), grads


@pytest.mark.parametrize("loss_name", ["mnrl", "triplet", "cached_mnrl"])
@pytest.mark.parametrize("chunk,pack", [(1, 0), (5, 0), (16, 0), (0, 32), (0, 128), (0, "auto")])
def test_length_sorted_chunks_and_packing_change_nothing(tiny_model, loss_name, chunk, pack):
    rows = [Row(i, (r["anchor"], r["positive"], r["negative"]), None) for i, r in enumerate(quick_triplets(24))]
    plain = step_parts(loss_name, mini_batch_size=7)
    fast = step_parts(loss_name, mini_batch_size=7, chunk=chunk, pack=pack)
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
    real = batch.real_tokens
    per_column = batch.padded_tokens
    lengths = sorted((int(m) for f in batch.features for m in f["attention_mask"].sum(1)), reverse=True)
    chunked = sum(max(lengths[i:i + 16]) * len(lengths[i:i + 16]) for i in range(0, len(lengths), 16))
    assert real / chunked > 0.85 and real / per_column < 0.75


def test_pack_rows_places_every_text_once_within_the_row_length():
    import random

    from dist_embed.data.layout import pack_rows

    rng = random.Random(0)
    for n, row_len in ((1, 5), (96, 52), (2000, 60), (300, 128)):
        lengths = [rng.randint(2, row_len) for _ in range(n)]
        rows = pack_rows(lengths, row_len)
        assert sorted(i for row in rows for i in row) == list(range(n))
        assert all(sum(lengths[i] for i in row) <= row_len for row in rows)
        # a row is opened only when no row can take the text: so at most one row is half empty or worse
        assert sum(sum(lengths[i] for i in row) <= row_len / 2 for row in rows) <= 1
    assert len(pack_rows([3, 3, 2, 2], 5)) == 2 and len(pack_rows([4, 1, 3, 2], 5)) == 2
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([6], 5)


@pytest.mark.parametrize("single_type_id", [0, 1])
def test_fast_tokenization_equals_the_tokenizer_call(minilm, single_type_id):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from dist_embed.data.tokenization import single_type_ids_are_zero, tokenize_columns

    tok = AutoTokenizer.from_pretrained(str(minilm))
    assert single_type_ids_are_zero(tok.backend_tokenizer)  # BERT's template: type ids not read back
    if single_type_id:  # a template that marks single texts with type 1: they must be read back
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="[CLS]:1 $A:1 [SEP]:1", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tok.cls_token_id), ("[SEP]", tok.sep_token_id)])
        assert not single_type_ids_are_zero(tok.backend_tokenizer)
    rows = quick_triplets(300)
    columns = [[r[c] for r in rows] for c in ("anchor", "positive", "negative")]
    columns[0][5] = "word " * 300  # longer than max_length: truncated the same way
    ours = tokenize_columns(tok, columns, 64)
    for col, feat in zip(columns, ours):
        ref = tok(col, padding=True, truncation=True, max_length=64, return_tensors="pt")
        assert feat.keys() == dict(ref).keys()
        for k in feat:
            assert torch.equal(feat[k], ref[k]), k
        assert int(feat["token_type_ids"].max()) == single_type_id


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", False)])
@pytest.mark.parametrize("kind,row_len,bucket", [("packed", 64, 0), ("packed", "auto", 0), ("unpadded", "auto", 0),
                                                 ("unpadded", "auto", 48)])
def test_laid_out_embeddings_equal_one_text_at_a_time(tiny_model, pooling, normalize, kind, row_len, bucket):
    """Packed rows and unpadded tokens (the reference varlen attention on CPU, with filler texts
    rounding the token count up to a bucket): each text's embedding is the one it gets alone."""
    from dist_embed.data.layout import LayoutSpec, build
    from dist_embed.data.batch import map_arrays
    from dist_embed.engine.precision import Precision
    from dist_embed.model.layout_choice import choose_layout
    import numpy as np
    from types import SimpleNamespace

    enc = Encoder.from_pretrained(str(tiny_model), pooling=pooling, normalize=normalize, dropout=0.0).eval()
    rows = quick_triplets(20)
    cols = [[r["anchor"] for r in rows], [r["positive"] for r in rows]]
    with torch.no_grad():
        alone = [torch.cat([enc(enc.tokenize([t])) for t in col]) for col in cols]
        varlen = Precision("fp32", "cpu").varlen(enc.transformer.config)
        spec = choose_layout(enc, SimpleNamespace(layout=kind, pack_length=row_len, layout_bucket=bucket), varlen)
        assert isinstance(spec, LayoutSpec) and spec.kind == kind
        layout = map_arrays(build([enc.tokenize(c) for c in cols], spec), np.ndarray, torch.from_numpy)
        emb = enc(layout)
        for part, ref in zip(torch.split(emb, list(layout.column_sizes)), alone):
            assert (part - ref).abs().max() < 1e-5


# -- fast dropout (CPU): same distribution and maths as torch's dropout, cheaper masks ------------


def test_fast_dropout_is_dropout_with_the_same_distribution():
    from dist_embed.model.fast_dropout import fast_dropout

    x = torch.randn(1000, 1000, dtype=torch.float32, requires_grad=True)
    torch.manual_seed(3)
    out = fast_dropout(x, 0.1)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002  # keep probability 1 - p (n = 1e6, 6.7 sigma)
    assert torch.allclose(out[kept], x[kept] / 0.9)  # survivors scaled by 1 / (1 - p), like F.dropout
    out.sum().backward()  # gradient: the same mask and scale
    assert torch.allclose(x.grad, kept.float() / 0.9)
    torch.manual_seed(3)
    assert torch.equal(fast_dropout(x, 0.1), out)  # seeded: reproducible (cached-MNRL replays rely on it)
    assert fast_dropout(x, 0.0) is x


def test_fast_attention_is_sdpa_maths(tiny_model):
    """Dropout off: the swapped model is bit-identical. Dropout on: our attention equals SDPA's maths
    (softmax(QK^T s + mask) V) with our dropout mask."""
    from dist_embed.model.fast_dropout import _attention, use_fast_dropout
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = [Row(i, (r["anchor"], r["positive"], r["negative"]), None) for i, r in enumerate(quick_triplets(24))]
    for pack in (0, 128, "auto"):
        spec = step_parts("mnrl", pack=pack)
        l0, g0 = loss_and_grads(tiny_model, spec, rows)
        torch.manual_seed(0)
        enc = Encoder.from_pretrained(str(tiny_model), dropout=0.0)
        assert use_fast_dropout(enc.transformer) > 0
        enc.train()
        l1, _ = spec.step(enc, spec.batch(enc, rows))
        g1 = {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}
        assert l0 == float(l1) and all(torch.equal(g0[n], g1[n]) for n in g0)

    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    mask = torch.rand(2, 1, 10, 10) > 0.2
    mask[..., 0] = True
    module = torch.nn.Module()
    module.is_causal = False
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    same, _ = _attention(module, q, k, v, mask, dropout=1e-12, scaling=0.3)  # our path, (almost) no drops
    assert torch.allclose(ref, same, atol=1e-6)
    torch.manual_seed(5)
    out, _ = _attention(module, q, k, v, mask, dropout=0.5, scaling=0.3)
    torch.manual_seed(5)
    probs = torch.softmax((q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask, torch.finfo(torch.float32).min), -1)
    keep = (torch.rand_like(probs) >= 0.5).float() / 0.5
    assert torch.allclose(out, ((probs * keep) @ v).transpose(1, 2), atol=1e-6)


@pytest.mark.slow
def test_gpu_benchmark_runs_every_row_on_cpu(tmp_path):
    """benchmarks/gpu.py --device cpu --quick: every framework and model of what a GPU runs,
    smaller; MFU = 6 x params x real tokens/s / peak, and our row names its layout. One precision
    (bf16 and fp16 rows both run fp32 on a CPU: the same code twice)."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(repo / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick", "--profile",
                        "--rows", "minilm:bf16:4,bert-base:bf16:4", "--out", str(out)], capture_output=True, text=True, cwd=repo,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {(x["model"], x["precision"], x["framework"]) for x in res["results"]}
    assert rows == {(m, "bf16", f) for m in ("minilm", "bert-base") for f in ("ours", "sentence-transformers", "plain")}
    assert all(x["run_precision"] == "fp32" for x in res["results"])
    for x in res["results"]:
        assert x["triplets_s"] > 0 and abs(x["mfu"] - 6 * x["params"] * x["tokens_s"] / (res["peak_tflops"] * 1e12)) < 1e-9
        assert 0 < x["mfu_non_embedding"] < x["mfu"]
        if x["framework"] == "ours":
            assert x["layout"] == "packed" and set(x["time"]) >= {"data", "compute", "optimizer"}
    assert 22e6 < next(x["params"] for x in res["results"] if x["model"] == "minilm") < 23.5e6  # no pooler
    assert res["profile"]["step_s"] > 0 and "| ours/theirs |" in r.stdout


def test_eager_attention_is_never_packed(tiny_model):
    """Eager attention adds a mask to the scores instead of applying a boolean one: packed texts
    would attend to each other. Such a model falls back to per-text padding: same embeddings."""
    from types import SimpleNamespace

    from dist_embed.config import ConfigError
    from dist_embed.engine.precision import Precision
    from dist_embed.model.layout_choice import can_pack, can_unpad, choose_layout

    enc = Encoder.from_pretrained(str(tiny_model), dropout=0.0).eval()
    enc.transformer.set_attn_implementation("eager")
    assert not can_pack(enc) and not can_unpad(enc)
    for device in ("cpu", "cuda"):  # "auto" falls back to padding wherever it runs
        varlen = Precision("bf16", device).varlen(enc.transformer.config)
        assert choose_layout(enc, SimpleNamespace(layout="auto", pack_length="auto", layout_bucket=0),
                             varlen).kind == "padded"
    for kind in ("packed", "unpadded"):
        with pytest.raises(ConfigError, match=f"training.layout={kind}"):
            choose_layout(enc, SimpleNamespace(layout=kind, pack_length="auto", layout_bucket=0),
                          Precision("fp32", "cpu").varlen(enc.transformer.config))


# -- XLM-R / RoBERTa: SentencePiece tokenizer through the fast path, packing with their position offset


@pytest.fixture(params=["xlmr", "roberta"])
def roberta_family(request):
    """XLM-R (SentencePiece-style Unigram tokenizer) and RoBERTa (byte-level BPE)."""
    return request.getfixturevalue(f"tiny_{request.param}")


def test_xlmr_tokenizer_fast_path_gives_the_tokenizers_own_ids(roberta_family):
    from conftest import MULTILINGUAL
    from dist_embed.data.tokenization import tokenize_columns

    tiny_xlmr = roberta_family
    enc = Encoder.from_pretrained(str(tiny_xlmr))
    for length in (8, 48):
        feats = tokenize_columns(enc.tokenizer, [MULTILINGUAL, MULTILINGUAL[::-1]], length)
        for texts, feat in zip((MULTILINGUAL, MULTILINGUAL[::-1]), feats):
            ref = enc.tokenizer(texts, truncation=True, max_length=length, padding=True, return_tensors="pt")
            assert feat.keys() == ref.keys()
            for k in ref:
                assert torch.equal(feat[k], ref[k]), (length, k)
    assert enc.tokenizer.unk_token_id not in tokenize_columns(enc.tokenizer, [MULTILINGUAL], 48)[0]["input_ids"]


@pytest.mark.parametrize("loss_name", ["mnrl", "cosine"])
def test_xlmr_packing_equals_unpacked_embeddings_and_gradients(roberta_family, loss_name):
    """Packed rows carry each text's positions from padding_idx + 1, as XLM-R numbers them alone."""
    from conftest import MULTILINGUAL
    from dist_embed.model.layout_choice import can_pack

    tiny_xlmr = roberta_family
    assert can_pack(Encoder.from_pretrained(str(tiny_xlmr)))
    texts = MULTILINGUAL + [r["anchor"] for r in quick_triplets(9)]
    if loss_name == "mnrl":
        rows = [Row(i, (t, texts[(i + 5) % len(texts)]), None) for i, t in enumerate(texts)]
    else:
        rows = [Row(i, (t, texts[(i + 3) % len(texts)]), (i % 5) / 4) for i, t in enumerate(texts)]
    l0, g0 = loss_and_grads(tiny_xlmr, step_parts(loss_name, chunk=0, pack=0), rows)
    for pack in ("auto", 64):
        l1, g1 = loss_and_grads(tiny_xlmr, step_parts(loss_name, chunk=0, pack=pack), rows)
        assert abs(l0 - l1) <= 1e-5 * max(abs(l0), 1e-6), (pack, l0, l1)
        assert g0.keys() == g1.keys()
        for name in g0:  # < 1e-5, relative to the gradient's size where it is larger than 1: the
            # token-type embedding's gradient sums over every token (|g| ~ 10), so float32 order shows
            scale = max(1.0, float(g0[name].abs().max()))
            assert (g0[name] - g1[name]).abs().max() < 1e-5 * scale, (pack, name)
