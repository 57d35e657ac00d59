"""How a micro-batch's texts meet the encoder, worked out in the collate: in the loader's worker
processes, as numpy, so that the training step only copies arrays to the device and never reads a
value back to decide a shape.

- ``Unpadded``: every real token of every text (all columns), text after text, and where each text
  starts (``cu_seqlens``): one variable-length attention over them, no padding anywhere, the linear
  layers see only real tokens. What GPUs run (flash attention's varlen kernel).
- ``Packed``: the texts side by side in rows (best-fit decreasing), each with its own positions and
  attending only to itself (a block-diagonal mask built on the device from ``segment``): nearly no
  padding for the linear layers, and what is fastest on CPU.
- no layout: each column padded to its longest text (``Batch.features``), the step may then encode
  length-sorted chunks.

Each text's embedding is the one it gets alone in every layout (tests pin that).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LayoutSpec:
    kind: str  # "unpadded" | "packed" | "padded"
    pad_id: int = 0
    position_offset: int = 0  # the position id of a text's first token (families.position_offset)
    row_len: int | str = "auto"  # packed: tokens per row ("auto": the batch's longest text)
    bucket: int = 0  # unpadded: total tokens rounded up to a multiple of this with filler texts (0: exact)
    max_filler: int = 128  # unpadded: the longest filler text (within the model's positions)


@dataclass
class Unpadded:
    input_ids: object  # [T] int64: every real token, text after text, then filler tokens (bucket)
    position_ids: object  # [T] int64
    cu_seqlens: object  # [S + 1] int32: where each sequence starts (the texts, then filler texts)
    max_seqlen: int  # the longest sequence (flash attention's bound)
    counts: object  # [N] int64: tokens of each text (the real tokens are the first sum(counts) of T)
    lengths: tuple  # the same counts on the host: sub-batches (cached MNRL) cut without a device read
    column_sizes: tuple  # texts per column, in order


@dataclass
class Packed:
    input_ids: object  # [rows, width] int64
    position_ids: object  # [rows, width] int64
    segment: object  # [rows, width] int64: the text each cell holds, -1 for padding
    slot: object  # [R] int64: where each real token sits in the flattened rows, text after text
    counts: object  # [N] int64
    lengths: tuple
    column_sizes: tuple


def flatten(features: list[dict]) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(every real token text after text, tokens of each text, texts per column) from padded
    columns (left or right padding alike: the mask picks each text's tokens in order)."""
    ids, lengths = [], []
    for f in features:
        mask = np.asarray(f["attention_mask"]).astype(bool)
        ids.append(np.asarray(f["input_ids"])[mask])
        lengths.append(mask.sum(1))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), ()
    return (np.concatenate(ids).astype(np.int64), np.concatenate(lengths).astype(np.int64),
            tuple(int(np.asarray(f["attention_mask"]).shape[0]) for f in features))


def build(features: list[dict], spec: LayoutSpec) -> Unpadded | Packed | None:
    """The layout ``spec`` asks for, from a batch's padded columns (None: stay padded)."""
    if spec.kind == "padded" or not features:
        return None
    tokens, lengths, sizes = flatten(features)
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    first = np.cumsum(lengths) - lengths
    within = np.arange(len(tokens), dtype=np.int64) - first[owner]  # each token's place in its text
    if spec.kind == "unpadded":
        return _unpadded(tokens, lengths, within, sizes, spec)
    return _packed(tokens, lengths, owner, within, sizes, spec)


def _unpadded(tokens, lengths, within, sizes, spec: LayoutSpec) -> Unpadded:
    seq = [int(n) for n in lengths]
    total = len(tokens)
    fill = (-total) % spec.bucket if spec.bucket else 0
    whole, rest = divmod(fill, spec.max_filler)
    fillers = [spec.max_filler] * whole + ([rest] if rest else [])
    filler_pos = np.concatenate([np.arange(n, dtype=np.int64) for n in fillers]) if fillers else np.zeros(0, np.int64)
    cu = np.zeros(len(seq) + len(fillers) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(seq + fillers)
    longest = max(seq + fillers, default=1)
    if spec.bucket:  # an upper bound is all the kernel needs: a power of two keeps compiled shapes few
        longest = 1 << (longest - 1).bit_length()
    return Unpadded(input_ids=np.concatenate([tokens, np.full(fill, spec.pad_id, np.int64)]),
                    position_ids=np.concatenate([within, filler_pos]) + spec.position_offset,
                    cu_seqlens=cu, max_seqlen=longest,
                    counts=lengths.astype(np.int64), lengths=tuple(seq), column_sizes=sizes)


def _packed(tokens, lengths, owner, within, sizes, spec: LayoutSpec) -> Packed:
    seq = [int(n) for n in lengths]
    width = max(seq) if spec.row_len == "auto" else max(int(spec.row_len), max(seq))
    rows = pack_rows(seq, width)
    start = np.zeros(len(seq), dtype=np.int64)  # where each text begins in the flattened rows
    for r, members in enumerate(rows):
        offset = r * width
        for i in members:
            start[i] = offset
            offset += seq[i]
    slot = start[owner] + within
    cells = len(rows) * width
    input_ids = np.full(cells, spec.pad_id, dtype=np.int64)
    input_ids[slot] = tokens
    positions = np.zeros(cells, dtype=np.int64)
    positions[slot] = within
    segment = np.full(cells, -1, dtype=np.int64)
    segment[slot] = owner
    shape = (len(rows), width)
    return Packed(input_ids=input_ids.reshape(shape), position_ids=(positions + spec.position_offset).reshape(shape),
                  segment=segment.reshape(shape), slot=slot, counts=lengths.astype(np.int64),
                  lengths=tuple(seq), column_sizes=sizes)


def pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """Best-fit decreasing: text indices per row, each row holding at most ``row_len`` tokens.

    Longest texts first, each into the row it leaves the least room in (rows are kept in buckets
    by free room, so a text scans at most ``row_len`` buckets, not every row)."""
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(row_len + 1)]  # free room -> row numbers
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > row_len:
            raise ValueError(f"a text of {n} tokens does not fit rows of {row_len}")
        room = next((f for f in range(n, row_len + 1) if by_room[f]), None)
        if room is None:
            rows.append([])
            r, room = len(rows) - 1, row_len
        else:
            r = by_room[room].pop()
        rows[r].append(i)
        by_room[room - n].append(r)
    return rows


def sub_unpadded(layout: Unpadded, first: int, last: int) -> Unpadded:
    """Texts ``first`` .. ``last - 1`` of an unpadded layout (contiguous: their tokens are one range):
    a cached-MNRL mini-batch, cut with host numbers only (device tensors are sliced, never read)."""
    lens = layout.lengths
    a, b = sum(lens[:first]), sum(lens[:last])
    cu = layout.cu_seqlens[first:last + 1] - layout.cu_seqlens[first]
    return Unpadded(input_ids=layout.input_ids[a:b], position_ids=layout.position_ids[a:b], cu_seqlens=cu,
                    max_seqlen=max(lens[first:last], default=1), counts=layout.counts[first:last],
                    lengths=tuple(lens[first:last]), column_sizes=(last - first,))
