"""A refresh's result on disk and in the planners: each row's negatives as corpus ids.

A refresh at step s is the directory ``negatives/step-<s>/`` of the run: ``<data set>.npy``
(int32 [max row id + 1, k], the negatives of row i in row i) and ``meta.json`` (the step, each data
set's index fingerprint and filter options), written to a staging directory, fsynced, with a
manifest of checksums, then renamed into place (outputs/checkpoint.py's commit), so a reader sees
a whole refresh or none. Checkpoints name the refresh their rows used; directories no checkpoint
and no live run names are removed.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from ..data.rows import Row
from ..outputs import checkpoint as ckpt

log = logging.getLogger(__name__)

REFRESH_DIR = "negatives"


class Renewal:
    """A data set's rows with the refresh's negatives as their negative columns: what its planner
    applies to every row it batches (so no-duplicates batching sees them) and to the rows it
    restores (a refresh replaces the columns of rows waiting in its buffers)."""

    def __init__(self, table: np.ndarray, corpus: list[str], prompt: str = ""):
        self.table, self.corpus, self.prompt = table, corpus, prompt
        self.width = 2 + table.shape[1]  # anchor, positive, the negatives

    def __call__(self, row: Row) -> Row:
        negs = self.table[row.row_id] if row.row_id < len(self.table) else ()
        if not len(negs) or negs[0] < 0:
            raise RuntimeError(f"row {row.row_id} has no refreshed negatives (the refresh did not see it)")
        return Row(row.row_id, row.texts[:2] + tuple(self.prompt + self.corpus[i] for i in negs), row.score)


def refresh_name(step: int) -> str:
    return f"{REFRESH_DIR}/step-{step:08d}"


def write_refresh(out: Path, step: int, tables: dict[str, np.ndarray], meta: dict) -> str:
    """Rank 0: the refresh directory, atomically; returns its path relative to ``out``."""
    rel = refresh_name(step)
    target = out / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.begin(target)
    for name, table in tables.items():
        np.save(tmp / f"{name}.npy", table.astype(np.int32), allow_pickle=False)
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1, sort_keys=True) + "\n")
    ckpt.commit(tmp, target)
    return rel


def read_refresh(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, tables) of a refresh directory; ValueError if it is missing or damaged."""
    problem = ckpt.verify(path) if path.is_dir() else "missing"
    if problem:
        raise ValueError(f"{path}: {problem}")
    meta = json.loads((path / "meta.json").read_text())
    return meta, {name: np.load(path / f"{name}.npy", allow_pickle=False) for name in meta["datasets"]}


def referenced(out: Path) -> set[str]:
    """The refresh directories the run's checkpoints name."""
    found = set()
    for trainer in (out / "checkpoints").glob("*/" + ckpt.STATE_DIR + "/trainer.json"):
        try:
            found.update((json.loads(trainer.read_text()).get("negatives") or {}).get("tables", {}).values())
        except (OSError, ValueError):
            continue
    return found


def prune(out: Path, keep: set[str]) -> None:
    """Rank 0: remove refresh directories that neither ``keep`` nor a checkpoint names (and staging
    leftovers of a refresh that was cut short)."""
    root = out / REFRESH_DIR
    if not root.is_dir():
        return
    keep = keep | referenced(out)
    for d in root.iterdir():
        if d.is_dir() and f"{REFRESH_DIR}/{d.name}" not in keep:
            shutil.rmtree(d, ignore_errors=True)
