"""Training health checks: the failures that otherwise go unnoticed for a whole epoch.

Seen in the wild: a run sat at loss 5.2666 = ln(194), the number of candidates per anchor, with NaN
STS scores for an epoch. That is "no learning" (uniform scores over the candidates) plus "collapse"
(all embeddings equal, so similarity predictions are constant and correlations undefined).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


class TrainingHealthError(RuntimeError):
    """Training cannot go on usefully (e.g. NaN losses step after step)."""


@dataclass
class HealthMonitor:
    max_bad_steps: int = 5
    plateau_steps: int = 50
    collapse_std: float = 1e-4
    warmup_steps: int = 0
    bad_in_a_row: int = 0
    counters: dict = field(default_factory=lambda: {"bad_steps": 0, "fp16_skipped_steps": 0, "plateau_warnings": 0,
                                                    "collapse_warnings": 0})
    _plateau_run: int = 0

    def bad_step(self, step: int, loss: float, grad_norm: float) -> dict:
        """A non-finite loss or gradient: the caller skips the update. Raises after too many in a row."""
        self.bad_in_a_row += 1
        self.counters["bad_steps"] += 1
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        event = {"event": "nonfinite_step", "step": step, "loss": loss, "grad_norm": grad_norm,
                 "message": f"step {step}: {what} is {loss if what == 'loss' else grad_norm}; update skipped "
                            f"({self.bad_in_a_row} in a row, limit health.max_bad_steps={self.max_bad_steps})"}
        if self.bad_in_a_row >= self.max_bad_steps:
            raise TrainingHealthError(
                f"{self.bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient (last at step "
                f"{step}). Lower training.lr, use bf16 instead of fp16, check the data for empty texts, or raise "
                f"health.max_bad_steps")
        return event

    def good_step(self, step: int, loss: float, candidates: int | None, emb_std: float | None) -> list[dict]:
        self.bad_in_a_row = 0
        events = []
        if candidates and candidates > 1 and self.plateau_steps and step > self.warmup_steps:
            uniform = math.log(candidates)
            if abs(loss - uniform) < 0.02 * uniform:
                self._plateau_run += 1
                if self._plateau_run == self.plateau_steps:
                    self.counters["plateau_warnings"] += 1
                    self._plateau_run = 0
                    events.append({"event": "no_learning", "step": step, "loss": loss,
                                   "message": f"loss {loss:.4f} has stayed at ln({candidates}) = {uniform:.4f} "
                                              f"(uniform scores over all candidates) for {self.plateau_steps} steps "
                                              f"after warm-up: the model is not learning"})
            else:
                self._plateau_run = 0
        if emb_std is not None and emb_std < self.collapse_std:
            self.counters["collapse_warnings"] += 1
            events.append({"event": "embedding_collapse", "step": step, "emb_std": emb_std,
                           "message": f"step {step}: embeddings collapsed (mean std across the batch {emb_std:.2e} "
                                      f"< health.collapse_std={self.collapse_std}); similarities are near constant"})
        return events

    def fp16_skipped(self, step: int, scale_before: float, scale_after: float) -> dict:
        self.counters["fp16_skipped_steps"] += 1
        return {"event": "fp16_skipped_step", "step": step,
                "message": f"step {step}: fp16 gradients overflowed; update skipped, loss scale "
                           f"{scale_before:g} -> {scale_after:g}"}


def sts_events(step: int, results: dict) -> list[dict]:
    nan = sorted(k for k, v in results.items() if isinstance(v, float) and math.isnan(v))
    if not nan:
        return []
    return [{"event": "eval_nan", "step": step,
             "message": f"step {step}: {', '.join(nan)} are NaN: the model gives constant similarities "
                        f"(collapsed embeddings)"}]
