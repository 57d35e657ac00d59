"""README.md model cards in the style sentence-transformers writes, for final/ and every checkpoint."""
from __future__ import annotations

import json
import logging
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .citations import CITATIONS, SBERT_BIB

log = logging.getLogger("dist_embed.train")


def chain(loss) -> list:
    """A loss and the losses it wraps, outer first (Matryoshka(MNRL) -> [Matryoshka, MNRL]); each
    has a ``key`` (ours) and a ``title`` (sentence-transformers' class name)."""
    return [loss, *chain(loss.inner)] if getattr(loss, "inner", None) is not None else [loss]


@dataclass
class DatasetInfo:
    name: str
    rows: int | None
    columns: list[str]
    token_stats: dict[str, dict] = field(default_factory=dict)  # column -> min/mean/max tokens
    sample: list[tuple] = field(default_factory=list)
    loss: object = None  # its loss object (engine.losses)
    share: float | None = None  # expected share of the training rows (batches for round_robin)


def dataset_info(name: str, rows: int | None, columns: list[str], texts: list[tuple[str, ...]], tokenizer,
                 sample: int = 3) -> DatasetInfo:
    """Token-length statistics of the first rows (sentence-transformers cards use the first 1000)."""
    stats = {}
    for i, col in enumerate(columns):
        col_texts = [t[i] for t in texts if i < len(t)]
        if not col_texts:
            continue
        ids = tokenizer(col_texts, truncation=False, add_special_tokens=False)["input_ids"]
        lengths = np.array([len(x) for x in ids]) + len(tokenizer("")["input_ids"])  # + special tokens
        unk = getattr(tokenizer, "unk_token_id", None)
        unknown = sum(t == unk for x in ids for t in x) / max(1, sum(map(len, ids))) if unk is not None else 0.0
        stats[col] = {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max()),
                      "unknown": unknown}
    return DatasetInfo(name, rows, columns, stats, texts[:sample])


def describe_datasets(cfg, plan, sizes, losses, tokenizer) -> list[DatasetInfo]:
    """Per training dataset: name, size, columns, loss, share and token-length statistics of its
    first 1000 rows (a warning when the tokenizer does not know the language)."""
    from itertools import islice

    infos = []
    shares = plan.shares(sizes)
    for i, (name, spec) in enumerate(zip(plan.names, plan.specs)):
        schema = spec.schema
        first = list(islice(spec.rows(), 1000))
        cols = list(schema.texts)
        width = len(first[0].texts) if first else len(cols)
        if schema.optional_prefix:
            p = schema.optional_prefix
            cols += [p if k == 0 else f"{p}_{k + 1}" for k in range(width - len(cols))]
        texts = [r.texts + ((r.score,) if r.score is not None else ()) for r in first]
        info = dataset_info(spec.source.path if len(plan.names) == 1 else f"{name} ({spec.source.path})",
                            sizes[i], cols, [x[:len(cols)] for x in texts], tokenizer)
        info.loss = losses[i]
        info.share = shares[i] if shares else None
        for col, stats in info.token_stats.items():
            if stats["unknown"] > 0.05:  # e.g. Chinese through an English WordPiece vocabulary
                log.warning("%s: column %s: %.0f%% of the tokens are unknown to %s's tokenizer (its vocabulary does "
                            "not cover this text; they all look alike to the model). Consider a multilingual model",
                            info.name, col, 100 * stats["unknown"], cfg.model.name_or_path)
        if schema.score:
            info.columns.append("score")
            info.sample = [x for x in texts[:3]]
        infos.append(info)
    return infos


