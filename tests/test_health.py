import math

import pytest

from dist_embed.engine.health import HealthMonitor, TrainingHealthError, sts_events
from dist_embed.evaluation.sts import similarity_metrics

import numpy as np


def test_plateau_at_ln_candidates_is_reported_after_warmup():
    h = HealthMonitor(plateau_steps=3, warmup_steps=2)
    stuck = math.log(194)  # 5.2678: the seed run's loss with 194 candidates
    events = [e for step in range(1, 8) for e in h.good_step(step, stuck, 194, 0.5)]
    assert [e["event"] for e in events] == ["no_learning"]
    assert "ln(194)" in events[0]["message"] and events[0]["step"] == 5
    assert h.good_step(9, 1.0, 194, 0.5) == []  # learning again resets the count


def test_collapse_and_nan_eval_are_reported():
    h = HealthMonitor(collapse_std=1e-4)
    (ev,) = h.good_step(1, 2.0, 64, 1e-7)
    assert ev["event"] == "embedding_collapse"
    same = np.ones((10, 4))
    metrics = similarity_metrics(same, same, np.linspace(0, 1, 10))
    assert math.isnan(metrics["spearman_cosine"])
    (ev,) = sts_events(7, metrics)
    assert ev["event"] == "eval_nan" and "constant similarities" in ev["message"]


def test_bad_steps_in_a_row_abort():
    h = HealthMonitor(max_bad_steps=2)
    h.bad_step(1, float("nan"), 1.0)
    h.good_step(2, 1.0, None, None)  # resets the run
    h.bad_step(3, 1.0, float("inf"))
    with pytest.raises(TrainingHealthError, match="2 optimizer steps in a row"):
        h.bad_step(4, float("nan"), 1.0)
    assert h.counters["bad_steps"] == 3
