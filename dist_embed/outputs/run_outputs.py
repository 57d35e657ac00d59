"""Where a run's records go: metrics.jsonl (W&B gets every record too), the per-step hooks, and
what the model card says about the training data."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .tracking import MetricsWriter

ROW_LOG_ENV = "DIST_EMBED_LOG_ROW_IDS"
STEP_FILE_ENV = "DIST_EMBED_STEP_FILE"  # set by our launcher for one worker per node


@dataclass(frozen=True)
class RunOutputs:
    out: Path
    metrics: MetricsWriter  # writes on rank 0 only
    wandb: object | None = None  # a WandbRun on rank 0 when logging.wandb is set
    hooks: tuple = ()  # objects with after_step(step, epoch, rows): called after every optimizer step
    dataset_info: tuple = ()  # per dataset, for the model card (rank 0)
    rss_before_model: float | None = None  # MiB, this rank, once libraries and the process group are up

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


class StepBeacon:
    """The last optimizer step this worker finished, in the file its launcher named
    (DIST_EMBED_STEP_FILE): the step the launcher's one line names when a peer is lost. A few bytes
    written in place after every step."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)

    @classmethod
    def from_env(cls) -> "StepBeacon | None":
        path = os.environ.get(STEP_FILE_ENV)
        return cls(path) if path else None

    def after_step(self, step: int, epoch: int, rows) -> None:
        os.pwrite(self.fd, f"{step:>20}\n".encode(), 0)


class RowLog:
    """Per optimizer step, the (dataset, row id) pairs this rank trained, one JSON line per step in
    ``row_ids/rank<R>.jsonl``: what the exactly-once audits of the tests and drills read. Installed
    by setting DIST_EMBED_LOG_ROW_IDS=1."""

    def __init__(self, out: Path, rank: int):
        (out / "row_ids").mkdir(parents=True, exist_ok=True)
        self.file = open(out / "row_ids" / f"rank{rank}.jsonl", "a", encoding="utf-8")

    @classmethod
    def from_env(cls, out: Path, rank: int) -> "RowLog | None":
        return cls(out, rank) if os.environ.get(ROW_LOG_ENV) else None

    def after_step(self, step: int, epoch: int, rows: list[tuple[int, int]]) -> None:
        self.file.write(json.dumps({"step": step, "epoch": epoch, "rows": [i for _, i in rows],
                                    "datasets": [d for d, _ in rows]}) + "\n")
        self.file.flush()
