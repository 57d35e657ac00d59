"""Stream rows out of jsonl / jsonl.gz / csv / tsv / parquet files and Hugging Face datasets.

Readers never hold a file in memory. Each yields ``Record(row_id, where, fields)`` where ``row_id``
is the record's 0-based position in the source (bad records included, so ids are stable whether
bad rows raise or are skipped) and ``where`` is ``file:line`` for error messages.
``validate_rows`` then turns records into ``Row`` tuples for the loss's column schema.
"""
from __future__ import annotations

import csv
import gzip
import re
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A bad input row or file, with its location in the message."""


class Record(NamedTuple):
    row_id: int
    where: str
    fields: Any  # dict from the source, or a DataError for a row that could not be parsed


class Row(NamedTuple):
    row_id: int
    texts: tuple[str, ...]  # in schema order, e.g. (anchor, positive, negative)
    score: float | None


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


FORMATS = ("jsonl", "csv", "tsv", "parquet", "hf")


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix, f in ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".json", "jsonl"), (".json.gz", "jsonl"),
                      (".csv", "csv"), (".csv.gz", "csv"), (".tsv", "tsv"), (".tsv.gz", "tsv"),
                      (".parquet", "parquet")):
        if name.endswith(suffix):
            return f
    if not Path(path).exists() and "/" in path and not path.startswith((".", "/")):
        return "hf"  # "owner/name": a Hugging Face hub dataset
    raise DataError(f"{path}: cannot tell the format from the name; set data.format "
                    f"(one of {', '.join(FORMATS)})")


def _open_binary(path: Path):
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text or None when the bytes are not UTF-8)."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None


def read_jsonl(path: Path) -> Iterator[Record]:
    row_id = 0
    for lineno, text in _decoded_lines(path):
        where = f"{path}:{lineno}"
        if text is None:
            yield Record(row_id, where, DataError(f"{where}: not valid UTF-8"))
        elif not text.strip():
            continue  # blank lines carry no record
        else:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                obj = DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})")
            if not isinstance(obj, (dict, DataError)):
                obj = DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield Record(row_id, where, obj)
        row_id += 1


def read_delimited(path: Path, delimiter: str) -> Iterator[Record]:
    """CSV with standard quoting; TSV with quoting off (STS-B style: quotes are text)."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    bad_lines: dict[int, str] = {}

    def lines():
        for lineno, text in _decoded_lines(path):
            if text is None:
                bad_lines[lineno] = "not valid UTF-8"
                yield "\n"
            else:
                yield text

    reader = csv.reader(lines(), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file (no header line)") from None
    header = [h.strip() for h in header]
    row_id = 0
    for values in reader:
        lineno = reader.line_num
        where = f"{path}:{lineno}"
        if lineno in bad_lines:
            yield Record(row_id, where, DataError(f"{where}: {bad_lines.pop(lineno)}"))
        elif not values or values == [""]:
            continue
        elif len(values) != len(header):
            yield Record(row_id, where, DataError(
                f"{where}: expected {len(header)} fields ({', '.join(header)}), found {len(values)}"))
        else:
            yield Record(row_id, where, dict(zip(header, values)))
        row_id += 1


def read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError(f"{path}: file not found")
    row_id = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            yield Record(row_id, f"{path}:row {row_id}", obj)
            row_id += 1


def read_hub(name: str, subset: str | None, split: str, streaming: bool) -> Iterator[Record]:
    """A Hugging Face hub dataset (e.g. sentence-transformers/all-nli, subset triplet)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: reading hub datasets needs the 'datasets' package "
                        f"(pip install 'dist_embed[hub]')") from None
    ds = datasets.load_dataset(name, subset, split=split, streaming=streaming)
    for row_id, obj in enumerate(ds):
        yield Record(row_id, f"{name}[{split}] row {row_id}", obj)


@dataclass(frozen=True)
class Source:
    """Where the rows come from. Re-iterable: each ``records()`` call streams from the start."""

    path: str
    fmt: str = "auto"
    subset: str | None = None
    split: str = "train"
    streaming: bool = True
    max_rows: int | None = None

    @property
    def format(self) -> str:
        return detect_format(self.path, self.fmt)

    def records(self) -> Iterator[Record]:
        fmt = self.format
        p = Path(self.path)
        if fmt == "jsonl":
            it = read_jsonl(p)
        elif fmt in ("csv", "tsv"):
            it = read_delimited(p, "," if fmt == "csv" else "\t")
        elif fmt == "parquet":
            it = read_parquet(p)
        elif fmt == "hf":
            it = read_hub(self.path, self.subset, self.split, self.streaming)
        else:
            raise DataError(f"{self.path}: unknown format {fmt!r}")
        for rec in it:
            if self.max_rows is not None and rec.row_id >= self.max_rows:
                return
            yield rec


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


def _resolve_columns(schema: Schema, mapping: dict[str, str], available: Iterable[str], where: str):
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


def validate_rows(records: Iterable[Record], schema: Schema, columns: dict[str, str],
                  on_error: str = "raise", skips: SkipCounter | None = None) -> Iterator[Row]:
    """Check every record against ``schema``; raise on the first bad one or skip and count it."""
    resolved = None
    for rec in records:
        try:
            obj = rec.fields
            if isinstance(obj, DataError):
                raise obj
            if resolved is None:
                resolved = _resolve_columns(schema, columns, obj.keys(), rec.where)
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
            yield Row(rec.row_id, tuple(texts), score)
        except DataError as e:
            if on_error == "raise":
                raise
            if skips is not None:
                skips.add(_reason(str(e)), str(e))


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
        frac = skips.total / max(records, 1)
        if frac > max_skip_fraction:
            raise DataError(f"{source.path}: {skips.total} of {records} rows are bad ({frac:.1%}), more than "
                            f"data.max_skip_fraction={max_skip_fraction:.1%}; {skips.summary()}")
    if n == 0:
        raise DataError(f"{source.path}: no usable rows")
    return ScanResult(n, records, skips)
