"""``dist-embed prepare-data``: jsonl/csv/tsv/parquet/HF sources -> webdataset shards + manifest.

Validation happens here, once: every record must be an object with the same columns as the first
one, each column keeping one type (text: a non-empty string; number: a finite int/float). Bad rows
stop the job with ``file:line: ...`` (exit 2), or are skipped and counted with ``--on-error skip``.
Optionally every text is tokenized for one tokenizer, so training workers only pad.

The output depends only on the rows and the options (member headers carry no time or owner), so
it is reproducible, and an interrupted job continues where it stopped: after each shard a
``.prepare-state.json`` records the shards written and the readers' positions; a rerun with the
same sources and options checks those shards' sha256 and goes on from there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np

from ..data.readers import DataError, Source, detect_format
from ..data.rows import SkipCounter, _reason
from ..data.shards import FORMAT, MANIFEST, VERSION, file_sha256, write_shard
from ..data.tokenization import tokenizer_fingerprint

log = logging.getLogger("dist_embed.prepare")
STATE = ".prepare-state.json"


def _value_type(value) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return None


class _Validator:
    """Checks records against the first record's columns and types."""

    def __init__(self, columns: list[str] | None = None, types: dict | None = None):
        self.columns, self.types = columns, types

    def check(self, rec) -> list:
        obj = rec.fields
        if isinstance(obj, DataError):
            raise obj
        if self.columns is None:
            self.columns = list(obj.keys())
            self.types = {}
            for col in self.columns:
                kind = _value_type(obj[col])
                if kind is None:
                    raise DataError(f"{rec.where}: column {col!r}: expected text or a number, got "
                                    f"{'null' if obj[col] is None else type(obj[col]).__name__}")
                self.types[col] = kind
        if list(obj.keys()) != self.columns and set(obj.keys()) != set(self.columns):
            missing = [c for c in self.columns if c not in obj]
            extra = [c for c in obj if c not in self.columns]
            raise DataError(f"{rec.where}: " + (f"missing column {missing[0]!r}" if missing else
                                                f"unexpected column {extra[0]!r}") +
                            f" (the first row has {', '.join(map(repr, self.columns))})")
        values = []
        for col in self.columns:
            value, kind = obj[col], self.types[col]
            if value is None:
                raise DataError(f"{rec.where}: column {col!r}: null {kind}")
            if _value_type(value) != kind:
                raise DataError(f"{rec.where}: column {col!r}: expected {kind}, got {type(value).__name__}")
            if kind == "text" and not value.strip():
                raise DataError(f"{rec.where}: column {col!r}: empty or whitespace-only text")
            if kind == "number" and not math.isfinite(value):
                raise DataError(f"{rec.where}: column {col!r}: number is not finite: {value!r}")
            values.append(value)
        return values


def _tokenize_block(tokenizer, max_length: int, rows: list[list], text_idx: list[int]):
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(max_length)
    backend.no_padding()
    flat = [row[i] for row in rows for i in text_idx]
    encs = backend.encode_batch(flat)
    lens = np.array([len(e.ids) for e in encs], dtype=np.int32).reshape(len(rows), len(text_idx))
    ids = np.fromiter((t for e in encs for t in e.ids), dtype=np.int32, count=int(lens.sum()))
    return ids, lens


def _sources(paths: list[str], fmt: str, subset: str | None, split: str) -> list[Source]:
    out = []
    for p in paths:
        f = detect_format(p, fmt) if fmt != "auto" else None
        src = Source(p, fmt, subset, split, streaming=True)
        src_fmt = f or src.format
        if src_fmt == "wds":
            raise DataError(f"{p}: already webdataset shards")
        out.append(src)
    return out


