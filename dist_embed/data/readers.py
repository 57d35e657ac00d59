"""Stream rows out of jsonl / jsonl.gz / csv / tsv / parquet files and Hugging Face datasets.

Readers never hold a file in memory. Each yields ``Record(row_id, where, fields)`` where ``row_id``
is the record's 0-based position in the source (bad records included, so ids are stable whether
bad rows raise or are skipped) and ``where`` is ``file:line`` for error messages.
``rows.validate_rows`` then turns records into ``Row`` tuples for the loss's column schema.
"""
from __future__ import annotations

import bisect
import csv
import gzip
import itertools
import json
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .records import DataError, Record
from .shards import MANIFEST, is_shard_spec, read_shards, shard_urls

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "tsv", "parquet", "hf", "wds")
HF_SAVED = ("dataset_dict.json", "state.json")  # what ``datasets``' save_to_disk writes
SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl", ".json.gz": "jsonl", ".csv": "csv",
            ".csv.gz": "csv", ".tsv": "tsv", ".tsv.gz": "tsv", ".parquet": "parquet"}  # a data file's format


def saved_hf_dataset(path: str) -> bool:
    """A directory written by ``datasets``' save_to_disk."""
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in HF_SAVED)


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    if is_shard_spec(path):
        return "wds"
    if saved_hf_dataset(path):
        return "hf"
    found = next((f for suffix, f in SUFFIXES.items() if path.lower().endswith(suffix)), None)
    if found:
        return found
    if not Path(path).exists() and "/" in path and not path.startswith((".", "/")):
        return "hf"  # "owner/name": a Hugging Face hub dataset
    raise DataError(f"{path}: cannot tell the format from the name; set data.format "
                    f"(one of {', '.join(FORMATS)})")


def data_files(path: str) -> list[Path]:
    """The files of a source: the file itself, or a directory's data files in name order
    (a set of shards; sub-directories and files with other suffixes are ignored)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(tuple(SUFFIXES)))
        if not files:
            raise DataError(f"{path}: a directory with no data files (expected names ending in "
                            f"{', '.join(SUFFIXES)})")
        return files
    if not p.exists():
        raise DataError(f"{path}: file not found")
    return [p]


def _open_binary(path: Path):
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decoded_lines(path: Path, offset: int = 0, lineno: int = 0, stop: int | None = None,
                   align: bool = False) -> Iterator[tuple[int, str | None, int]]:
    """(line number, text or None when the bytes are not UTF-8, offset after the line), from a
    byte ``offset`` (of the uncompressed stream) that starts line ``lineno + 1``. A piece of a file
    (data/pieces.py): ``align`` moves an arbitrary ``offset`` to the next line's start (the line it
    falls in belongs to the piece before), and lines that start at ``stop`` or after are left.

    A gzip stream that ends early (a truncated copy) is bad input, not a crash; it cannot be skipped
    row by row, since nothing after the break is readable."""
    try:
        with _open_binary(path) as f:
            if offset and align:
                f.seek(offset - 1)
                offset += len(f.readline()) - 1
            elif offset:
                f.seek(offset)  # gzip: decompresses up to there (O(1) memory)
            for raw in f:
                if stop is not None and offset >= stop:
                    return
                lineno += 1
                offset += len(raw)
                try:
                    yield lineno, raw.decode("utf-8"), offset
                except UnicodeDecodeError:
                    yield lineno, None, offset
    except (EOFError, OSError, zlib.error) as e:
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and path.suffix != ".gz":
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
        raise DataError(f"{path}: truncated or corrupt gzip after line {lineno} ({e}); the stream cannot be "
                        "read past that point, so data.on_error=skip cannot skip it: re-create the file") from None


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj: dict, where: str) -> DataError | None:
    """A JSON escape can name half of a UTF-16 surrogate pair alone (``"\\ud800"``): Python keeps
    it, but it is not Unicode text (no UTF-8 encoding exists). Named as bad input, column first."""
    for key, value in obj.items():
        for what, text in (("column name", key), (f"column {key!r}", value)):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    return DataError(f"{where}: {what}: invalid Unicode (a lone UTF-16 surrogate "
                                     f"{text[e.start]!r} at character {e.start})")
    return None


def read_jsonl(path: Path, start: dict | None = None, at: dict | None = None) -> Iterator[Record]:
    """``start``: a position from ``at`` (offset, line, row) to continue from; ``at`` is updated
    before each record is yielded to the position right after it."""
    start = start or {}
    at = {} if at is None else at
    row_id = start.get("row", 0)
    name = str(path)
    for lineno, text, offset in _decoded_lines(path, start.get("offset", 0), start.get("line", 0), start.get("stop"),
                                               start.get("align", False)):
        where = f"{name}:{lineno}"
        if text is None:
            obj = DataError(f"{where}: not valid UTF-8")
        elif not text.strip():
            at["offset"], at["line"] = offset, lineno
            continue  # blank lines carry no record
        else:
            if lineno == 1:
                text = text.lstrip("\ufeff")  # a byte-order mark (Windows editors) is not part of the data
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                obj = DataError(f"{where}: malformed JSON at column {e.colno}: {e.msg.removesuffix(' at')}")
            except RecursionError:
                obj = DataError(f"{where}: malformed JSON: nested too deeply")
            if not isinstance(obj, (dict, DataError)):
                obj = DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            elif "\\u" in text and isinstance(obj, dict) and _ESCAPED_SURROGATE.search(text):
                obj = _lone_surrogate(obj, where) or obj
        at["offset"], at["line"], at["row"] = offset, lineno, row_id + 1
        yield Record(row_id, where, obj)
        row_id += 1


def read_delimited(path: Path, delimiter: str, start: dict | None = None, at: dict | None = None) -> Iterator[Record]:
    """CSV with standard quoting; TSV with quoting off (STS-B style: quotes are text)."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    start = start or {}
    at = {} if at is None else at
    bad_lines: dict[int, str] = {}
    where_now = {"line": 0, "offset": 0}

    def lines(offset: int = 0, lineno: int = 0, stop: int | None = None, align: bool = False):
        for n, text, end in _decoded_lines(path, offset, lineno, stop, align):
            where_now.update(line=n, offset=end)
            if text is None:
                bad_lines[n] = "not valid UTF-8"
                yield "\n"
            else:
                yield text.lstrip("\ufeff") if n == 1 else text  # a byte-order mark is not part of the header

    header_lines = lines()
    try:
        header = next(csv.reader(header_lines, delimiter=delimiter, quoting=quoting))
    except StopIteration:
        raise DataError(f"{path}: empty file (no header line)") from None
    except csv.Error as e:
        raise DataError(f"{path}:{where_now['line']}: unreadable header: {e}") from None
    header = [h.strip() for h in header]
    header_lines.close()
    if not any(header):
        raise DataError(f"{path}:{where_now['line']}: empty header line (expected the column names)")
    if start.get("offset"):  # a position (or a piece) past the header
        body = lines(start["offset"], start["line"], start.get("stop"), start.get("align", False))
    else:
        body = lines(where_now["offset"], where_now["line"], start.get("stop"))
    reader = csv.reader(body, delimiter=delimiter, quoting=quoting)
    row_id = start.get("row", 0)
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a quoted field that never closes, a NUL byte
            values = DataError(f"{path}:{where_now['line']}: malformed {'CSV' if delimiter == ',' else 'TSV'}: {e}")
        lineno = where_now["line"]
        where = f"{path}:{lineno}"
        if isinstance(values, DataError):
            rec = Record(row_id, where, values)
        elif lineno in bad_lines:
            rec = Record(row_id, where, DataError(f"{where}: {bad_lines.pop(lineno)}"))
        elif not values or values == [""]:
            continue
        elif len(values) != len(header):
            rec = Record(row_id, where, DataError(
                f"{where}: expected {len(header)} fields ({', '.join(header)}), found {len(values)}"))
        else:
            rec = Record(row_id, where, dict(zip(header, values)))
        at.update(offset=where_now["offset"], line=lineno, row=row_id + 1)
        yield rec
        row_id += 1


