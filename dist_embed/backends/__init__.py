"""How a model is trained across processes, behind one small interface the loop uses.

``ddp.DDPBackend``: our own path: autograd on every rank, one bucketed gradient all-reduce per
optimizer step (sparse for the word embeddings), fused AdamW, the fp16 GradScaler on GPUs.
``deepspeed.DeepSpeedBackend``: DeepSpeed ZeRO 1-3 (+ offload) through accelerate.

The loop never asks which one it has. What it needs (``Backend``):

- ``model``: what every training forward goes through (the encoder, or DeepSpeed's engine);
- ``backward``/``backward_cached``/``backward_outputs``: the three kinds of backward pass of a step
  (a loss of the parameters; cached MNRL's loss of cached embeddings; a replayed mini-batch);
- ``note_batch``: sees each micro-batch before its forward (the DDP path marks the word-embedding
  rows it touches); ``rescale_grads``: an epoch that ended mid-accumulation;
- ``step(loss)``: reduce, clip, optimizer step (or skip), schedule; -> ``StepResult``;
- ``save``/``load``: the training state in a checkpoint's ``training_state/``; ``full_state_dict``
  and ``encoder_for_eval``: the whole weights (gathered under ZeRO-3); ``describe``: what a
  checkpoint may be resumed under.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass(frozen=True)
class StepResult:
    grad_norm: float
    applied: bool  # False: the update was skipped (non-finite loss or gradients, fp16 overflow)
    scale_drop: tuple[float, float] | None = None  # fp16: (loss scale before, after) when it overflowed


class Backend(Protocol):
    model: torch.nn.Module
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def backward(self, loss: torch.Tensor) -> None: ...

    def backward_cached(self, loss: torch.Tensor) -> None: ...

    def backward_outputs(self, outputs: torch.Tensor, grad: torch.Tensor) -> None: ...

    def note_batch(self, batch: dict) -> None: ...

    def rescale_grads(self, factor: float) -> bool: ...

    def step(self, loss: float, timer=None) -> StepResult: ...

    def save(self, directory: Path, is_main: bool) -> None: ...

    def load(self, checkpoint: Path, directory: Path) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None: ...

    def encoder_for_eval(self): ...

    def describe(self) -> dict: ...


def make_backend(cfg, state, encoder, make_scheduler) -> Backend:
    """The backend ``distributed.backend`` names, wrapping ``encoder``."""
    from ..optim import param_groups

    groups = param_groups(encoder, cfg.training.weight_decay)
    if cfg.distributed.backend == "deepspeed":
        from .deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, state, encoder, groups, make_scheduler)
    from .ddp import DDPBackend

    return DDPBackend(cfg, state, encoder, groups, make_scheduler)