def prepare(paths: list[str], out: Path, *, fmt: str = "auto", subset: str | None = None, split: str = "train",
            shard_rows: int = 100_000, block_rows: int = 1024, tokenizer_name: str | None = None,
            max_seq_length: int | None = None, on_error: str = "raise", progress: bool = True) -> dict:
    """Write the shards and manifest of ``paths`` (in order) into ``out``; returns the manifest."""
    from tqdm import tqdm

    sources = _sources(paths, fmt, subset, split)
    fingerprints = [s.fingerprint() for s in sources]
    tokenizer, tok_info = None, None
    if tokenizer_name:
        tokenizer, tok_info = _load_tokenizer(tokenizer_name, max_seq_length)
    options = {"sources": fingerprints, "shard_rows": shard_rows, "block_rows": block_rows,
               "tokenizer": tok_info, "on_error": on_error}
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    done = _existing(out, key)
    if done.get("complete"):
        log.info("%s: already prepared from these sources with these options", out)
        return json.loads((out / MANIFEST).read_text())
    shards = done.get("shards", [])
    position = done.get("position") or {"source": 0, "reader": None}
    skips = SkipCounter(done.get("skipped", 0))
    for reason, n in (done.get("skipped_by_reason") or {}).items():
        skips.by_reason[reason] = n
    skips.first.update(done.get("skipped_first") or {})
    validator = _Validator(done.get("columns"), done.get("column_types"))
    rows_written = sum(s["rows"] for s in shards)
    bar = tqdm(desc=f"prepare {out.name}", unit=" rows", initial=rows_written, disable=not progress or None,
               dynamic_ncols=True)
    pending: list[list] = []

    def flush_shard(next_position: dict) -> None:
        nonlocal pending
        blocks = []
        text_idx = [i for i, c in enumerate(validator.columns) if validator.types[c] == "text"]
        for b in range(0, len(pending), block_rows):
            rows = pending[b:b + block_rows]
            block = {"columns": validator.columns, "rows": rows}
            if tokenizer is not None:
                block["ids"], block["lens"] = _tokenize_block(tokenizer, tok_info["max_seq_length"], rows, text_idx)
            blocks.append(block)
        name = f"shard-{len(shards):06d}.tar"
        digest, size, spans = write_shard(out / name, blocks, first_key=sum(s["blocks"] for s in shards))
        shards.append({"name": name, "rows": len(pending), "blocks": len(blocks), "sha256": digest, "bytes": size,
                       "block_spans": spans})
        pending = []
        _write_json(out / STATE, {"key": key, "shards": shards, "position": next_position,
                                  "columns": validator.columns, "column_types": validator.types,
                                  "skipped": skips.total, "skipped_by_reason": dict(skips.by_reason),
                                  "skipped_first": skips.first})

    records = 0
    for k in range(position["source"], len(sources)):
        cursor = sources[k].records(position["reader"] if k == position["source"] else None)
        for rec in cursor:
            records += 1
            try:
                pending.append(validator.check(rec))
            except DataError as e:
                if on_error == "raise":
                    raise DataError(f"{e} (prepare-data --on-error skip skips and counts such rows)") from None
                skips.add(_reason(str(e)), str(e))
                continue
            bar.update(1)
            if len(pending) == shard_rows:
                flush_shard({"source": k, "reader": cursor.position})
    if pending or not shards:
        if not pending and not shards:
            raise DataError(f"{', '.join(paths)}: no usable rows")
        flush_shard({"source": len(sources), "reader": None})
    bar.close()
    manifest = {"format": FORMAT, "version": VERSION, "columns": validator.columns,
                "column_types": validator.types,
                "text_columns": [c for c in validator.columns if validator.types[c] == "text"],
                "rows": sum(s["rows"] for s in shards), "block_rows": block_rows, "shard_rows": shard_rows,
                "shards": shards, "sources": fingerprints, "tokenizer": tok_info,
                "skipped": {"total": skips.total, "by_reason": dict(skips.by_reason), "first": skips.first},
                "prepare_key": key}
    _write_json(out / MANIFEST, manifest)
    (out / STATE).unlink(missing_ok=True)
    if skips.total:
        log.warning("%s", skips.summary())
    log.info("%s: %d rows in %d shards (%d skipped)", out, manifest["rows"], len(shards), skips.total)
    return manifest


def _load_tokenizer(name: str, max_seq_length: int | None):
    from transformers import AutoTokenizer

    from ..model.encoder import resolve_model_path
    from ..data.tokenization import single_type_ids_are_zero

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as e:
        raise DataError(f"--tokenizer {name}: cannot load a tokenizer: {str(e).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"--tokenizer {name}: pre-tokenizing needs a fast (Rust) tokenizer")
    if not single_type_ids_are_zero(tok.backend_tokenizer) or tok.padding_side != "right":
        raise DataError(f"--tokenizer {name}: its single-text type ids are not all 0 / it pads left; "
                        "such tokenizers are not pre-tokenized (leave out --tokenizer)")
    if max_seq_length is None:
        raise DataError("--tokenizer needs --max-seq-length (the model's max_seq_length, e.g. 128)")
    return tok, {"name": name, "max_seq_length": max_seq_length,
                 "fingerprint": tokenizer_fingerprint(tok, max_seq_length)}


def _existing(out: Path, key: str) -> dict:
    """What an earlier run left in ``out``: a finished manifest, or a state to continue from."""
    man_path, state_path = out / MANIFEST, out / STATE
    if man_path.is_file():
        man = json.loads(man_path.read_text())
        state_key = man.get("prepare_key")
        if state_key == key:
            return {"complete": True}
        raise DataError(f"{out}: holds shards of other sources or options; choose another --out or empty it")
    if not state_path.is_file():
        if any(out.glob("shard-*.tar")):
            raise DataError(f"{out}: holds shards but no {STATE}; choose another --out or empty it")
        return {}
    state = json.loads(state_path.read_text())
    if state.get("key") != key:
        raise DataError(f"{out}: an interrupted prepare-data of other sources or options; "
                        "choose another --out or empty it")
    for s in state["shards"]:  # keep only what is verifiably whole
        path = out / s["name"]
        if not path.is_file() or file_sha256(path) != (s["sha256"], s["bytes"]):
            raise DataError(f"{path}: differs from what the interrupted run recorded; empty {out} and start again")
    log.info("%s: continuing after %d shards", out, len(state["shards"]))
    return state


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)
