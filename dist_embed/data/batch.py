"""The batch a step consumes: one rank's share of a global batch, tokenized, with what the step
and the loss need to know about the whole global batch (how many rows each rank holds)."""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Callable

import torch


@dataclass
class Batch:
    # per text column (anchor, positive, negatives...): input_ids, attention_mask[, token_type_ids],
    # each padded to the column's longest text; empty on a rank whose slice of a ragged batch is
    features: list[dict[str, Any]]
    texts: list[list[str]]  # per text column, for the false-negative filters
    row_ids: Any  # [rows] int64: each row's id in its dataset (the exactly-once audits)
    scores: Any | None  # [rows] float32 gold scores (cosine loss), else None
    real_tokens: int  # tokens of text, this rank
    padded_tokens: int  # tokens including padding, this rank
    global_size: int = 0  # rows of the whole global batch
    sizes: tuple[int, ...] = ()  # rows each rank holds, in rank order
    n_cols: int = 0  # text columns (an empty slice has no features, but every rank runs this many)
    dataset: int = 0  # which dataset of a mix the global batch came from
    index: int = 0  # the batch's number in its planner's epoch (the planner state after it is kept by it)
    layout: Any = None  # the texts laid out for the encoder (data/layout.py: Unpadded, Packed), or None

    @property
    def rows(self) -> int:
        return len(self.row_ids)

    def map_arrays(self, kind: type, fn: Callable) -> "Batch":
        """This batch with ``fn`` applied to every array of type ``kind`` it holds (numpy <-> torch
        between loader processes, pinning)."""
        return map_arrays(self, kind, fn)


def map_arrays(obj, kind: type, fn: Callable):
    """``fn`` applied to every ``kind`` inside ``obj`` (nested dicts, lists and dataclasses)."""
    if isinstance(obj, kind):
        return fn(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: map_arrays(getattr(obj, f.name), kind, fn) for f in fields(obj)})
    if isinstance(obj, dict):
        return {k: map_arrays(v, kind, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_arrays(v, kind, fn) for v in obj]
    return obj


def pins(device: torch.device) -> bool:
    """Whether host tensors bound for ``device`` are pinned first: a copy from pageable memory
    to a GPU waits for the device, one from pinned memory does not."""
    return device.type == "cuda"


def to_device(obj, device: torch.device):
    """``obj`` (a tensor, or dicts, lists and dataclasses of them, e.g. a layout) on ``device``
    without the host waiting: the one way a step moves host arrays. A host tensor is pinned first
    where ``pins`` says so (the loader already pinned a batch's), then copied with
    ``non_blocking=True``."""
    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and pins(device) and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return map_arrays(obj, torch.Tensor, move)
