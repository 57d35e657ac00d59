"""Retrieval evaluation: metrics pinned by hand and against sentence-transformers'
InformationRetrievalEvaluator; exact top-k; the corpus embedded across real gloo ranks."""
import random

import numpy as np
import pytest

from dist_embed.distributed import DistState
from dist_embed.evaluation.retrieval import evaluate_retrieval, ir_metrics, load_retrieval, top_k

from conftest import QUICK, quick_triplets, read_metrics, run_cli, tiny_config, write_jsonl

SNLI = QUICK / "snli-dev-retrieval"


def snli():
    return load_retrieval("snli-dev", str(SNLI / "queries.jsonl"), str(SNLI / "corpus.jsonl"), str(SNLI / "qrels.tsv"))


def test_ir_metrics_by_hand():
    ranked = [["a", "b", "c", "d"], ["x", "y", "z", "w"]]
    relevant = [{"b", "d"}, {"q"}]
    m = ir_metrics(ranked, relevant)
    assert m["accuracy@1"] == 0.0 and m["accuracy@3"] == 0.5
    assert m["mrr@10"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["precision@3"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["recall@10"] == pytest.approx((1 + 0) / 2)
    ndcg = (1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))
    assert m["ndcg@10"] == pytest.approx(ndcg / 2)
    assert m["map@100"] == pytest.approx((1 / 2 + 2 / 4) / 2 / 2)


def test_top_k_is_exact_in_any_chunking():
    seed = random.SystemRandom().randrange(10**6)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    q, c = rng.normal(size=(int(rng.integers(1, 40)), 8)), rng.normal(size=(int(rng.integers(1, 300)), 8))
    c[rng.integers(len(c))] = c[0]  # an exact tie: the lower index comes first
    k = int(rng.integers(1, 20))
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    want = np.array([sorted(range(len(c)), key=lambda j: (-round(s[j], 6), j))[:min(k, len(c))] for s in sims])
    for chunk in (1, 7, int(rng.integers(1, 400)), 50_000):
        scores, idx = top_k(q.astype(np.float32), c.astype(np.float32), k, chunk=chunk)
        assert np.array_equal(idx, want), chunk
        assert np.allclose(scores, np.take_along_axis(sims, want, 1), atol=1e-5)


def test_metrics_equal_sentence_transformers_information_retrieval_evaluator(minilm):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from dist_embed.model.encoder import Encoder

    data = snli()
    st = SentenceTransformer(str(minilm), device="cpu")
    theirs = InformationRetrievalEvaluator(data.queries, data.corpus, data.relevant, name="snli",
                                           accuracy_at_k=[1, 3, 5, 10], precision_recall_at_k=[1, 3, 5, 10, 100],
                                           mrr_at_k=[10], ndcg_at_k=[10], map_at_k=[100])(st)
    ours = evaluate_retrieval(Encoder.from_pretrained(str(minilm)), data, DistState())
    print({k: round(v, 4) for k, v in ours.items()})
    assert len(ours) == 4 + 5 + 5 + 3
    for key, value in ours.items():
        assert abs(value - theirs[f"snli_cosine_{key}"]) < 1e-6, (key, value, theirs[f"snli_cosine_{key}"])


def test_retrieval_eval_during_training_is_the_same_sharded_across_ranks(tmp_path, tiny_model):
    """The corpus split over 2 gloo ranks gives the metrics one process computes (same weights:
    dropout 0, the same global batch), and the card and report show them."""
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(64))
    ret = {"name": "snli-ret", "queries": str(SNLI / "queries.jsonl"), "corpus": str(SNLI / "corpus.jsonl"),
           "qrels": str(SNLI / "qrels.tsv")}
    cfg = tiny_config(tmp_path, tiny_model, data, training={"max_steps": 2}, eval={"retrieval": [ret]})
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"n{nproc}"
        r = run_cli("train", cfg, f"output_dir={outs[nproc]}", "--nproc", str(nproc), f"training.batch_size={8 // nproc}")
        assert r.returncode == 0, r.stderr[-3000:]
    evals = {n: [m for m in read_metrics(outs[n]) if "eval/snli-ret/ndcg@10" in m] for n in outs}
    assert len(evals[1]) == len(evals[2]) == 1
    for key, value in evals[1][-1].items():
        if key.startswith("eval/"):
            assert abs(value - evals[2][-1][key]) < 1e-4, key
    card = (outs[2] / "final" / "README.md").read_text()
    assert "#### Information Retrieval" in card and "information-retrieval" in card and "ndcg@10" in card
    report = run_cli("report", outs[2])
    assert "eval/snli-ret/ndcg@10" in report.stdout, report.stdout


def test_bad_qrels_are_one_line(tmp_path, tiny_model):
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\tnope\t1\n")
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(16))
    ret = {"name": "r", "queries": str(SNLI / "queries.jsonl"), "corpus": str(SNLI / "corpus.jsonl"), "qrels": str(qrels)}
    r = run_cli("train", tiny_config(tmp_path, tiny_model, data, eval={"retrieval": [ret]}))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{qrels}:3: corpus-id 'nope' is not in the corpus" in r.stderr.strip().splitlines()[-1]