def architecture(encoder) -> str:
    """The module list as ``print(SentenceTransformer(path))`` shows it."""
    from ..model.lora import base_model

    tcfg = {"max_seq_length": encoder.max_seq_length, "do_lower_case": False,
            "architecture": type(base_model(encoder.transformer)).__name__}
    pcfg = {k: v for k, v in encoder.pooling_config().items() if k != "include_prompt"}
    lines = ["SentenceTransformer(", f"  (0): Transformer({tcfg})", f"  (1): Pooling({pcfg})"]
    lines += [f"  ({i}): Dense({d.config()})" for i, d in enumerate(encoder.st_dense, start=2)]
    if encoder.normalize:
        lines.append(f"  ({2 + len(encoder.st_dense)}): Normalize()")
    return "\n".join(lines + [")"])


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "package:")) and not Path(name).exists()


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def cell(text) -> str:
    """A text as one Markdown table cell: no line break, no column separator, no markup of its own."""
    import html

    out = html.escape(str(text), quote=False).replace("|", "&#124;")
    return "<br>".join(line for line in out.replace("\r\n", "\n").replace("\r", "\n").split("\n"))


def by_stretch(worlds: list, value) -> str:
    """A value per stretch of a chain of runs (resumed at other world sizes): "2 (steps 1-5), 3 (steps 6-)"."""
    if len(worlds) < 2:
        return str(value(worlds[0]) if worlds else "-")
    ends = [w[0] - 1 for w in worlds[1:]] + [None]
    return ", ".join(f"{value(w)} (steps {w[0]}-{'' if end is None else end})" for w, end in zip(worlds, ends))


def _table(header: list[str], rows: list[list]) -> str:
    rule = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(header))) + "|"
    out = ["| " + " | ".join(header) + " |", rule]
    out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(out)


def training_log_rows(metrics_path: Path, upto_step: int) -> tuple[list[str], dict[int, dict]]:
    """Per step: epoch, training loss and eval metrics; a later record of a step wins (resumes)."""
    rows: dict[int, dict] = {}
    keys: list[str] = []
    if not metrics_path.exists():
        return keys, rows
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        step = rec.get("step")
        if step is None or step > upto_step or "event" in rec:
            continue
        row = rows.setdefault(step, {"epoch": rec.get("epoch")})
        if "loss" in rec:
            row["loss"] = rec["loss"]
        for k, v in rec.items():
            if k.startswith("eval/") and k.endswith(("/spearman_cosine", "/ndcg@10")):
                row[k] = v
                if k not in keys:
                    keys.append(k)
    return keys, rows


def training_seconds(metrics_path: Path, upto_step: int) -> float:
    """Time spent in training steps up to ``upto_step``: the logged seconds per step x steps."""
    total, prev = 0.0, 0
    if not metrics_path.exists():
        return total
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        step = rec.get("step")
        if step is None or "seconds_per_step" not in rec or step > upto_step:
            continue
        if step > prev:
            total += rec["seconds_per_step"] * (step - prev)
        prev = step
    return total


def _versions(*packages: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name.replace("-", " ").title()] = version(name)
        except PackageNotFoundError:
            pass
    return out


METRIC_NAMES = {"pearson": "Pearson", "spearman": "Spearman", "cosine": "Cosine", "dot": "Dot",
                "euclidean": "Euclidean", "manhattan": "Manhattan"}


