"""Every shipped recipe (configs/recipes/) runs as written, with two stand-ins only: a tiny random
model of the recipe's family (BERT or XLM-R) and generated data in the recipe's language, written
with the recipe's own column names (so its column mapping is exercised). The final model loads in
sentence-transformers with the expected architecture and evaluates better than before training."""
import json
import os
import random
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, RECIPE_WORDS, read_metrics, recipe_sentence, run_cli, write_jsonl

pytestmark = pytest.mark.slow
RECIPES = REPO / "configs" / "recipes"
# recipe -> (language, stand-in family, architecture sentence-transformers must report)
CASES = {
    "korean-sts-cosine": ("ko", "bert", "BertModel"),
    "russian-mnrl-pairs": ("ru", "bert", "BertModel"),
    "sinhala-xlmr-cosine": ("si", "xlmr", "XLMRobertaModel"),
    "allnli-mnrl": ("en", "bert", "BertModel"),
    "chinese-triplet-euclidean": ("zh", "bert-zh", "BertModel"),
}


@pytest.fixture(scope="module")
def tiny_bert_zh(tmp_path_factory) -> Path:
    """A tiny BERT with a WordPiece vocabulary trained here that covers Chinese: all-MiniLM-L6-v2's
    own vocabulary (bert-base-uncased) has 244 CJK characters, and most Chinese text becomes [UNK]
    (the trainer warns; the recipe says so)."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from conftest import MULTILINGUAL
    from dist_embed.model.encoder import Encoder

    texts = MULTILINGUAL + [recipe_sentence(lang, s, p, a) for lang in RECIPE_WORDS for s in range(4)
                            for p in range(4) for a in range(3)]
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=2000)
    out = tmp_path_factory.mktemp("zh")
    tok = BertTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                            cls_token="[CLS]", mask_token="[MASK]", do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    Encoder(BertModel(cfg, add_pooling_layer=False), tok, pooling="mean", max_seq_length=48).save(out / "model")
    return out / "model"


def test_every_recipe_is_covered():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(CASES)


def sentence(lang: str, rng: random.Random, s=None, p=None, a=None) -> tuple[str, tuple]:
    parts = tuple(rng.randrange(n) if v is None else v for v, n in ((s, 4), (p, 4), (a, 3)))
    return recipe_sentence(lang, *parts), parts


def scored_pair(lang: str, rng: random.Random) -> tuple[str, str, float]:
    """Score 0-5 as STS sets have it: 2 for the same subject, 3 for the same predicate."""
    a, (s1, p1, _) = sentence(lang, rng)
    s = s1 if rng.random() < 0.5 else None
    p = p1 if rng.random() < 0.5 else None
    b, (s2, p2, _) = sentence(lang, rng, s, p)
    return a, b, 2.0 * (s1 == s2) + 3.0 * (p1 == p2)


def training_rows(lang: str, loss: str, columns: dict, rng: random.Random, n: int) -> list[dict]:
    """Rows under the source's column names (the recipe maps ours -> theirs)."""
    name = lambda ours: columns.get(ours, ours)  # noqa: E731
    rows = []
    for _ in range(n):
        if loss == "cosine":
            a, b, score = scored_pair(lang, rng)
            rows.append({name("sentence1"): a, name("sentence2"): b, name("score"): score})
            continue
        anchor, (s, p, adv) = sentence(lang, rng)
        positive, _ = sentence(lang, rng, s, p, (adv + 1 + rng.randrange(2)) % 3)  # same meaning, other adverb
        row = {name("anchor"): anchor, name("positive"): positive}
        if loss == "triplet":  # half hard negatives (same subject, another predicate), half any other predicate
            row[name("negative")], _ = sentence(lang, rng, s if rng.random() < 0.5 else None,
                                                (p + 1 + rng.randrange(3)) % 4, adv)
        rows.append(row)
    return rows


