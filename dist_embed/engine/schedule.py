"""The learning-rate schedule: warm-up and decay as a function of samples trained (any backend)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
