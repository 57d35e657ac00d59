"""What a data set offers to mining: its anchors, its candidate texts (the corpus) and its rows.

Read once per run on every rank (the anchor and positive columns of every row, without prompts:
memory about the texts' size once), so that any rank can turn a candidate's id into its text and
any world size sees the same ids: texts in order of first appearance (positives in row order,
then the extra corpus file), each once.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace

import numpy as np

from ..data.readers import DataError, Source

log = logging.getLogger(__name__)


def read_corpus(path: str) -> list[str]:
    """Texts of a corpus file: its ``text`` column (``title`` in front when present), else its only
    text column."""
    out = []
    for rec in Source(path, streaming=False).records():
        if isinstance(rec.fields, DataError):
            raise rec.fields
        obj = rec.fields
        if "text" in obj:
            text = str(obj["text"] or "")
            text = f"{obj['title']} {text}" if obj.get("title") else text
        else:
            strings = [v for v in obj.values() if isinstance(v, str)]
            if len(strings) != 1:
                raise DataError(f"{rec.where}: a corpus row needs a 'text' column (or exactly one text column); "
                                f"it has {', '.join(map(repr, obj)) or 'none'}")
            text = strings[0]
        if text.strip():
            out.append(text)
    return out


def _csr(groups: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` grouped by ``groups`` (0..n-1): (start [n + 1], values in group order)."""
    order = np.argsort(groups, kind="stable")
    start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(groups, minlength=n), out=start[1:])
    return start, values[order]


@dataclass
class Index:
    """One data set's texts for mining (ids are positions in ``anchors`` / ``corpus``)."""

    name: str
    anchors: list[str]
    corpus: list[str]
    row_ids: np.ndarray  # int64 [R]: the data set's row ids (what the planners' rows carry)
    row_anchor: np.ndarray  # int64 [R]
    row_positive: np.ndarray  # int64 [R]: corpus id of the row's positive
    anchor_rows: tuple[np.ndarray, np.ndarray]  # rows grouped by anchor (start [A + 1], row positions)
    excluded: tuple[np.ndarray, np.ndarray]  # per anchor, corpus ids never negatives: its positives, itself
    has_negatives: bool  # the data has negative columns of its own
    fingerprint: str  # of the texts and rows: a refresh's ids are valid for this index only

    @staticmethod
    def build(name: str, rows, extra: list[str] = ()) -> "Index":
        """From ``(row_id, texts)`` rows (anchor, positive first) and more candidate texts."""
        anchors: dict[str, int] = {}
        corpus: dict[str, int] = {}
        ids, a_of, p_of, negatives = [], [], [], False
        for row in rows:
            a, p = row.texts[0], row.texts[1]
            negatives |= len(row.texts) > 2
            ids.append(row.row_id)
            a_of.append(anchors.setdefault(a, len(anchors)))
            p_of.append(corpus.setdefault(p, len(corpus)))
        if not ids:
            raise DataError(f"{name}: no rows to mine negatives for")
        for t in extra:
            corpus.setdefault(t, len(corpus))
        h = hashlib.sha256()
        for t in corpus:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
        for t in anchors:
            h.update(t.encode("utf-8", "surrogatepass") + b"\1")
        row_ids, row_anchor, row_positive = (np.array(x, dtype=np.int64) for x in (ids, a_of, p_of))
        h.update(row_ids.tobytes() + row_anchor.tobytes() + row_positive.tobytes())
        n_anchors = len(anchors)
        self_ids = np.array([corpus.get(t, -1) for t in anchors], dtype=np.int64)
        own = np.nonzero(self_ids >= 0)[0]
        groups = np.concatenate([row_anchor, own])
        values = np.concatenate([row_positive, self_ids[own]])
        pairs = np.unique(np.stack([groups, values], 1), axis=0) if len(groups) else np.zeros((0, 2), np.int64)
        excluded = _csr(pairs[:, 0], pairs[:, 1], n_anchors)
        anchor_rows = _csr(row_anchor, np.arange(len(ids), dtype=np.int64), n_anchors)
        return Index(name, list(anchors), list(corpus), row_ids, row_anchor, row_positive, anchor_rows, excluded,
                     negatives, h.hexdigest())

    @staticmethod
    def read(name: str, spec, extra: list[str] = ()) -> "Index":
        """From a data set's plan spec: its rows read (and validated) once, without prompts."""
        return Index.build(name, iter(replace(spec, prompts=()).rows()), extra)

    @property
    def most_excluded(self) -> int:
        start = self.excluded[0]
        return int(np.diff(start).max()) if len(start) > 1 else 0

    def rows_of(self, anchor_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row positions, position of each row's anchor in ``anchor_ids``) for these anchors' rows."""
        start, members = self.anchor_rows
        counts = start[anchor_ids + 1] - start[anchor_ids]
        first = np.repeat(start[anchor_ids] - (np.cumsum(counts) - counts), counts)
        return members[first + np.arange(int(counts.sum()))], np.repeat(np.arange(len(anchor_ids)), counts)

    def excluded_of(self, anchor_ids: np.ndarray) -> np.ndarray:
        """[n, e] corpus ids never negatives for each anchor (-1 pads)."""
        start, ids = self.excluded
        counts = start[anchor_ids + 1] - start[anchor_ids]
        out = np.full((len(anchor_ids), int(counts.max()) if len(counts) else 0), -1, dtype=np.int64)
        rows = np.repeat(np.arange(len(anchor_ids)), counts)
        cols = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        out[rows, cols] = ids[np.repeat(start[anchor_ids], counts) + cols]
        return out