def front_matter(base_model: str, data: list[DatasetInfo], loss_titles: list[str], final_metrics: dict,
                 eval_names: list[str], ir_names: list[str] = ()) -> dict:
    """The YAML header the Hub reads: tags, widget examples from the training rows, every
    evaluator's metrics (model-index), as sentence-transformers writes it."""
    rows = sum((d.rows or 0) for d in data)
    front: dict = {"tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense",
                            "dist-embed", *([f"dataset_size:{rows}"] if rows else []),
                            *(f"loss:{t}" for t in loss_titles)]}
    if _is_hub_id(base_model):
        front["base_model"] = base_model
    widget = widget_examples(data)
    if widget:
        front["widget"] = widget
    hub = [d.name for d in data if _is_hub_id(d.name)]
    if hub:
        front["datasets"] = hub
    front["pipeline_tag"] = "sentence-similarity"
    front["library_name"] = "sentence-transformers"
    tasks = [(n, "semantic-similarity", "Semantic Similarity") for n in eval_names] + \
            [(n, "information-retrieval", "Information Retrieval") for n in ir_names]
    if final_metrics and tasks:
        front["metrics"] = list(dict.fromkeys(k.rsplit("/", 1)[1] for name, _, _ in tasks for k in final_metrics
                                              if k.startswith(f"eval/{name}/")))
        front["model-index"] = [{"name": f"SentenceTransformer based on {base_model}", "results": [
            {"task": {"type": kind, "name": title},
             "dataset": {"name": name, "type": name},
             "metrics": [{"type": k.rsplit("/", 1)[1], "value": _plain(v),
                          "name": " ".join(METRIC_NAMES.get(w, w) for w in k.rsplit("/", 1)[1].split("_"))}
                         for k, v in final_metrics.items() if k.startswith(f"eval/{name}/")]}
            for name, kind, title in tasks]}]
    return front


def _plain(v):
    return None if isinstance(v, float) and math.isnan(v) else float(v)


def widget_examples(data: list[DatasetInfo], n: int = 5) -> list[dict]:
    """Hub widget entries from the first training rows: a row's first text against its other texts
    and texts of other rows (as sentence-transformers' cards draw them)."""
    text_rows = [[t for t, c in zip(row, d.columns) if c != "score" and isinstance(t, str)]
                 for d in data for row in d.sample]
    text_rows = [r for r in text_rows if r]
    out = []
    for i, row in enumerate(text_rows[:n]):
        others = [t for j, r in enumerate(text_rows) if j != i for t in r[1:2]]
        sentences = list(dict.fromkeys(row[1:] + others))[:3]
        if sentences:
            out.append({"source_sentence": row[0], "sentences": sentences})
    return out


def loss_title(loss) -> str:
    return loss.title


def _dataset_section(data: DatasetInfo, loss, world_size: int, heading: str) -> list[str]:
    size = f"* Size: {data.rows:,} training samples" if data.rows else "* Size: streamed (unknown length)"
    parts = [heading, "", size,
             f"* Columns: {', '.join(f'<code>{c}</code>' for c in data.columns)}"]
    if data.share is not None:
        parts.append(f"* Share of training: {data.share:.1%}")
    parts += ["* Approximate statistics based on the first 1000 samples:", ""]
    stat_rows = [[c, "string", f"min: {s['min']} tokens, mean: {s['mean']:.2f} tokens, max: {s['max']} tokens"]
                 for c, s in data.token_stats.items()]
    parts += [_table(["column", "type", "details"], stat_rows), ""]
    if data.sample:
        parts += ["* Samples:", "", _table([cell(c) for c in data.columns],
                                           [[cell(v) for v in row] for row in data.sample]), ""]
    parts += [f"* Loss: `{loss_title(loss)}` with these parameters:", "", "```json",
              json.dumps(loss.card(world_size), indent=2), "```", ""]
    return parts


