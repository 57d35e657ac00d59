"""Our encoder, evaluator and checkpoints against the real sentence-transformers library."""
import json

import numpy as np
import pytest
import torch

from dist_embed.evaluation import evaluate_sts, load_sts
from dist_embed.model import Encoder

from conftest import QUICK, SHARED


def sts_dev():
    path = SHARED / "stsb" / "dev.tsv"
    return load_sts(str(path if path.exists() else QUICK / "snli-dev-pairs-1k.tsv"), "sts-dev")


@pytest.fixture(scope="module")
def st_and_ours(minilm):
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    return SentenceTransformer(str(minilm), device="cpu"), Encoder.from_pretrained(str(minilm))


def test_reads_sentence_transformers_settings(st_and_ours):
    st, ours = st_and_ours
    assert (ours.pooling, ours.normalize, ours.max_seq_length) == ("mean", True, st.max_seq_length)


def test_embeddings_and_sts_metrics_equal_sentence_transformers(st_and_ours):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    st, ours = st_and_ours
    data = sts_dev()
    texts = data.sentences1 + data.sentences2
    ref = st.encode(texts, batch_size=64, convert_to_numpy=True)
    got = ours.encode(texts, batch_size=64)
    assert np.abs(ref - got).max() < 1e-5
    evaluator = EmbeddingSimilarityEvaluator(data.sentences1, data.sentences2, data.scores.tolist(), name="sts-dev",
                                             similarity_fn_names=["cosine", "manhattan", "euclidean", "dot"])
    theirs = evaluator(st)
    mine = evaluate_sts(ours, data)
    for key, value in mine.items():
        assert abs(value - theirs[f"sts-dev_{key}"]) < 1e-6, key


@pytest.mark.parametrize("pooling,normalize", [("mean", False), ("cls", True), ("max", False)])
def test_saved_directory_loads_in_sentence_transformers(tiny_model, tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    enc = Encoder.from_pretrained(str(tiny_model), pooling=pooling, normalize=normalize, max_seq_length=40)
    enc.save(tmp_path / "m")
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    texts = sts_dev().sentences1[:100]
    assert st.max_seq_length == 40
    assert np.abs(st.encode(texts, convert_to_numpy=True) - enc.encode(texts)).max() < 1e-5
    modules = json.loads((tmp_path / "m" / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling"] + (["2_Normalize"] if normalize else [])
    # the unused BERT pooler is dropped for training but kept in the file: nothing missing on load
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert "pooler.dense.weight" in f.keys()


def test_dropout_override(tiny_model):
    enc = Encoder.from_pretrained(str(tiny_model), dropout=0.0)
    cfg = enc.transformer.config
    assert cfg.hidden_dropout_prob == 0.0 and cfg.attention_probs_dropout_prob == 0.0
    enc.train()
    feats = enc.tokenize(["a dog runs", "two cats sleep on a mat"])
    assert torch.equal(enc(feats), enc(feats))  # no randomness left in training mode


def test_prompts_and_similarity_survive_training_and_a_dense_head_is_refused(tmp_path, tiny_model):
    """A starting model's prompts, default prompt and similarity function come out of training
    unchanged (sentence-transformers reads them back); a module we cannot train and save (Dense)
    is refused with one line, never silently dropped."""
    from sentence_transformers import SentenceTransformer, models

    from conftest import quick_triplets, run_cli, tiny_config, write_jsonl

    st = SentenceTransformer(str(tiny_model), device="cpu")
    st.prompts = {"query": "query: ", "document": "passage: "}
    st.default_prompt_name = "query"
    st.similarity_fn_name = "dot"
    start = tmp_path / "with-prompts"
    st.save(str(start))
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(40))
    cfg = tiny_config(tmp_path, start, data, training={"max_steps": 2})
    r = run_cli("train", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    back = SentenceTransformer(str(tmp_path / "run" / "final"), device="cpu")
    assert back.prompts == st.prompts and back.default_prompt_name == "query"
    assert back.similarity_fn_name == "dot"
    dense = SentenceTransformer(modules=[*st, models.Dense(st.get_sentence_embedding_dimension(), 16)], device="cpu")
    dense.save(str(tmp_path / "with-dense"))
    r = run_cli("train", tiny_config(tmp_path, tmp_path / "with-dense", data))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "module Dense (2_Dense) is not supported" in r.stderr.strip().splitlines()[-1]


def test_t5_checkpoints_load_as_their_encoder(tmp_path, minilm):
    """A T5 checkpoint (encoder-decoder weights) trains as T5EncoderModel, and what we save gives
    sentence-transformers' embeddings."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, T5Config, T5Model

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0,
                   decoder_start_token_id=0)
    src = tmp_path / "t5"
    T5Model(cfg).save_pretrained(src)
    AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(src)
    enc = Encoder.from_pretrained(str(src), max_seq_length=32)
    assert type(enc.transformer).__name__ == "T5EncoderModel"
    enc.save(tmp_path / "saved")
    texts = ["A man is playing a guitar.", "Kittens.", "The quick brown fox jumps over the lazy dog twice."]
    st = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert "T5EncoderModel" in str(st)
    assert np.abs(st.encode(texts, convert_to_numpy=True) - enc.encode(texts)).max() < 1e-5
