"""Rows for a loss: validate records against the loss's columns, count what is skipped, scan.

A record (``readers.Record``) becomes a ``Row(row_id, texts, score)`` in the schema's column
order, or a ``DataError`` naming ``file:line`` and the column: raised, or skipped and counted.
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple

from .readers import DataError, Record, Source

log = logging.getLogger(__name__)


class Row(NamedTuple):
    row_id: int
    texts: tuple[str, ...]  # in schema order, e.g. (anchor, positive, negative)
    score: float | None
    ids: tuple | None = None  # pre-tokenized shards: each text's token ids (int32 bytes), as texts


@dataclass(frozen=True)
class Schema:
    """Which columns a loss reads: text columns in order, optional extra text columns, a score."""

    texts: tuple[str, ...]
    optional_prefix: str | None = None  # e.g. "negative": negative, negative_2, ... are optional extras
    score: str | None = None

    @staticmethod
    def for_loss(loss_name: str) -> "Schema":
        if loss_name in ("mnrl", "cached_mnrl"):
            return Schema(("anchor", "positive"), optional_prefix="negative")
        if loss_name == "triplet":
            return Schema(("anchor", "positive", "negative"))
        if loss_name == "cosine":
            return Schema(("sentence1", "sentence2"), score="score")
        raise ValueError(f"no data schema for loss {loss_name!r}")


@dataclass
class SkipCounter:
    """Rows skipped under ``on_error: skip``, counted per reason."""

    total: int = 0
    by_reason: Counter = field(default_factory=Counter)
    first: dict = field(default_factory=dict)  # reason -> first location, for the summary

    def add(self, reason: str, message: str) -> None:
        self.total += 1
        self.by_reason[reason] += 1
        self.first.setdefault(reason, message)

    def summary(self) -> str:
        parts = [f"{n} {reason} (first: {self.first[reason]})" for reason, n in self.by_reason.most_common()]
        return f"{self.total} rows skipped: " + "; ".join(parts)


def _reason(message: str) -> str:
    """Group errors by kind for the skip summary: the message without its location and values."""
    tail = message.split(": ", 1)[-1].split(" (")[0]
    return re.sub(r": '.*'$|: .*got .*$", "", tail)


def resolve_columns(schema: Schema, mapping: dict[str, str], available: Iterable[str], where: str):
    available = list(available)
    out = []
    for col in schema.texts + ((schema.score,) if schema.score else ()):
        src = mapping.get(col, col)
        if src not in available:
            raise DataError(f"{where}: missing column {src!r}"
                            + (f" (data.columns maps {col} -> {src})" if col in mapping else "")
                            + f"; the row has {', '.join(map(repr, available)) or 'no columns'}")
        out.append(src)
    extras = []
    if schema.optional_prefix:
        p = mapping.get(schema.optional_prefix, schema.optional_prefix)
        extras = sorted((c for c in available if c == p or c.startswith(p + "_")), key=lambda c: (len(c), c))
    return out[: len(schema.texts)], extras, (out[-1] if schema.score else None)


def first_keys(source: "Source") -> list[str] | None:
    """The columns of the source's first readable record (None if it has none)."""
    for rec in source.records():
        if not isinstance(rec.fields, DataError):
            return list(rec.fields.keys())
    return None