def render(*, encoder, base_model: str, cfg, losses: list, data: list[DatasetInfo] | None, metrics_path: Path,
           step: int, final_metrics: dict, world_size: int, worlds: list | None = None) -> str:
    """The card; ``losses``: each training dataset's loss object (engine.losses), in order;
    ``worlds``: [first step, world size, global batch] of each stretch of a chain of runs."""
    import torch
    import transformers

    from .. import __version__

    data = data or []
    loss_keys = list(dict.fromkeys(part.key for loss in losses for part in chain(loss)))
    loss_titles = list(dict.fromkeys(part.title for loss in losses for part in chain(loss)))
    dims = sorted({d for loss in losses for d, _ in getattr(loss, "dims", ())}, reverse=True)
    keys, log_rows = training_log_rows(metrics_path, step)
    eval_names = [k.split("/")[1] for k in final_metrics if k.endswith("/spearman_cosine")]
    ir_names = [k.split("/")[1] for k in final_metrics if k.endswith("/ndcg@10")]
    front = front_matter(base_model, data, loss_titles, final_metrics, eval_names, ir_names)
    t = cfg.training
    defaults = type(t)()
    all_hp = t.model_dump()
    non_default = {k: v for k, v in all_hp.items() if getattr(defaults, k) != v}
    worlds = worlds or [[1, world_size, t.batch_size * world_size]]
    hp_all = {"per_device_train_batch_size": t.batch_size, "world_size": by_stretch(worlds, lambda w: w[1]),
              "global_batch_size": by_stretch(worlds, lambda w: w[2]), **all_hp,
              "no_duplicates_batching": cfg.data.no_duplicates, "optimizer": "AdamW",
              "lr_scheduler": "linear warm-up, then linear decay"}

    parts = ["---", yaml.safe_dump(front, allow_unicode=True, sort_keys=False, width=100).rstrip(), "---", "",
             f"# SentenceTransformer based on {base_model}", "",
             f"This is a [sentence-transformers](https://www.SBERT.net) model finetuned from `{base_model}` with "
             f"dist_embed. It maps sentences & paragraphs to a {encoder.dim}-dimensional dense vector space and can "
             "be used for semantic textual similarity, semantic search, paraphrase mining, text classification, "
             "clustering, and more.", "",
             "## Model Details", "", "### Model Description",
             "- **Model Type:** Sentence Transformer",
             f"- **Base model:** `{base_model}`",
             f"- **Maximum Sequence Length:** {encoder.max_seq_length} tokens",
             f"- **Output Dimensionality:** {encoder.dim} dimensions",
             "- **Similarity Function:** Cosine Similarity",
             f"- **Training Steps:** {step}", ""]
    sims = {"cosine": "Cosine Similarity", "dot": "Dot Product", "euclidean": "Euclidean Distance",
            "manhattan": "Manhattan Distance"}
    sim = encoder.st_config.get("similarity_fn_name") or "cosine"
    at = parts.index("- **Similarity Function:** Cosine Similarity")
    parts[at] = f"- **Similarity Function:** {sims.get(sim, sim)}"
    if dims:
        parts.insert(-1, f"- **Matryoshka dimensions:** {', '.join(map(str, dims))} (the first d dimensions of an "
                         "embedding are an embedding: `SentenceTransformer(path, truncate_dim=d)`)")
    if encoder.st_config.get("truncate_dim"):
        parts.insert(-1, f"- **Truncated to:** {encoder.st_config['truncate_dim']} dimensions in `encode`")
    if encoder.st_config.get("prompts"):
        parts.insert(-1, f"- **Prompts:** {encoder.st_config['prompts']} (default: "
                         f"{encoder.st_config.get('default_prompt_name')})")
    if data:
        parts.append(f"- **Training Dataset{'s' if len(data) > 1 else ''}:**")
        parts += [f"    - {d.name}" + (f" ({d.rows:,} rows)" if d.rows else "") for d in data]
        parts.append("")
    parts += ["### Model Sources", "",
              "- **Documentation:** [Sentence Transformers Documentation](https://sbert.net)",
              "- **Trained with:** dist_embed (distributed training of sentence embedding models)", "",
              "### Full Model Architecture", "", "```", architecture(encoder), "```", "",
              "## Usage", "", "### Direct Usage (Sentence Transformers)", "", "```bash",
              "pip install -U sentence-transformers", "```", "", "```python",
              "from sentence_transformers import SentenceTransformer", "",
              'model = SentenceTransformer("path/to/this/model")',
              "sentences = [", '    "A man is eating food.",', '    "A man is eating a piece of bread.",',
              '    "The girl is carrying a baby.",', "]", "embeddings = model.encode(sentences)",
              f"print(embeddings.shape)  # (3, {encoder.dim})",
              "similarities = model.similarity(embeddings, embeddings)", "```", ""]
    if eval_names or ir_names:
        parts += ["## Evaluation", "", "### Metrics", ""]
        kinds = [(n, "Semantic Similarity", "STS evaluator", "EmbeddingSimilarityEvaluator") for n in eval_names] + \
                [(n, "Information Retrieval", "retrieval evaluator", "InformationRetrievalEvaluator, cosine")
                 for n in ir_names]
        for name, title, ours, theirs in kinds:
            pref = f"eval/{name}/"
            rows = [[k[len(pref):], final_metrics[k]] for k in final_metrics if k.startswith(pref)]
            parts += [f"#### {title}", "", f"* Dataset: `{name}`", f"* Evaluated with dist_embed's {ours} (the "
                      f"definitions of sentence-transformers' `{theirs}`)", "", _table(["Metric", "Value"], rows), ""]
    parts += ["## Training Details", ""]
    if data:
        parts += [f"### Training Dataset{'s' if len(data) > 1 else ''}", ""]
        if len(data) > 1:
            parts += [f"Each global batch comes from one dataset, drawn by the `{cfg.data.sampler}` sampler"
                      + (f" (temperature {cfg.data.temperature})" if cfg.data.sampler == "temperature" else "")
                      + ".", ""]
        for d, loss in zip(data, losses):
            parts += _dataset_section(d, loss, world_size, f"#### {d.name}")
    else:
        parts += [f"* Loss: `{loss_title(losses[0])}` with these parameters:", "", "```json",
                  json.dumps(losses[0].card(world_size), indent=2), "```", ""]
    parts += ["### Training Hyperparameters", "", "#### Non-Default Hyperparameters", ""]
    parts += [f"- `{k}`: {v}" for k, v in non_default.items()] or ["- (none)"]
    parts += ["", "#### All Hyperparameters", "<details><summary>Click to expand</summary>", ""]
    parts += [f"- `{k}`: {v}" for k, v in hp_all.items()]
    parts += ["", "</details>", "", "### Training Logs", ""]
    header = ["Epoch", "Step", "Training Loss"] + [f"{k.split('/')[1]} {k.rsplit('/', 1)[1]}" for k in keys]
    table_rows = []
    for s in sorted(log_rows):
        r = log_rows[s]
        cells = [_fmt(r.get("epoch")), str(s), _fmt(r.get("loss"))] + [_fmt(r.get(k)) for k in keys]
        if s == step:
            cells = [f"**{c}**" for c in cells]
        table_rows.append(cells)
    seconds = training_seconds(metrics_path, step)
    parts += [_table(header, table_rows) if table_rows else "(no logged steps)", "",
              "* The bold row denotes the saved checkpoint.", "",
              "### Training Time", f"- **Training**: {seconds:.1f} seconds" if seconds else "- **Training**: -", "",
              "### Framework Versions", f"- Python: {platform.python_version()}", f"- dist_embed: {__version__}",
              f"- Transformers: {transformers.__version__}", f"- PyTorch: {torch.__version__}",
              *(f"- {name}: {v}" for name, v in _versions("accelerate", "datasets", "tokenizers",
                                                           "sentence-transformers").items()), "",
              "## Additional Resources", "",
              "- [Sentence Transformers documentation](https://sbert.net): using, evaluating and training "
              "embedding models", "- The dist_embed README: multi-GPU and cluster training, exact resume", "",
              "## Citation", "", "### BibTeX", "", "#### Sentence Transformers", "```bibtex", SBERT_BIB, "```", ""]
    cite = list(dict.fromkeys(k for key in loss_keys for k in ((key, "mnrl") if key == "cached_mnrl" else (key,))))
    for key in cite:
        if key in CITATIONS:
            title, bib = CITATIONS[key]
            parts += [f"#### {title}", "```bibtex", bib, "```", ""]
    return "\n".join(parts)
