"""How a model is trained across processes: our bucketed all-reduce (allreduce.py) or DeepSpeed ZeRO
1-3 (deepspeed.py), behind the one small ``Backend`` interface the loop uses; the optimizer (optim.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterable, Protocol

import torch


@dataclass(frozen=True)
class StepResult:
    """An optimizer step's outcome, as tensors where the backend keeps them on the device (the loop
    reads them all at once on a log step) or plain numbers."""

    grad_norm: object  # the total gradient norm before clipping
    applied: object  # False: the update was skipped (non-finite loss or gradients, fp16 overflow)
    scale: tuple | None = None  # fp16: the loss scale (before, after) the step


class Backend(Protocol):
    """What the loop needs of a backend (it never asks which one it has).

    ``allreduce.AllReduceBackend``: autograd on every rank, one bucketed gradient all-reduce per optimizer step
    (sparse for the word embeddings), fused AdamW, fp16's GradScaler on GPUs.
    ``deepspeed.DeepSpeedBackend``: DeepSpeed ZeRO 1-3 (+ offload) through accelerate.

    - ``model``: what every training forward goes through (the encoder, or DeepSpeed's engine);
    - ``backward``/``backward_cached``/``backward_outputs``: the three kinds of backward pass of a step
      (a loss of the parameters; cached MNRL's loss of cached embeddings; a replayed mini-batch);
    - ``note_batch``: sees each micro-batch before its forward (the all-reduce path marks the word-embedding
      rows it touches); ``rescale_grads``: an epoch that ended mid-accumulation;
    - ``step(loss)``: reduce, clip, optimizer step (or skip), schedule; -> ``StepResult``;
    - ``save``/``load``: the training state in a checkpoint's ``training_state/`` (exact whatever dtype
      the checkpoint's model is stored in); ``weight_parts``:
      the whole weights in pieces (gathered module by module under ZeRO-3); ``evaluating()``: the
      encoder to evaluate with, as a context; ``collective_eval``: every rank must run the same
      evaluation forwards (ZeRO-3); ``describe``: what a checkpoint may be resumed under.

    ``start_backend`` runs before the model is built: under ZeRO-3 the model is then built partitioned.
    ``make_backend`` runs after the model is final (attention switched, compiled): the optimizer
    and DeepSpeed's engine hold the parameters as they will train.
    """

    model: torch.nn.Module
    collective_eval: bool
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def backward(self, loss: torch.Tensor) -> None: ...

    def backward_cached(self, loss: torch.Tensor) -> None: ...

    def backward_outputs(self, outputs: torch.Tensor, grad: torch.Tensor) -> None: ...

    def note_batch(self, batch) -> None: ...

    def rescale_grads(self, factor: float) -> bool: ...

    def step(self, loss, timer=None) -> StepResult: ...

    def save(self, directory: Path, is_main: bool, model_dtype: torch.dtype = torch.float32) -> None: ...

    def load(self, checkpoint: Path, directory: Path) -> None: ...

    def weight_parts(self) -> Iterable[dict[str, torch.Tensor]] | None: ...

    def evaluating(self) -> ContextManager[torch.nn.Module]: ...

    def describe(self) -> dict: ...


def start_backend(cfg, state, precision):
    """What must exist before the model is built (None for the all-reduce path): DeepSpeed's Accelerator, after
    which ZeRO-3 builds models partitioned across the ranks."""
    if cfg.distributed.backend != "deepspeed":
        return None
    from .deepspeed import DeepSpeedSetup

    return DeepSpeedSetup(cfg, state, precision)


def make_backend(cfg, state, encoder, precision, make_scheduler, started=None) -> Backend:
    """The backend ``distributed.backend`` names, wrapping ``encoder`` in ``precision`` (``started``:
    what ``start_backend`` returned)."""
    from .optim import param_groups

    groups = param_groups(encoder, cfg.training.weight_decay)
    if cfg.distributed.backend == "deepspeed":
        from .deepspeed import DeepSpeedBackend

        started = started or start_backend(cfg, state, precision)
        return DeepSpeedBackend(started, cfg, state, encoder, groups, make_scheduler)
    from .allreduce import AllReduceBackend

    return AllReduceBackend(cfg, state, encoder, precision, groups, make_scheduler)
