"""Our model card against the card sentence-transformers itself writes for the same kind of run."""
import re

import pytest
import yaml

from conftest import quick_triplets, run_cli, tiny_config, write_jsonl

pytestmark = pytest.mark.slow


def card_parts(text: str) -> tuple[dict, set[str]]:
    """(YAML header, visible section headings): commented-out and code-block lines are not sections;
    headings that carry a run's names (base model, dataset name) are reduced to their kind."""
    _, header, body = text.split("---\n", 2)
    body = re.sub(r"<!--.*?-->", "", body, flags=re.S)
    body = re.sub(r"```.*?```", "", body, flags=re.S)
    headings, section = set(), ""
    for line in body.splitlines():
        if not line.startswith("#"):
            continue
        title = line.strip()
        if title.startswith("# SentenceTransformer"):
            title = "# SentenceTransformer"
        if title.startswith("### "):
            section = title
        elif title.startswith("#### ") and section.startswith("### Training Dataset"):
            title = "#### <dataset>"
        headings.add(title.replace("### Training Datasets", "### Training Dataset"))
    return yaml.safe_load(header), headings


@pytest.fixture(scope="module")
def st_card(tmp_path_factory, tiny_model):
    """sentence-transformers' trainer on (anchor, positive) pairs with an STS evaluator."""
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses)
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    out = tmp_path_factory.mktemp("st-card")
    rows = quick_triplets(64)
    model = SentenceTransformer(str(tiny_model), device="cpu")
    ds = Dataset.from_dict({"anchor": [r["anchor"] for r in rows], "positive": [r["positive"] for r in rows]})
    ev = EmbeddingSimilarityEvaluator([r["anchor"] for r in rows[:20]], [r["positive"] for r in rows[:20]],
                                      [0.2, 0.9] * 10, name="dev")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=16, max_steps=4, logging_steps=1,
        eval_strategy="steps", eval_steps=2, report_to="none", use_cpu=True, learning_rate=1e-3)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, evaluator=ev,
                               loss=losses.MultipleNegativesRankingLoss(model)).train()
    model.save(str(out / "final"))
    return (out / "final" / "README.md").read_text()


def table_rows(text: str, first_line: str) -> list[list[str]]:
    """The cells of the Markdown table that starts at ``first_line``: cut at unescaped ``|``."""
    lines = text.splitlines()
    start = lines.index(first_line)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [re.split(r"(?<!\\)\|", line)[1:-1] for line in lines[start:end]]


def test_card_has_every_section_and_yaml_key_sentence_transformers_writes(tmp_path, tiny_model, st_card):
    rows = quick_triplets(64)
    # texts a sample table must hold in one cell each: a line break, a column separator, markup
    rows[0] = dict(rows[0], anchor="A man | a woman\nplay <b>guitar</b>\r\nin a band.")
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": r["anchor"], "positive": r["positive"]} for r in rows])
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{r['anchor']}\t{r['positive']}\t{s}\n" for r, s in zip(quick_triplets(20), [0.2, 0.9] * 10)))
    cfg = tiny_config(tmp_path, tiny_model, data, model={"dropout": 0.1}, training={"max_steps": 4, "batch_size": 16},
                      eval={"sts": [{"name": "dev", "path": str(dev)}], "steps": 2})
    r = run_cli("train", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    ours_text = (tmp_path / "run" / "final" / "README.md").read_text()
    ours, ours_heads = card_parts(ours_text)
    theirs, their_heads = card_parts(st_card)
    print("sentence-transformers' sections:", sorted(their_heads))
    # a card without its sections (another layout, a failed render) would make the comparison empty
    assert {"## Model Details", "## Usage", "## Training Details", "### Training Logs",
            "### Framework Versions", "## Citation"} <= their_heads, sorted(their_heads)
    assert len(their_heads) >= 15 and len(theirs) >= 5, (sorted(their_heads), sorted(theirs))
    assert their_heads - ours_heads == set(), "sections sentence-transformers writes and we do not"
    assert set(theirs) - set(ours) == set(), "YAML keys sentence-transformers writes and we do not"
    # every evaluator metric (4 similarities x pearson/spearman), in the header and the body
    names = {f"{c}_{s}" for c in ("pearson", "spearman") for s in ("cosine", "manhattan", "euclidean", "dot")}
    assert set(ours["metrics"]) == names
    result = ours["model-index"][0]["results"][0]
    assert result["task"]["type"] == "semantic-similarity" and result["dataset"]["name"] == "dev"
    assert {m["type"] for m in result["metrics"]} == names
    assert all(isinstance(m["value"], float) for m in result["metrics"])
    texts = {t for r in rows for t in (r["anchor"], r["positive"])}
    assert ours["widget"] and all(w["source_sentence"] in texts and set(w["sentences"]) <= texts
                                  for w in ours["widget"])  # widget examples drawn from the training data
    assert "dataset_size:64" in ours["tags"] and "loss:MultipleNegativesRankingLoss" in ours["tags"]
    samples = table_rows(ours_text, "| anchor | positive |")
    assert len(samples) == 2 + 3 and all(len(r) == 2 for r in samples), samples  # header, rule, 3 rows
    assert samples[2][0].strip() == "A man &#124; a woman<br>play &lt;b&gt;guitar&lt;/b&gt;<br>in a band."
    for needle in ("| Epoch | Step | Training Loss | dev spearman_cosine |", "Training Time", "- Transformers:",
                   "#### MultipleNegativesRankingLoss", "* Columns: <code>anchor</code>, <code>positive</code>",
                   "min: ", "\"scale\": 20.0"):
        assert needle in ours_text, needle
