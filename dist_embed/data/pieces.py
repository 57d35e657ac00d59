"""Pieces: what a data set is cut into so that each rank reads only its share (the sharded plane).

A piece is read on its own, without its neighbours:

- ``bytes``: a byte range of an uncompressed jsonl / csv / tsv file; it holds the lines that start
  in it (a reader seeks to its start and skips to the next line; csv assumes no newline inside a
  quoted field: such a file fails its scan with the line named, and ``prepare-data`` reads it whole);
- ``group``: a row group of a parquet file;
- ``block``: a block of a local prepared shard, found by its tar headers (the reader seeks, it
  never reads what lies between); a remote shard is one ``shard`` piece, streamed;
- ``index``: a range of rows of a Hugging Face dataset in local Arrow files (``streaming: false``,
  or saved with ``save_to_disk``; memory-mapped: a rank reads just its rows); a dataset streamed
  from the hub is read by the global plane;
- ``stream``: a range of records of a file that cannot be cut (gzip): a rank reads the file once
  per epoch from its start (decompressing and splitting every line) and parses and validates only
  the records of its pieces: a gzip file costs every rank that has pieces in it a full read.

Each piece knows the id of its first row and how many records it holds once counted (a manifest,
parquet's metadata, or the start-up scan, which is itself split by piece across the ranks), so row
ids are the global plane's: a record's 0-based position in its data set.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator


from .readers import (DataError, data_files, open_hub, read_delimited, read_hub, read_jsonl, read_parquet,
                      saved_hf_dataset)
from .rows import Row, SkipCounter, check_scan, first_keys, resolve_columns, validate_rows, with_prompts
from .shards import MANIFEST, _is_local, block_rows, local_block, shard_blocks, shard_urls

MIN_PIECE_BYTES = 16 << 10
MAX_PIECE_BYTES = 8 << 20
MIN_PIECE_ROWS, MAX_PIECE_ROWS = 128, 65_536  # index pieces of a Hugging Face dataset


def indexable_hub(source) -> bool:
    """A Hugging Face dataset whose rows can be read by index: downloaded (not streamed) or saved."""
    return source.format == "hf" and (not source.streaming or saved_hf_dataset(source.path))


@dataclass(frozen=True)
class Piece:
    file: int  # which file (or shard) of the data set
    kind: str  # "bytes" | "group" | "block" | "shard" | "index" | "stream"
    start: int  # byte offset, first row within the file (group, stream), block number
    stop: int  # exclusive
    first_row: int = -1  # the data set's row id of its first record (-1: not counted yet)
    rows: int = -1  # records in it (-1: not counted yet)
    first_line: int = 0  # "bytes": the file's line number before its first line (messages)

    def to_json(self) -> list:
        return [self.file, self.kind, self.start, self.stop, self.first_row, self.rows, self.first_line]

    @staticmethod
    def from_json(obj) -> "Piece":
        return Piece(*obj)


class PieceSource:
    """One data set (a ``PlanSpec``) as pieces: cutting it, counting a piece, and its rows."""

    def __init__(self, spec):
        self.spec, src = spec, spec.source
        self.format = src.format
        self.manifest = None
        if self.format == "wds":
            self.urls, self.manifest = shard_urls(src.path)
            if self.manifest is None:
                raise DataError(f"{src.path}: the sharded data plane reads prepared shards with their "
                                f"{MANIFEST} (dist-embed prepare-data), or set data.plane=global")
        elif self.format in ("jsonl", "csv", "tsv", "parquet"):
            self.files = data_files(src.path)
        elif indexable_hub(src):
            self.files, self._hub = [], None
        else:
            raise DataError(f"{src.path}: {self.format} data is read by the global plane (data.plane=global)")
        self._keys = None
        self._index: dict[str, list] = {}  # a shard's blocks by their tar headers (shards without spans)
        self._streams: dict[int, list] = {}  # a gzip file's reader: [records, next index, at]
        self._parquet: dict = {}  # parquet files opened once (read_parquet's cache)

    def __getstate__(self) -> dict:  # for a reader process (sharded.ReadAhead): no open readers
        return {**self.__dict__, "_streams": {}, "_hub": None, "_parquet": {}}

    # -- cutting ------------------------------------------------------------------------------------

    def cut(self, world: int) -> list[Piece]:
        """The pieces in file order, counted where their counts are known without reading rows."""
        if self.manifest is not None:
            man, pieces, row = self.manifest, [], 0
            for k, entry in enumerate(man["shards"]):
                if not _is_local(self.urls[k]):
                    pieces.append(Piece(k, "shard", 0, entry["blocks"], row, entry["rows"]))
                    row += entry["rows"]
                    continue
                for b in range(entry["blocks"]):
                    n = min(man["block_rows"], entry["rows"] - b * man["block_rows"])
                    pieces.append(Piece(k, "block", b, b + 1, row, n))
                    row += n
            return pieces
        if self.format == "hf":
            n = len(self.hub())
            size = max(MIN_PIECE_ROWS, min(MAX_PIECE_ROWS, n // max(8 * world, 1)))
            return [Piece(0, "index", a, min(a + size, n)) for a in range(0, n, size)] or [Piece(0, "index", 0, 0)]
        if self.format == "parquet":
            pieces = []
            for k in range(len(self.files)):
                offsets = self._parquet_file(k)[1]
                pieces += [Piece(k, "group", a, b) for a, b in zip(offsets, offsets[1:])]
            return pieces
        pieces = []
        total = sum(f.stat().st_size for f in self.files)
        size = max(MIN_PIECE_BYTES, min(MAX_PIECE_BYTES, total // max(8 * world, 1)))
        for k, f in enumerate(self.files):
            if f.suffix == ".gz":  # cut by records once they are counted (see ``stream_pieces``)
                pieces.append(Piece(k, "stream", 0, -1))
                continue
            n = f.stat().st_size
            pieces += [Piece(k, "bytes", a, min(a + size, n)) for a in range(0, n, size)] or [Piece(k, "bytes", 0, 0)]
        return pieces

    def splits_for(self, world: int, per_rank: int = 4) -> bool:
        """Whether the data cuts into at least ``per_rank`` pieces per rank (``data.plane: auto``'s
        test): fewer would give the ranks visibly unequal shares and long ragged epoch tails, and
        data that small is planned fast enough by the global plane. A gzip file counts by size."""
        n = 0
        for p in self.cut(world):
            n += max(1, self.files[p.file].stat().st_size // MIN_PIECE_BYTES) if p.kind == "stream" else 1
        return n >= per_rank * world

    # -- counting (the start-up scan, one piece at a time) -------------------------------------------

    def count(self, piece: Piece) -> dict:
        """Records, lines, valid rows and skipped ones (per reason) of a piece, and its first bad
        row's message (line numbers within the piece: ``merge_counts`` makes them the file's)."""
        if piece.kind in ("block", "shard"):
            return {"records": piece.rows, "lines": 0, "valid": piece.rows, "skips": {}, "error": None}
        spec, at = self.spec, {}
        skips, error, records, valid = _FirstSkip(), None, 0, 0

        def counted(it):
            nonlocal records
            for rec in it:
                records += 1
                yield rec
        try:
            for _ in validate_rows(counted(self._records(piece, None, at)), spec.schema, dict(spec.columns), "skip",
                                   skips, keys=self.keys()):
                valid += 1
        except DataError as e:  # a file that cannot be read on (truncated gzip, unreadable parquet)
            error = str(e)
        return {"records": records, "lines": at.get("line", piece.first_line) - piece.first_line, "valid": valid,
                "error": error or (skips.earliest if spec.on_error == "raise" else None),
                "skips": {r: [n, skips.first[r]] for r, n in skips.by_reason.items()}}

    def width(self) -> int:
        """Text columns of every row (the loss's, and the optional extra ones the data has)."""
        spec = self.spec
        available = self.manifest["columns"] if self.manifest is not None else (self.keys() or [])
        text_cols, extra_cols, _ = resolve_columns(spec.schema, dict(spec.columns), available, spec.source.path)
        return len(text_cols) + len(extra_cols)

    def keys(self) -> list[str] | None:
        """The columns of the data set's first readable record (every piece resolves them alike);
        a parquet file's are its schema's."""
        if self._keys is None and self.manifest is None:
            self._keys = (list(self._parquet_file(0)[0].schema_arrow.names) if self.format == "parquet"
                          else first_keys(self.spec.source))
        return self._keys

    def _parquet_file(self, k: int) -> tuple:
        """File ``k``'s parquet reader and row-group offsets, opened once (read_parquet's cache;
        reading no rows opens it, with its errors as DataError)."""
        if self.files[k] not in self._parquet:
            for _ in read_parquet(self.files[k], {"stop": 0}, cache=self._parquet):
                pass
        return self._parquet[self.files[k]]

    # -- reading --------------------------------------------------------------------------------------

    def rows(self, piece: Piece, position: dict | None, at: dict) -> Iterator[Row]:
        """The valid rows of a piece from its start, or from ``position`` (an earlier ``at``);
        ``at`` is kept right after the last row (bad rows are skipped: the scan counted them)."""
        spec = self.spec
        limit = spec.source.max_rows
        if piece.kind in ("block", "shard"):
            rows = self._block_rows(piece, position or {}, at)
        else:
            rows = validate_rows(self._records(piece, position, at), spec.schema, dict(spec.columns), "skip",
                                 keys=self.keys())
        if spec.prompts:
            rows = with_prompts(rows, spec.schema, dict(spec.prompts))
        for row in rows:
            if limit is not None and row.row_id >= limit:
                return
            yield row

    def _records(self, piece: Piece, position: dict | None, at: dict):
        if piece.kind == "index":
            src = self.spec.source
            start = {"row": (position or {}).get("row", piece.start), "stop": piece.stop}
            return read_hub(src.path, src.subset, src.split, False, start, at, ds=self.hub())
        path = self.files[piece.file]
        row = max(piece.first_row, 0)
        if piece.kind == "bytes":
            start = dict(position) if position else {"offset": piece.start, "line": piece.first_line, "row": row,
                                                     "align": True}
            start["stop"] = piece.stop
            if self.format == "jsonl":
                return read_jsonl(path, start, at)
            if not position and piece.start == 0:
                start = {"row": row, "stop": piece.stop}  # the header, then the first piece's lines
            return read_delimited(path, "," if self.format == "csv" else "\t", start, at)
        if piece.kind == "group":
            start = dict(position) if position else {"index": piece.start, "row": row}
            start["stop"] = piece.stop
            return read_parquet(path, start, at, cache=self._parquet)
        if piece.kind == "stream":
            return self._stream(piece, position, at)
        raise ValueError(f"no reader for a {piece.kind} piece")

    def hub(self):
        """The Hugging Face dataset, opened once (memory-mapped Arrow: opening is cheap, rows are
        read where a piece asks)."""
        if self._hub is None:
            src = self.spec.source
            self._hub = open_hub(src.path, src.subset, src.split, False)
        return self._hub

    def _stream(self, piece: Piece, position: dict | None, at: dict):
        """Records ``start`` .. ``stop`` of a file read front to back, its reader kept for the next
        piece of the same file (a rank takes its stream pieces in file order)."""
        begin = piece.start + (position or {}).get("done", 0)
        state = self._streams.get(piece.file)
        if state is None or state[1] > begin:
            reader_at: dict = {}
            state = [read_jsonl(self.files[piece.file], {"row": max(piece.first_row - piece.start, 0)}, reader_at)
                     if self.format == "jsonl" else
                     read_delimited(self.files[piece.file], "," if self.format == "csv" else "\t",
                                    {"row": max(piece.first_row - piece.start, 0)}, reader_at), 0]
            self._streams[piece.file] = state
        at["done"] = begin - piece.start
        while state[1] < piece.stop if piece.stop >= 0 else True:
            rec = next(state[0], None)
            if rec is None:
                return
            state[1] += 1
            if state[1] <= begin:
                continue
            at["done"] = state[1] - piece.start
            yield rec

    def _block_rows(self, piece: Piece, position: dict, at: dict) -> Iterator[Row]:
        spec, man = self.spec, self.manifest
        text_cols, extra_cols, score_col = resolve_columns(spec.schema, dict(spec.columns), man["columns"],
                                                            spec.source.path)
        cols = text_cols + extra_cols
        id_columns = man.get("text_columns") if spec.source.token_ids and man.get("tokenizer") else None
        first = position.get("index", 0)
        row_id = piece.first_row + first
        for names, rows, cuts in self._blocks(piece, id_columns):
            picks = [names.index(c) for c in cols]
            score = names.index(score_col) if score_col is not None else None
            id_cuts = [cuts[c] for c in cols] if cuts and all(c in cuts for c in cols) else None
            for i in range(first, len(rows)):
                r = rows[i]
                at["index"] = i + 1
                yield Row(row_id, tuple([r[x] for x in picks]), float(r[score]) if score is not None else None,
                          tuple([cut(i) for cut in id_cuts]) if id_cuts else None)
                row_id += 1
            first = 0

    def _blocks(self, piece: Piece, id_columns):
        url, entry = self.urls[piece.file], self.manifest["shards"][piece.file]
        if piece.kind == "shard":  # streamed whole (remote), sha256-checked as it goes
            for _url, _key, names, rows, cuts, _first in shard_blocks([url], {}, {}, id_columns, [entry]):
                yield names, rows, cuts
            return
        yield block_rows(local_block(url, entry, piece.start, self._index), f"{url}: block {piece.start}", id_columns)


class _FirstSkip(SkipCounter):
    """A skip counter that also keeps the earliest bad row's message."""

    earliest: str | None = None

    def add(self, reason: str, message: str) -> None:
        if self.earliest is None:
            self.earliest = message
        super().add(reason, message)


# ---------------------------------------------------------------------------------------------
# the start-up scan, split by piece: each rank counts its pieces, the counts are merged


LINE = re.compile(r"^(.*?):(\d+): (.*)$", re.S)


def merge_counts(source: PieceSource, pieces: list[Piece], counts: list[dict], world: int,
                 max_skip_fraction: float) -> tuple[list[Piece], int, SkipCounter]:
    """Pieces with their row ids and first lines, and the data set's valid rows, from every
    piece's count; a bad row (``on_error: raise``) or too many skipped ones: a DataError naming
    the file and its line."""
    spec = source.spec
    out, valid_of, row, lines_before, file = [], [], 0, 0, None
    skips = SkipCounter()
    records = valid = 0
    for p, c in zip(pieces, counts):
        if p.file != file:
            file, lines_before = p.file, 0
        if p.kind == "stream":  # a gzip file: cut into record ranges, dealt like any pieces
            n = c["records"]
            step = max(1, -(-n // max(8 * world, 1)))
            parts = [Piece(p.file, "stream", a, min(a + step, n), row + a, min(step, n - a)) for a in range(0, n, step)]
            out += parts
            valid_of += [None] * len(parts)
        else:
            out.append(Piece(p.file, p.kind, p.start, p.stop, row, c["records"], lines_before))  # (replace() is slow)
            valid_of.append(c["valid"])
        if c["error"] and spec.on_error == "raise":
            raise DataError(_global_line(c["error"], lines_before))
        for reason, (n, first) in c["skips"].items():
            skips.total += n
            skips.by_reason[reason] += n
            skips.first.setdefault(reason, _global_line(first, lines_before))
        row += c["records"]
        records += c["records"]
        valid += c["valid"]
        lines_before += c["lines"]
    check_scan(spec.source.path, valid, records, skips, max_skip_fraction)
    limit = spec.source.max_rows
    if limit and row > limit:  # the pieces below the limit; where a count is not known, the rows counted
        out, valid = [p for p in out if p.first_row < limit], 0
        for p, v in zip(out, valid_of):
            whole = p.first_row + p.rows <= limit
            valid += v if whole and v is not None else sum(1 for _ in source.rows(p, None, {}))
    return out, valid, skips


def _global_line(message: str, lines_before: int) -> str:
    m = LINE.match(message)
    return f"{m.group(1)}:{int(m.group(2)) + lines_before}: {m.group(3)}" if m else message


def scan_counts(source: PieceSource, pieces: list[Piece], rank: int, world: int, gather) -> list[dict]:
    """Every piece's count: this rank counts pieces rank, rank + world, ...; ``gather`` (an
    all-gather of Python objects) brings every rank's."""
    mine = {i: source.count(p) for i, p in enumerate(pieces) if i % world == rank}
    merged: dict[int, dict] = {}
    for part in gather(mine):
        merged.update(part)
    return [merged[i] for i in range(len(pieces))]

