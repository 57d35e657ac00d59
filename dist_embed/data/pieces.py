"""Pieces: what a data set is cut into so that each rank reads only its share (the sharded plane).

A piece is read on its own, without its neighbours:

- ``bytes``: a byte range of an uncompressed jsonl / csv / tsv file; it holds the lines that start
  in it (a reader seeks to its start and skips to the next line; csv assumes no newline inside a
  quoted field);
- ``rows``: a range of rows of a parquet file (a row group) or of prepared shards (whole blocks,
  found by their tar headers without reading what lies between);
- ``stride``: a source that cannot be cut (a gzip stream, a hub dataset, remote shards): every rank
  reads the whole stream and keeps the records whose index falls to it. Reading costs every rank
  the whole stream (decompressing, splitting lines); parsing and validating only its share.

Each piece knows the id of its first row and how many records it holds once the start-up scan has
counted them (``first_row``, ``rows``; the scan is itself split by piece across the ranks), so row
ids are the same as the global plane's: a record's 0-based position in its data set.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from .records import DataError, Record

MIN_PIECE_BYTES = 16 << 10
MAX_PIECE_BYTES = 8 << 20


@dataclass(frozen=True)
class Piece:
    file: int  # which file (or shard) of the data set
    kind: str  # "bytes" | "rows" | "stride"
    start: int  # byte offset ("bytes"), first row within the file ("rows"); unused for "stride"
    stop: int  # exclusive
    first_row: int = -1  # the data set's row id of its first record (-1: not counted yet)
    rows: int = -1  # records in it (-1: not counted yet)
    first_line: int = 0  # "bytes": the file's line number before its first line (for messages)

    def to_json(self) -> list:
        return [self.file, self.kind, self.start, self.stop, self.first_row, self.rows, self.first_line]

    @staticmethod
    def from_json(obj) -> "Piece":
        return Piece(*obj)


def splittable(fmt: str, files: list[Path]) -> bool:
    """Whether every file of a source can be cut into pieces (else: read as a stride)."""
    if fmt in ("jsonl", "csv", "tsv"):
        return all(f.suffix != ".gz" for f in files)
    return fmt in ("parquet", "wds")


def cut_files(fmt: str, files: list[Path], world: int) -> list[Piece]:
    """The pieces of local files, in file order: byte ranges about size / (8 x world) (at least
    16 KiB, at most 8 MiB: enough pieces that every rank gets several), parquet row groups."""
    pieces = []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for k, f in enumerate(files):
            meta = pq.ParquetFile(f).metadata
            first = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                pieces.append(Piece(k, "rows", first, first + n, rows=n))
                first += n
        return pieces
    total = sum(f.stat().st_size for f in files)
    size = max(MIN_PIECE_BYTES, min(MAX_PIECE_BYTES, total // max(8 * world, 1)))
    for k, f in enumerate(files):
        n = f.stat().st_size
        pieces += [Piece(k, "bytes", a, min(a + size, n)) for a in range(0, n, size)]
    return pieces


def stride_pieces(n_files: int) -> list[Piece]:
    return [Piece(k, "stride", 0, 0) for k in range(n_files)]


def read_piece(fmt: str, path: Path, piece: Piece, position: dict | None = None, at: dict | None = None) -> Iterator[Record]:
    """The records of a piece, from its start or a ``position`` inside it (from ``at`` of an
    earlier read, which is kept right after the last record)."""
    from .readers import read_delimited, read_jsonl, read_parquet

    at = {} if at is None else at
    row = piece.first_row if piece.first_row >= 0 else 0
    if piece.kind == "bytes":
        start = dict(position) if position else {"offset": piece.start, "line": piece.first_line, "row": row,
                                                 "align": True}
        start["stop"] = piece.stop
        if fmt == "jsonl":
            yield from read_jsonl(path, start, at)
        else:
            if not position and piece.start == 0:
                start = {"row": row, "stop": piece.stop}  # the header, then the first piece's lines
            yield from read_delimited(path, "," if fmt == "csv" else "\t", start, at)
        return
    if piece.kind == "rows" and fmt == "parquet":
        start = dict(position) if position else {"index": piece.start, "row": row}
        start["stop"] = piece.stop
        yield from read_parquet(path, start, at)
        return
    raise ValueError(f"no reader for a {piece.kind} piece of {fmt}")


# ---------------------------------------------------------------------------------------------
# prepared shards: blocks found by their tar headers


def shard_index(path: Path) -> list[tuple[int, int, dict[str, tuple[int, int]]]]:
    """(rows, first row, {member suffix: (data offset, size)}) of each block of a local shard, from
    the tar headers alone (the reader seeks over the members' data)."""
    blocks: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf.getmembers():
                key, _, suffix = m.name.partition(".")
                if key not in blocks:
                    blocks[key] = {}
                    order.append(key)
                blocks[key][suffix] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: unreadable shard (truncated or not a tar): {e}") from None
    return [(0, 0, blocks[k]) for k in order]


def read_block(path: Path, members: dict[str, tuple[int, int]]) -> dict:
    """One block's members (``rows.json``, and ``ids.npy``/``lens.npy`` when pre-tokenized)."""
    out = {}
    with open(path, "rb") as f:
        for suffix, (offset, size) in members.items():
            f.seek(offset)
            out[suffix] = f.read(size)
    return out


def block_rows(sample: dict, where: str) -> tuple[list, list]:
    try:
        block = json.loads(sample["rows.json"])
        return block["columns"], block["rows"]
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{where}: not a dist_embed row block ({type(e).__name__}: {e})") from None


def with_counts(pieces: list[Piece], records: list[int], lines: list[int] | None = None) -> list[Piece]:
    """Pieces with their first row id (and first line) filled from every piece's record counts."""
    out, row, line, file = [], 0, 0, None
    for i, p in enumerate(pieces):
        if p.file != file:
            file, line = p.file, 0
        out.append(replace(p, first_row=row, rows=records[i], first_line=line))
        row += records[i]
        line += lines[i] if lines else 0
    return out


def npy(data: bytes):
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)
