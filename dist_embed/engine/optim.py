"""Optimizer, parameter groups and the learning-rate schedule (shared by every backend)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (the usual transformer recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition is flat: its full shape is ds_shape
        (no_decay if ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """Fused AdamW: one kernel for all parameters (far faster than the per-tensor loop, on CPU too:
    docs/performance.md)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # an older torch without the fused CPU kernel
        return torch.optim.AdamW(groups, lr=lr)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip`` (a device bool): fused AdamW reads the flag inside its
    kernel (the found-inf path torch's GradScaler uses), so the host never waits for the value.
    Other optimizers read it back first."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, skip.to(torch.float32).reshape(())
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(skip):
        optimizer.step()


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up from 0 to the peak lr, then linear decay to 0, as a function of the run's
    position in samples (HF's curve, step for step, while the global batch stays the same).

    Measured in samples, the curve survives a change of world size: resuming a 2-process run with 1
    process continues from the same point at the same lr and still ends at zero. ``total`` is
    ``epochs x rows`` (rows actually trained) or ``max_steps x`` the starting global batch x
    grad_accum; ``warmup`` is ``warmup_steps x`` that batch, or ``warmup_ratio x total``.
    """

    total: float
    warmup: float

    def factor(self, done: float) -> float:
        if done < self.warmup:
            return done / max(self.warmup, 1e-12)
        return max(0.0, (self.total - done) / max(self.total - self.warmup, 1e-12))

    @classmethod
    def for_run(cls, training, samples_per_step: float, rows: int | None) -> "Schedule":
        """From the config (``training``), the starting global batch x grad_accum, and the rows."""
        total = training.max_steps * samples_per_step if training.max_steps > 0 else float(training.epochs * rows)
        warmup = training.warmup_steps * samples_per_step if training.warmup_steps else training.warmup_ratio * total
        return cls(total, warmup)


def lambda_lr(optimizer: torch.optim.Optimizer, factor_now) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR whose factor is read from the run (``factor_now()``), not from its step count."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: factor_now())