def read_parquet(path: Path, start: dict | None = None, at: dict | None = None,
                 cache: dict | None = None) -> Iterator[Record]:
    """Rows ``start["index"]`` .. ``start["stop"]`` of a parquet file from the row groups that hold
    them; ``cache`` keeps the opened file (a large footer, parsed once, not once per piece)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError(f"{path}: file not found")
    start = start or {}
    at = {} if at is None else at
    first = start.get("index", 0)  # rows of this file already read
    stop = start.get("stop")  # a piece: rows of this file before this index
    row_id = start.get("row", 0)
    try:
        opened = (cache or {}).get(path)
        if opened is None:  # the reader, and each row group's first row (the total at the end)
            pf = pq.ParquetFile(path)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            opened = (pf, [0, *itertools.accumulate(sizes)])
            if cache is not None:
                cache[path] = opened
        pf, offsets = opened
        group = bisect.bisect_right(offsets, first) - 1
        end = len(offsets) - 1 if stop is None else bisect.bisect_left(offsets, stop)
        groups = list(range(group, end)) if first < offsets[-1] else []
        skip = first - offsets[group] if groups else 0
        index = first
        for batch in (pf.iter_batches(batch_size=4096, row_groups=groups) if groups else ()):
            if skip >= batch.num_rows:  # batches can be shorter than asked: the skip spans them
                skip -= batch.num_rows
                continue
            for obj in batch.slice(skip).to_pylist():
                if stop is not None and index >= stop:
                    return
                index += 1
                at.update(index=index, row=row_id + 1)
                yield Record(row_id, f"{path}:row {index - 1}", obj)
                row_id += 1
            skip = 0
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable parquet file: {e}") from None


def open_hub(name: str, subset: str | None, split: str, streaming: bool):
    """A Hugging Face dataset (a hub id, a ``save_to_disk`` directory, a hub-style local repository)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: reading hub datasets needs the 'datasets' package "
                        f"(pip install 'dist_embed[hub]')") from None
    if saved_hf_dataset(name):
        ds = datasets.load_from_disk(name)  # a dataset saved with save_to_disk
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name}: no split {split!r} (it has {', '.join(ds)}); set data.split")
            ds = ds[split]
        return ds.to_iterable_dataset() if streaming else ds
    try:
        return datasets.load_dataset(name, subset, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{name}: cannot load the dataset (subset {subset!r}, split {split!r}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_hub(name: str, subset: str | None, split: str, streaming: bool, start: dict | None = None,
             at: dict | None = None, ds=None) -> Iterator[Record]:
    """A Hugging Face hub dataset (e.g. sentence-transformers/all-nli, subset triplet), from
    ``start["row"]`` to ``start["stop"]`` (a non-streaming one; default: its end); ``ds``: the
    dataset already opened."""
    ds = open_hub(name, subset, split, streaming) if ds is None else ds
    first, stop, at = (start or {}).get("row", 0), (start or {}).get("stop"), {} if at is None else at
    if not hasattr(ds, "__len__"):  # streaming (an IterableDataset): no length, no random access
        ds = ds.skip(first) if first else ds
    elif first or stop is not None:  # datasets refuses an empty range starting at the end: none left
        end = len(ds) if stop is None else min(stop, len(ds))
        ds = ds.select(range(first, end)) if first < end else []
    for row_id, obj in enumerate(ds, start=first):
        at.update(row=row_id + 1)
        yield Record(row_id, f"{name}[{split}] row {row_id}", obj)


class RecordCursor:
    """Records of a source from a position on; ``position`` reopens it right after the last one.

    Readers keep their position in a small dict updated before each record (no read-ahead), so
    the position is read only when someone asks (a checkpoint), not built per record."""

    def __init__(self, source: "Source", position: dict | None):
        self.source = source
        start = dict(position or {"file": 0, "row": 0})
        self._file = start.pop("file", 0)
        self._at = start  # the reader's live position inside file number self._file
        self._it = self._records(start)

    @property
    def position(self) -> dict:
        return {"file": self._file, **self._at}

    def __iter__(self):
        return self._it

    def __next__(self) -> Record:
        return next(self._it)

    def _records(self, start: dict) -> Iterator[Record]:
        src, fmt = self.source, self.source.format

        def below(rec: Record, limit=src.max_rows) -> bool:  # data.max_rows
            return limit is None or rec.row_id < limit

        if fmt == "hf":
            at = self._at = dict(start)
            yield from itertools.takewhile(below, read_hub(src.path, src.subset, src.split, src.streaming, start, at))
            return
        if fmt == "wds":
            urls, man = shard_urls(src.path)
            text_columns = man.get("text_columns") if man and src.token_ids and man.get("tokenizer") else None
            at = self._at = dict(start)
            yield from itertools.takewhile(below, read_shards(urls, text_columns, start, at,
                                                              man["shards"] if man else None))
            return
        files = data_files(src.path)
        read = {"jsonl": read_jsonl, "parquet": read_parquet,
                "csv": lambda p, s, a: read_delimited(p, ",", s, a),
                "tsv": lambda p, s, a: read_delimited(p, "\t", s, a)}.get(fmt)
        if read is None:
            raise DataError(f"{src.path}: unknown format {fmt!r}")
        while self._file < len(files):
            at = self._at = dict(start)
            for rec in read(files[self._file], start, at):
                if not below(rec):
                    return
                yield rec
            start = {"row": at.get("row", start.get("row", 0))}
            self._file += 1
            self._at = dict(start)


@dataclass(frozen=True)
class Source:
    """Where the rows come from: a file, a directory of files (shards, read in name order, one
    format), or a hub dataset. Re-iterable: each ``records()`` call streams from the start, or from
    a ``position`` that an earlier cursor reported."""

    path: str
    fmt: str = "auto"
    subset: str | None = None
    split: str = "train"
    streaming: bool = True
    max_rows: int | None = None
    token_ids: bool = False  # pre-tokenized shards: hand their token ids on (the tokenizer matches)

    @property
    def format(self) -> str:
        p = Path(self.path)
        if self.fmt == "auto" and p.is_dir():
            if (p / MANIFEST).is_file() or saved_hf_dataset(self.path):
                return detect_format(self.path)
            files = data_files(self.path)
            kinds = {detect_format(f.name) for f in files}
            if len(kinds) > 1:
                raise DataError(f"{self.path}: the directory mixes formats ({', '.join(sorted(kinds))}); "
                                "keep one format per directory")
            return kinds.pop()
        return detect_format(self.path, self.fmt)

    def records(self, position: dict | None = None) -> RecordCursor:
        return RecordCursor(self, position)

    def fingerprint(self) -> dict:
        """What identifies the data: each file's name, size and modification time, or the hub id.
        A resume compares it with the checkpoint's, so it never continues on other data by mistake."""
        if self.format == "hf":
            return {"hub": self.path, "subset": self.subset, "split": self.split, "max_rows": self.max_rows}
        if self.format == "wds":
            urls, man = shard_urls(self.path)
            return {"shards": urls, "sha256": [s.get("sha256") for s in man["shards"]] if man else None,
                    "max_rows": self.max_rows}
        files = data_files(self.path)
        return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
                "format": self.format, "max_rows": self.max_rows}


