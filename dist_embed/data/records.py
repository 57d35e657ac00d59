"""What every reader yields, and the error bad input raises (shared by readers.py and shards.py)."""
from __future__ import annotations

from typing import Any, NamedTuple


class DataError(ValueError):
    """A bad input row or file, with its location in the message."""


class Record(NamedTuple):
    row_id: int
    where: str
    fields: Any  # dict from the source, or a DataError for a row that could not be parsed
    ids: dict | None = None  # pre-tokenized shards: token ids per text column
