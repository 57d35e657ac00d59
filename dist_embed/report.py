"""``dist-embed report OUTPUT_DIR``: the run summary from metrics.jsonl and report.png with curves,
for people who read cluster logs without W&B."""
from __future__ import annotations

import json
import math
from pathlib import Path


def load_metrics(out_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(training lines, eval lines, health events); a later record of a step wins (after resumes)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is {out_dir} a dist-embed output_dir?)")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    events = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: malformed JSON") from None
        if "event" in rec:
            events.append(rec)
        elif "loss" in rec:
            train[rec["step"]] = rec
        elif any(k.startswith("eval/") for k in rec):
            evals[rec["step"]] = rec
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)], events


def dataset_names(train: list[dict]) -> list[str]:
    return list(dict.fromkeys(k[5:-5] for r in train for k in r if k.startswith("data/") and k.endswith("/rows")))


def summary(out_dir: Path) -> str:
    train, evals, events = load_metrics(out_dir)
    lines = [f"run {out_dir}"]
    if train:
        last = train[-1]
        sps = [r["samples_per_second"] for r in train if r.get("samples_per_second")]
        lines.append(f"  steps        {last['step']} (epoch {last.get('epoch')})")
        lines.append(f"  loss         first {train[0]['loss']:.4f}, last {last['loss']:.4f}, "
                     f"min {min(r['loss'] for r in train):.4f}")
        if sps:
            lines.append(f"  throughput   {sorted(sps)[len(sps) // 2]:.1f} samples/s (median of log lines)")
        for name in dataset_names(train):  # several datasets: each one's loss and rows trained
            losses = [r[f"loss/{name}"] for r in train if r.get(f"loss/{name}") is not None]
            rows = next((r[f"data/{name}/rows"] for r in reversed(train) if f"data/{name}/rows" in r), 0)
            loss = f"loss first {losses[0]:.4f}, last {losses[-1]:.4f}" if losses else "no loss logged"
            lines.append(f"  dataset {name}: {rows} rows trained, {loss}")
    primary = sorted({k for r in evals for k in r if k.endswith(("/spearman_cosine", "/ndcg@10"))})
    for key in primary:
        vals = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
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
        pts = [(r["step"], r[f"loss/{name}"]) for r in train if r.get(f"loss/{name}") is not None]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label=name, alpha=0.7)
    if dataset_names(train):
        axes[0].legend()
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[1].plot(steps, [r["lr"] for r in train], color="tab:orange")
    axes[1].set(title="learning rate", xlabel="step", ylabel="lr")
    for key in metrics:
        pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None and not math.isnan(r[key])]
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
