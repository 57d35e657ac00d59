"""Builds snli-dev-retrieval/ (BEIR layout) from snli-dev-pairs-1k.tsv: queries = the premises of
entailed pairs, relevant = their entailed hypotheses, corpus = every hypothesis of the file (each
distinct text once). Deterministic: rerunning writes the same bytes.

    python data/quickstart/build_retrieval_dev.py
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    rows = [line.split("\t") for line in (HERE / "snli-dev-pairs-1k.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    corpus: dict[str, str] = {}
    for _, hypothesis, _ in rows:
        corpus.setdefault(hypothesis, f"d{len(corpus)}")
    queries: dict[str, str] = {}
    qrels: list[tuple[str, str]] = []
    for premise, hypothesis, score in rows:
        if float(score) == 1.0:
            qid = queries.setdefault(premise, f"q{len(queries)}")
            if (qid, corpus[hypothesis]) not in qrels:
                qrels.append((qid, corpus[hypothesis]))
    out = HERE / "snli-dev-retrieval"
    out.mkdir(exist_ok=True)
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for text, qid in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for text, did in corpus.items():
            f.write(json.dumps({"_id": did, "text": text}, ensure_ascii=False) + "\n")
    with open(out / "qrels.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t1\n" for q, d in qrels)
    print(f"{len(queries)} queries, {len(corpus)} corpus texts, {len(qrels)} relevance judgements -> {out}")


if __name__ == "__main__":
    main()
