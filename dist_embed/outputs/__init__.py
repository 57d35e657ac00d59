"""What a run leaves for people and tools: the output directory and its lock, atomic checkpoints,
metrics.jsonl, progress and logs, W&B, model cards, the report."""
