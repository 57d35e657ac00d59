"""Decoder embedders: tiny Llama and Qwen2 models built from a config, last-token pooling with the
EOS token their tokenizer appends, left or right padding; trained and saved in the
sentence-transformers layout, which gives back our embeddings."""
import numpy as np
import pytest

from dist_embed.model.encoder import Encoder

from conftest import MULTILINGUAL, quick_triplets, run_cli, tiny_config, write_jsonl

TEXTS = ["A man is playing a guitar.", "Kittens.", "The quick brown fox jumps over the lazy dog twice.",
         *MULTILINGUAL[:6]]


def make_decoder(out, arch: str, padding_side: str):
    import torch
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    texts = MULTILINGUAL * 10 + [t for r in quick_triplets(300) for t in r.values()]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=800, special_tokens=["<|endoftext|>", "<pad>"])
    eos = bpe.token_to_id("<|endoftext|>")
    # the embedding recipe of Qwen3-Embedding-style models: EOS after every text, pooled there
    bpe._tokenizer.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                                  special_tokens=[("<|endoftext|>", eos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<pad>",
                                  padding_side=padding_side, model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=tok.pad_token_id, eos_token_id=eos)
    model = LlamaModel(LlamaConfig(**common)) if arch == "llama" else Qwen2Model(Qwen2Config(**common))
    Encoder(model, tok, pooling="lasttoken", normalize=True, max_seq_length=48).save(out)
    return out, eos


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_last_token_pooling_equals_sentence_transformers(tmp_path, arch, padding_side):
    from sentence_transformers import SentenceTransformer

    path, eos = make_decoder(tmp_path / "m", arch, padding_side)
    ours = Encoder.from_pretrained(str(path))
    assert ours.pooling == "lasttoken" and ours.tokenizer.padding_side == padding_side
    feats = ours.tokenize(TEXTS)
    mask = feats["attention_mask"].bool()
    last = [int(ids[m][-1]) for ids, m in zip(feats["input_ids"], mask)]
    assert last == [eos] * len(TEXTS)  # every text ends with EOS, where it is pooled
    st = SentenceTransformer(str(path), device="cpu")
    assert "lasttoken" in str(st) or "pooling_mode_lasttoken': True" in str(st)
    got = ours.encode(TEXTS, batch_size=4)  # batches of mixed lengths: padding on the given side
    assert np.abs(st.encode(TEXTS, batch_size=4) - got).max() < 1e-5
    # one text alone (no padding) gives the same embedding as in a padded batch
    assert np.abs(ours.encode(TEXTS[2:3]) - got[2:3]).max() < 1e-5


def test_decoder_trains_and_loads_back(tmp_path):
    from sentence_transformers import SentenceTransformer

    path, _ = make_decoder(tmp_path / "m", "qwen2", "left")
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(48))
    cfg = tiny_config(tmp_path, path, data, model={"dropout": 0.1}, loss={"name": "cached_mnrl", "mini_batch_size": 3},
                      training={"max_steps": 3})
    r = run_cli("train", cfg, "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp_path / "run" / "final"
    st = SentenceTransformer(str(final), device="cpu")
    assert "Qwen2Model" in str(st)
    assert np.abs(st.encode(TEXTS) - Encoder.from_pretrained(str(final)).encode(TEXTS)).max() < 1e-5
