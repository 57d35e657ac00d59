"""``dist-embed mine``: hard negatives for (anchor, positive) data, with the filters that keep
false negatives out, across the ranks of any of our launchers.

The corpus (the positives, and optionally a corpus file) is embedded across ranks; anchors are
processed in fixed blocks dealt to the ranks in turn; each block's exact top-k (mining/search.py:
integer scores, the same for any split) is filtered (mining/filters.py, the rules the refresh
during training uses too) and written to a part file. Blocks and encoding batches do not depend
on the world size, so 1 and N processes give the same bytes. A rerun with the same
inputs and options skips the blocks already written (resumable); rank 0 joins the parts in input
order, then writes jsonl (or shards through prepare-data) atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..data.readers import DataError, Source
from ..data.rows import Schema, SkipCounter, validate_rows
from ..evaluation.retrieval import embed_sharded
from ..mining.corpus import read_corpus
from ..mining.filters import MineOptions, choose_ids, choose_negatives
from ..mining.search import Keys, top_k

__all__ = ["MineOptions", "choose_negatives", "mine", "read_corpus", "read_pairs"]

log = logging.getLogger(__name__)


def read_pairs(path: str, columns: dict[str, str], on_error: str, fmt: str = "auto", subset: str | None = None,
               split: str = "train") -> list[tuple[str, str]]:
    skips = SkipCounter()
    rows = validate_rows(Source(path, fmt=fmt, subset=subset, split=split, streaming=False).records(),
                         Schema(("anchor", "positive")), columns, on_error, skips)
    pairs = [(r.texts[0], r.texts[1]) for r in rows]
    if skips.total:
        log.warning("%s: %s", path, skips.summary())
    if not pairs:
        raise DataError(f"{path}: no (anchor, positive) rows to mine for")
    return pairs


def _fingerprint(model: str, pairs, corpus, opt: MineOptions) -> str:
    h = hashlib.sha256(json.dumps([model, asdict(opt)]).encode())
    for a, p in pairs:
        h.update(a.encode() + b"\0" + p.encode() + b"\1")
    for t in corpus:
        h.update(t.encode() + b"\2")
    return h.hexdigest()


class MiningStopped(Exception):
    """A stop signal ended mining after whole blocks: a rerun of the same command continues."""

    def __init__(self, done: int, total: int):
        super().__init__(f"{done} of {total} blocks mined and kept; run the same command again to continue")
        self.done, self.total = done, total


def mine(state, *, model: str, data: str, out: Path, corpus_file: str | None = None, opt: MineOptions,
         columns: dict[str, str] | None = None, on_error: str = "raise", fmt: str = "jsonl",
         max_seq_length: int | None = None, progress: bool = True, stop_requested=lambda: False) -> dict:
    """Every rank calls this. Returns a summary (rank 0) of what was written. ``stop_requested``:
    whether a stop signal arrived; then each rank ends after its current block and every rank
    raises MiningStopped (the blocks written stay for a rerun)."""
    import time

    import torch.distributed as dist
    from tqdm import tqdm

    from ..model.encoder import Encoder

    start = time.perf_counter()
    pairs = read_pairs(data, columns or {}, on_error)
    corpus = list(dict.fromkeys([p for _, p in pairs] + (read_corpus(corpus_file) if corpus_file else [])))
    parts = out.parent / f".{out.name}.parts"
    if state.is_main:
        log.info("mining %d anchors against %d candidate texts, in %d blocks of %d", len(pairs), len(corpus),
                 math.ceil(len(pairs) / opt.block), opt.block)
    key = _fingerprint(model, pairs, corpus, opt)
    if state.is_main:
        state_file = parts / "state.json"
        if parts.is_dir() and (not state_file.is_file() or json.loads(state_file.read_text()).get("key") != key):
            shutil.rmtree(parts)  # another run's parts: start over
        parts.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"key": key}))
    if state.enabled:
        dist.barrier()
    encoder = Encoder.from_pretrained(model, max_seq_length=max_seq_length).to(state.device)
    encoder.eval()
    t_embed = time.perf_counter()
    corpus_emb = embed_sharded(encoder, corpus, state, opt.batch_size, prompt_name="document", everywhere=True)
    blocks = range(math.ceil(len(pairs) / opt.block))
    done = sum((parts / f"block-{b:06d}.jsonl").is_file() for b in blocks)
    if done and state.is_main:
        log.info("resuming: %d of %d blocks already mined (%s)", done, len(blocks), parts)
    todo = [b for b in blocks[state.rank::state.world_size] if not (parts / f"block-{b:06d}.jsonl").is_file()]
    # every rank embeds its anchors block by block; a block's batches are the same at any world size
    bar = tqdm(total=len(todo), desc="mining (rank 0's blocks)", unit="block", disable=not (progress and state.is_main))
    positions = {t: i for i, t in enumerate(corpus)}
    positives_of: dict[str, set[str]] = {}
    for a, p in pairs:
        positives_of.setdefault(a, set()).add(p)
    k = min(opt.range_max + max(len(v) for v in positives_of.values()) + 1, len(corpus))
    keys = Keys.for_corpus(len(corpus))
    corpus_q = keys.quantize(torch.from_numpy(corpus_emb))
    corpus_ids = torch.arange(len(corpus))
    n_embedded, stopped = 0, False
    for b in todo:
        if stop_requested():
            stopped = True
            break
        block = pairs[b * opt.block:(b + 1) * opt.block]
        anchors = keys.quantize(torch.from_numpy(
            encoder.encode([a for a, _ in block], batch_size=opt.batch_size, prompt_name="query")))
        n_embedded += len(block)
        scores, idx = keys.decode(top_k(anchors, corpus_q, corpus_ids, k, keys))
        pos_scores = keys.exact(anchors, corpus_q[[positions[p] for _, p in block]]).numpy() / 4.0 ** keys.scale_bits
        banned = [sorted(positions[t] for t in positives_of[a] | {a} if t in positions) for a, _ in block]
        exclude = np.full((len(block), max(map(len, banned))), -1, dtype=np.int64)
        for row, ids in enumerate(banned):
            exclude[row, :len(ids)] = ids
        chosen = choose_ids(scores, idx, pos_scores, exclude, opt)
        tmp = parts / f".block-{b:06d}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for (a, p), negs in zip(block, chosen):
                f.write(json.dumps([a, p, [corpus[i] for i in negs if i >= 0]], ensure_ascii=False) + "\n")
        os.replace(tmp, parts / f"block-{b:06d}.jsonl")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t_embed
    counts, stops = [n_embedded], [stopped]
    if state.enabled:
        gathered: list = [None] * state.world_size
        dist.all_gather_object(gathered, (n_embedded, stopped))
        counts, stops = [n for n, _ in gathered], [s for _, s in gathered]
        dist.barrier()
    if any(stops):
        raise MiningStopped(sum((parts / f"block-{b:06d}.jsonl").is_file() for b in blocks), len(blocks))
    if not state.is_main:
        return {}
    written = dropped = 0
    tmp_out = out.parent / f".{out.name}.tmp.jsonl"
    with open(tmp_out, "w", encoding="utf-8") as f:
        for b in blocks:
            for line in (parts / f"block-{b:06d}.jsonl").read_text(encoding="utf-8").splitlines():
                a, p, negs = json.loads(line)
                if len(negs) < opt.num_negatives:
                    dropped += 1
                    continue
                row = {"anchor": a, "positive": p, **{f"negative_{j + 1}": n for j, n in enumerate(negs)}}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
    if fmt == "shards":  # written beside, then put in place: an earlier output (--overwrite) goes whole
        from .prepare import prepare

        staging = out.parent / f".{out.name}.tmp-shards"
        shutil.rmtree(staging, ignore_errors=True)
        prepare([str(tmp_out)], staging, fmt="jsonl", progress=progress)
        tmp_out.unlink()
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(staging, out)
    else:
        os.replace(tmp_out, out)
    shutil.rmtree(parts, ignore_errors=True)
    texts = len(corpus) + sum(counts)
    summary = {"rows_written": written, "anchors_without_enough_negatives": dropped, "corpus": len(corpus),
               "texts_embedded": texts, "seconds": round(seconds, 2), "texts_per_second": round(texts / seconds, 1),
               "world_size": state.world_size, "total_seconds": round(time.perf_counter() - start, 2)}
    log.info("mined %d rows (%d anchors dropped: fewer than %d negatives after the filters) -> %s; "
             "%d texts embedded at %.0f texts/s", written, dropped, opt.num_negatives, out, texts,
             summary["texts_per_second"])
    return summary