def validate_rows(records: Iterable[Record], schema: Schema, columns: dict[str, str],
                  on_error: str = "raise", skips: SkipCounter | None = None,
                  keys: list[str] | None = None) -> Iterator[Row]:
    """Check every record against ``schema``; raise on the first bad one or skip and count it.
    Columns are resolved from ``keys`` (a resumed stream: the first record's) or the first record."""
    resolved = resolve_columns(schema, columns, keys, "first row") if keys is not None else None
    for rec in records:
        try:
            obj = rec.fields
            if isinstance(obj, DataError):
                raise obj
            if resolved is None:
                resolved = resolve_columns(schema, columns, obj.keys(), rec.where)
            text_cols, extra_cols, score_col = resolved
            texts = []
            for col in text_cols + extra_cols:
                if col not in obj:
                    raise DataError(f"{rec.where}: missing column {col!r}")
                value = obj[col]
                if value is None:
                    raise DataError(f"{rec.where}: column {col!r}: null text")
                if not isinstance(value, str):
                    raise DataError(f"{rec.where}: column {col!r}: expected text, got {type(value).__name__}")
                if not value.strip():
                    raise DataError(f"{rec.where}: column {col!r}: empty or whitespace-only text")
                texts.append(value)
            ids = None
            if rec.ids is not None:
                ids = tuple(rec.ids.get(col) for col in text_cols + extra_cols)
                if any(x is None for x in ids):
                    ids = None
            score = None
            if score_col is not None:
                raw = obj.get(score_col)
                try:
                    if isinstance(raw, bool) or raw is None:
                        raise ValueError
                    score = float(raw)
                except (TypeError, ValueError):
                    raise DataError(f"{rec.where}: column {score_col!r}: score is not a number: {raw!r}") from None
                if not math.isfinite(score):
                    raise DataError(f"{rec.where}: column {score_col!r}: score is not finite: {raw!r}")
            yield Row(rec.row_id, tuple(texts), score, ids)
        except DataError as e:
            if on_error == "raise":
                raise
            if skips is not None:
                skips.add(_reason(str(e)), str(e))


def manifest_rows(manifest: dict, where: str, schema: Schema, columns: dict[str, str],
                  max_rows: int | None) -> int:
    """Rows of prepared shards, from their manifest (validated by prepare-data: no scan needed),
    once the loss's columns are checked against the manifest's columns and their types."""
    types = manifest.get("column_types") or {}
    text_cols, extra_cols, score_col = resolve_columns(schema, columns, manifest["columns"], where)
    for col in text_cols + extra_cols:
        if types.get(col, "text") != "text":
            raise DataError(f"{where}: column {col!r} holds {types[col]}s, the loss needs text there")
    if score_col is not None and types.get(score_col, "number") != "number":
        raise DataError(f"{where}: column {score_col!r} holds {types[score_col]}, the loss needs a number score")
    rows = int(manifest["rows"])
    if rows == 0:
        raise DataError(f"{where}: no usable rows")
    return min(rows, max_rows) if max_rows else rows


@dataclass
class ScanResult:
    rows: int  # valid rows
    records: int  # all records, bad ones included
    skips: SkipCounter


def scan(source: Source, schema: Schema, columns: dict[str, str], on_error: str,
         max_skip_fraction: float) -> ScanResult:
    """One validating pass before training: bad data fails in seconds, not mid-run."""
    skips = SkipCounter()
    n = 0
    records = 0

    def counted(it):
        nonlocal records
        for rec in it:
            records += 1
            yield rec

    for _ in validate_rows(counted(source.records()), schema, columns, on_error, skips):
        n += 1
    if skips.total:
        log.warning("%s: %s", source.path, skips.summary())
    check_scan(source.path, n, records, skips, max_skip_fraction)
    return ScanResult(n, records, skips)


def check_scan(path: str, valid: int, records: int, skips: SkipCounter, max_skip_fraction: float) -> None:
    """A scanned data set is usable: some rows, and no more bad ones than allowed."""
    frac = skips.total / max(records, 1)
    if skips.total and frac > max_skip_fraction:
        raise DataError(f"{path}: {skips.total} of {records} rows are bad ({frac:.1%}), more than "
                        f"data.max_skip_fraction={max_skip_fraction:.1%}; {skips.summary()}")
    if valid == 0:
        raise DataError(f"{path}: no usable rows")


def with_prompts(rows, schema: Schema, prompts: dict[str, str]):
    """Rows with each column's prompt in front of its texts (pre-tokenized ids no longer match)."""
    for row in rows:
        cols = schema.texts + (schema.optional_prefix,) * (len(row.texts) - len(schema.texts))
        yield Row(row.row_id, tuple(prompts.get(c, "") + t for c, t in zip(cols, row.texts)), row.score)
