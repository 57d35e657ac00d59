"""The ``data.hard_negatives`` section: hard negatives re-mined during training with the current
weights (dist_embed/mining/refresh.py; docs/retrieval-training.md says when it pays)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .paths import LocalPath

MINED_LOSSES = ("mnrl", "cached_mnrl", "triplet")  # the losses that take negative columns


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class HardNegativePrompts(_Section):
    """Text put in front of what the refresh embeds (default: the data set's anchor / positive prompts)."""

    anchor: str | None = None
    corpus: str | None = None


class HardNegativesConfig(_Section):
    """At the start (for data sets that have no negatives) and every ``every_steps`` optimizer steps,
    every rank embeds its share of the corpus and of the anchors with the current weights; the exact
    top candidates, filtered for false negatives, become each row's negative columns from the next
    step on. The filters are sentence-transformers' ``mine_hard_negatives`` ones."""

    every_steps: int = Field(default=0, ge=0)  # 0: mined once, at the start
    num_negatives: int = Field(default=1, gt=0)
    corpus: LocalPath | None = None  # more candidate texts (a 'text' column) beside each data set's positives
    datasets: list[str] | None = None  # which data sets (default: every one trained with mnrl, cached_mnrl, triplet)
    range_min: int = Field(default=0, ge=0)  # skip the closest range_min candidates (BGE skips the top ranks)
    range_max: int = Field(default=100, gt=0)  # consider only the closest range_max candidates
    max_score: float | None = None  # drop candidates scoring above this (cosine)
    min_score: float | None = None  # drop candidates scoring below this
    absolute_margin: float | None = None  # keep only scores <= positive score - margin
    # keep only scores <= positive score x (1 - margin): NV-Retriever's TopK-PercPos, 0.05 = 95% of the positive
    relative_margin: float | None = Field(default=None, ge=0, lt=1)
    prompts: HardNegativePrompts = Field(default_factory=HardNegativePrompts)
    batch_size: int = Field(default=64, gt=0)  # texts per forward pass
    chunk_size: int = Field(default=4096, gt=0)  # texts per unit of work: what a rank embeds, keeps and searches

    @model_validator(mode="after")
    def _window(self):
        if self.range_min >= self.range_max:
            raise ValueError(f"range_min {self.range_min} >= range_max {self.range_max}: no candidate is left "
                             "to choose from")
        return self

    def chosen(self, datasets) -> list:
        """The data sets it mines for (``Config.datasets``, each with its loss resolved)."""
        if self.datasets is not None:
            return [d for d in datasets if d.name in self.datasets]
        return [d for d in datasets if d.loss.name in MINED_LOSSES]

    def check(self, datasets) -> None:
        """Against the run's data sets (their losses resolved): ValueError for a mismatch."""
        names = [d.name for d in datasets]
        unknown = [n for n in self.datasets or [] if n not in names]
        if unknown:
            raise ValueError(f"data.hard_negatives.datasets: {unknown} not among the data sets {names}")
        chosen = self.chosen(datasets)
        if not chosen:
            raise ValueError("data.hard_negatives: no data set to mine for (losses mnrl, cached_mnrl and triplet "
                             "take negatives)")
        for d in chosen:
            if d.loss.name not in MINED_LOSSES:
                raise ValueError(f"data.hard_negatives: data set {d.name!r} is trained with loss {d.loss.name}, "
                                 "which takes no negatives")
            if d.loss.name == "triplet" and self.num_negatives != 1:
                raise ValueError(f"data.hard_negatives.num_negatives {self.num_negatives}: data set {d.name!r} is "
                                 "trained with the triplet loss, which takes one negative")
