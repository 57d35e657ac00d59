"""``dist-embed report OUTPUT_DIR``: the run summary from metrics.jsonl and report.png with curves,
for people who read cluster logs without W&B."""
from __future__ import annotations

import json
import math
from pathlib import Path


def read_records(out_dir: Path) -> tuple[list[dict], list[str]]:
    """The records of ``metrics.jsonl`` and what could not be read as one (``path:line: why``):
    a run killed mid-write leaves a torn last line, and that must not hide the rest."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {out_dir} a dist-embed output_dir?)")
    records, bad = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            bad.append(f"{path}:{n}: not a JSON record")
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step", 0), (int, float)):
            bad.append(f"{path}:{n}: not a metrics record")
            continue
        records.append(rec)
    return records, bad


def load_metrics(out_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(training lines, eval lines, health events); a later record of a step wins (after resumes)."""
    records, _ = read_records(out_dir)
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    events = []
    for rec in records:
        if isinstance(rec.get("event"), str):
            events.append(rec)
        elif _number(rec.get("loss")) and "step" in rec:
            train[rec["step"]] = rec
        elif any(k.startswith("eval/") for k in rec) and "step" in rec:
            evals[rec["step"]] = rec
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)], events


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def dataset_names(train: list[dict]) -> list[str]:
    return list(dict.fromkeys(k[5:-5] for r in train for k in r if k.startswith("data/") and k.endswith("/rows")))


def summary(out_dir: Path) -> str:
    train, evals, events = load_metrics(out_dir)
    lines = [f"run {out_dir}"]
    _, bad = read_records(out_dir)
    if bad:
        lines.append(f"  note         {len(bad)} unreadable line(s) of metrics.jsonl skipped (first: {bad[0]})")
    if train:
        last = train[-1]
        sps = [r["samples_per_second"] for r in train if _number(r.get("samples_per_second"))]
        lines.append(f"  steps        {last['step']} (epoch {last.get('epoch')})")
        lines.append(f"  loss         first {train[0]['loss']:.4f}, last {last['loss']:.4f}, "
                     f"min {min(r['loss'] for r in train):.4f}")
        if sps:
            lines.append(f"  throughput   {sorted(sps)[len(sps) // 2]:.1f} samples/s (median of log lines)")
        for name in dataset_names(train):  # several datasets: each one's loss and rows trained
            losses = [r[f"loss/{name}"] for r in train if _number(r.get(f"loss/{name}"))]
            rows = next((r[f"data/{name}/rows"] for r in reversed(train) if f"data/{name}/rows" in r), 0)
            loss = f"loss first {losses[0]:.4f}, last {losses[-1]:.4f}" if losses else "no loss logged"
            lines.append(f"  dataset {name}: {rows} rows trained, {loss}")
    primary = sorted({k for r in evals for k in r if k.endswith(("/spearman_cosine", "/ndcg@10"))})
    for key in primary:
        vals = [(r["step"], r[key]) for r in evals if _number(r.get(key))]
        if vals:
            best = max(vals, key=lambda x: x[1])
            lines.append(f"  {key}  first {vals[0][1]:.4f} (step {vals[0][0]}), final {vals[-1][1]:.4f} "
                         f"(step {vals[-1][0]}), best {best[1]:.4f} (step {best[0]})")
    if events:
        kinds = {}
        for e in events:
            kinds[e["event"]] = kinds.get(e["event"], 0) + 1
        lines.append("  health       " + ", ".join(f"{k} x{v}" for k, v in kinds.items()))
    final = Path(out_dir) / "final"
    lines.append(f"  model        {final if final.exists() else '(no final/ yet)'}")
    return "\n".join(lines)


def plot(out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals, _ = load_metrics(out_dir)
    metrics = sorted({k for r in evals for k in r if k.endswith(("/spearman_cosine", "/ndcg@10"))})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], color="tab:blue", label="all")
    for name in dataset_names(train):
        pts = [(r["step"], r[f"loss/{name}"]) for r in train if _number(r.get(f"loss/{name}"))]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label=name, alpha=0.7)
    if dataset_names(train):
        axes[0].legend()
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[1].plot(steps, [r["lr"] if _number(r.get("lr")) else math.nan for r in train], color="tab:orange")
    axes[1].set(title="learning rate", xlabel="step", ylabel="lr")
    for key in metrics:
        pts = [(r["step"], r[key]) for r in evals if _number(r.get(key)) and not math.isnan(r[key])]
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key.split("/")[1])
    axes[2].set(title="eval spearman (cosine)", xlabel="step", ylabel="spearman")
    if metrics:
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(out_dir))
    fig.tight_layout()
    path = Path(out_dir) / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