def unk_share(model_dir: Path, texts: list[str]) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]]
    return sum(i == tok.unk_token_id for i in ids) / len(ids)


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_recipe_trains_saves_and_loads_in_sentence_transformers(recipe, tmp_path, tiny_model, tiny_xlmr, tiny_bert_zh):
    from sentence_transformers import SentenceTransformer

    lang, family, arch = CASES[recipe]
    path = RECIPES / f"{recipe}.yaml"
    cfg = yaml.safe_load(path.read_text())
    loss, eval_set = cfg["loss"]["name"], cfg["eval"]["sts"][0]
    seed = int(os.environ.get("DIST_EMBED_RECIPE_SEED") or random.SystemRandom().randrange(10**6))
    print(f"{recipe}: seed {seed} (DIST_EMBED_RECIPE_SEED replays it)")
    rng = random.Random(seed)
    model = {"xlmr": tiny_xlmr, "bert-zh": tiny_bert_zh}.get(family, tiny_model)
    train = write_jsonl(tmp_path / "train.jsonl", training_rows(lang, loss, cfg["data"].get("columns", {}), rng, 320))
    ecols = eval_set.get("columns", {})
    # 400 scored pairs, not 120: on 120 the untrained model's Spearman swung 0.78-0.86 with the draw,
    # and a draw at the top left the trained model (loss 4.8 -> 0.06) under the +0.01 (seed 863560)
    dev = write_jsonl(tmp_path / "dev.jsonl", [
        {ecols.get("sentence1", "sentence1"): a, ecols.get("sentence2", "sentence2"): b, ecols.get("score", "score"): s}
        for a, b, s in (scored_pair(lang, rng) for _ in range(400))])
    texts = [recipe_sentence(lang, s, p, a) for s in range(4) for p in range(4) for a in range(3)]
    assert unk_share(model, texts) < 0.05, f"{lang} text does not tokenize"
    overrides = [  # the stand-ins, and what a tiny random model on CPU needs (fp32, a larger lr, few steps)
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={model}", f"data.train={train}", "data.subset=null",
        f"eval.sts=[{{name: {eval_set['name']}, path: {dev}, columns: {json.dumps(ecols)}}}]",
        "training.precision=fp32", "training.lr=1e-3", "training.max_steps=80", "training.batch_size=16",
        "training.log_steps=10", "eval.steps=0", "checkpoint.steps=20", f"training.seed={seed}",
        "model.max_seq_length=48"]
    start = time.perf_counter()
    r = run_cli("train", path, *overrides)
    took = time.perf_counter() - start
    assert r.returncode == 0, r.stderr[-4000:]
    # the similarity the loss trains: euclidean distance for the triplet recipe, cosine otherwise
    key = f"eval/{eval_set['name']}/spearman_{cfg['loss'].get('distance', 'cosine') if loss == 'triplet' else 'cosine'}"
    evals = [m[key] for m in read_metrics(tmp_path / "run") if key in m]
    before, after = evals[0], evals[-1]
    print(f"| {recipe} | {family} ({arch}) | {cfg['loss']['name']} | {took:.0f} s | {key.rsplit('/', 1)[1]} "
          f"{before:.3f} -> {after:.3f} |")
    assert after > before + 0.01, (before, after)
    final = tmp_path / "run" / "final"
    st = SentenceTransformer(str(final), device="cpu")
    assert arch in str(st)
    emb = st.encode(texts[:6])
    assert emb.shape[0] == 6
    card = (final / "README.md").read_text()
    assert {"cosine": "CosineSimilarityLoss", "mnrl": "MultipleNegativesRankingLoss", "triplet": "TripletLoss"}[loss] in card


def test_text_the_vocabulary_does_not_cover_is_warned_about(tmp_path, tiny_model):
    """Chinese through all-MiniLM-L6-v2's English vocabulary: mostly [UNK]; the trainer says so."""
    texts = [recipe_sentence("zh", s, p, a) for s in range(4) for p in range(4) for a in range(3)]
    share = unk_share(tiny_model, texts)
    assert share > 0.3
    rows = training_rows("zh", "triplet", {}, random.Random(0), 40)
    train = write_jsonl(tmp_path / "zh.jsonl", rows)
    r = run_cli("train", RECIPES / "chinese-triplet-euclidean.yaml", f"output_dir={tmp_path / 'run'}",
                f"model.name_or_path={tiny_model}", f"data.train={train}", "data.subset=null", "eval.sts=[]",
                "training.precision=fp32", "training.max_steps=1", "model.max_seq_length=48")
    assert r.returncode == 0, r.stderr[-3000:]
    warning = next(line for line in r.stderr.splitlines() if "unknown to" in line)
    print(warning)
    assert "column anchor" in warning and "% of the tokens are unknown" in warning
