"""Our encoder, evaluator and checkpoints against the real sentence-transformers library."""
import json

import numpy as np
import pytest
import torch

from dist_embed.evaluation.sts import evaluate_sts, load_sts
from dist_embed.model.encoder import Encoder

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


def _st_with_every_module(tiny_model, out):
    """Transformer + Pooling + Dense (32 -> 16, tanh) + Normalize, with prompts, a default prompt,
    dot similarity and truncate_dim: every module and setting a starting model may carry."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    base = SentenceTransformer(str(tiny_model), device="cpu")
    torch.manual_seed(3)
    st = SentenceTransformer(modules=[base[0], base[1], models.Dense(32, 16), models.Normalize()], device="cpu",
                             prompts={"query": "query: ", "document": "passage: "}, default_prompt_name="query",
                             similarity_fn_name="dot", truncate_dim=12)
    st.save(str(out))
    return st


def test_every_module_survives_training_and_sentence_transformers_gives_our_embeddings(tmp_path, tiny_model):
    """Dense (trained, in its folder), Normalize, prompts, default prompt, similarity function and
    truncate_dim come out of training (dropout on, packed batches, a resume in the middle); the saved
    model loaded in sentence-transformers gives the embeddings and STS metrics our trainer computed."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from conftest import quick_triplets, read_metrics, run_cli, tiny_config, write_jsonl

    start = tmp_path / "start"
    st = _st_with_every_module(tiny_model, start)
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(80))
    sts = sts_dev()
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{a}\t{b}\t{s}\n" for a, b, s in zip(sts.sentences1[:60], sts.sentences2[:60], sts.scores[:60])))
    cfg = tiny_config(tmp_path, start, data, model={"dropout": 0.1}, training={"max_steps": 4},
                      eval={"sts": [{"name": "dev", "path": str(dev)}], "before_training": True},
                      checkpoint={"steps": 2})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out, extra in ((straight, []), (resumed, ["--resume", str(straight / "checkpoints" / "step-2")])):
        r = run_cli("train", cfg, f"output_dir={out}", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    final = straight / "final"
    assert (final / "2_Dense" / "config.json").is_file() and (final / "3_Normalize").is_dir()
    trained, before = load_file(str(final / "2_Dense" / "model.safetensors")), load_file(
        str(start / "2_Dense" / "model.safetensors"))
    assert set(trained) == {"linear.weight", "linear.bias"}
    assert (trained["linear.weight"] - before["linear.weight"]).abs().max() > 1e-4  # the Dense layer trained
    again = load_file(str(resumed / "final" / "2_Dense" / "model.safetensors"))
    assert (again["linear.weight"] - trained["linear.weight"]).abs().max() < 1e-6  # and resumed exactly

    back = SentenceTransformer(str(final), device="cpu")
    assert [type(m).__name__ for m in back] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert back.prompts == st.prompts and back.default_prompt_name == "query"
    assert back.similarity_fn_name == "dot" and back.truncate_dim == 12
    ours = Encoder.from_pretrained(str(final))
    texts = sts.sentences1[:50]
    got = ours.encode(texts)
    assert got.shape == (50, 12)  # truncate_dim, as sentence-transformers' encode
    assert np.abs(back.encode(texts, convert_to_numpy=True) - got).max() < 1e-5  # default prompt in both
    ours.st_config["default_prompt_name"] = "document"
    assert np.abs(back.encode(texts, prompt_name="document", convert_to_numpy=True) - ours.encode(texts)).max() < 1e-5
    # what the trainer measured at the end = sentence-transformers' evaluator on the saved model
    last = [m for m in read_metrics(straight) if "eval/dev/spearman_cosine" in m][-1]
    theirs = EmbeddingSimilarityEvaluator(sts.sentences1[:60], sts.sentences2[:60], sts.scores[:60].tolist(),
                                          name="dev", similarity_fn_names=["cosine", "dot"])(back)
    assert abs(last["eval/dev/spearman_cosine"] - theirs["dev_spearman_cosine"]) < 1e-6
    assert abs(last["eval/dev/pearson_dot"] - theirs["dev_pearson_dot"]) < 1e-6


@pytest.mark.parametrize("case", ["activation", "order", "module"])
def test_a_model_we_cannot_represent_is_refused_in_one_line(tmp_path, tiny_model, case):
    """Anything we would train or write back differently is refused (exit 2, one line)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    from conftest import quick_triplets, run_cli, tiny_config, write_jsonl

    base = SentenceTransformer(str(tiny_model), device="cpu")
    mods = {"activation": [base[0], base[1], models.Dense(32, 8, activation_function=torch.nn.Softplus())],
            "order": [base[0], base[1], models.Normalize(), models.Dense(32, 8)],
            "module": [base[0], base[1], models.LayerNorm(32)]}[case]
    SentenceTransformer(modules=mods, device="cpu").save(str(tmp_path / "m"))
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(20))
    r = run_cli("train", tiny_config(tmp_path, tmp_path / "m", data))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    print(line)
    assert {"activation": "Dense with {'activation_function': 'torch.nn.modules.activation.Softplus'}",
            "order": "Normalize -> Dense are not supported",
            "module": "module LayerNorm (2_LayerNorm) is not supported"}[case] in line


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
