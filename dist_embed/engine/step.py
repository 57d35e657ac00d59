"""One micro-batch: embed this rank's columns, gather candidates, compute the loss, backward.

Kept apart from the loop so the maths of a step (plain, length-sorted chunks, packed rows, cached
MNRL) can be tested on its own against a single big batch. The loss is an object (losses.py); how
texts are laid out for the encoder is the ``Embedder``'s; the backward is the backend's.

Nothing here reads a value back from the device: every shape and every plan (chunks, mini-batches)
is worked out from the batch's host arrays, and host arrays reach the device only through
``data.batch.to_device`` (pinned, non-blocking). tests/test_host_reads.py holds every loss, layout
and backend to that.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..data.batch import Batch, to_device
from ..distributed import DistState, all_reduce_sum
from ..data.layout import Unpadded, sub_unpadded
from ..outputs.tracking import Timer
from .losses import Loss, compute


@dataclass(frozen=True)
class Embedder:
    """How a micro-batch's texts meet the encoder. ``layout``: the kind the collate laid them out in
    (``data/layout.py``: "unpadded", "packed"), one forward for all columns; "padded": all
    columns' texts sorted by length in chunks of ``chunk`` (0: one padded forward per column, as
    sentence-transformers does). Under the precision's ``autocast``. Same maths either way."""

    layout: str = "padded"
    chunk: int = 0
    autocast: object = contextlib.nullcontext  # a context factory (Precision.autocast)

    def forwards(self, n_cols: int, sizes) -> int:
        """How many encoder forwards the rank with the largest slice runs for one micro-batch."""
        if self.layout != "padded":
            return 1
        if self.chunk:
            return math.ceil(n_cols * max(sizes) / self.chunk)
        return n_cols

    def embed(self, encoder, feats, layout, device, min_forwards: int = 0) -> list[torch.Tensor]:
        """Each column's embeddings: from the layout already on ``device`` (one forward), or from
        the host's padded ``feats``."""
        if layout is not None:
            return list(torch.split(encoder(layout), list(layout.column_sizes)))
        return embed_columns(encoder, feats, self.chunk, device, min_forwards)


def _slice(features: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of a tokenized column (host tensors), with the padding no row of them needs cut
    off (on the right, or on the left for left-padded decoder tokenizers)."""
    out = {k: v[idx] for k, v in features.items()}
    used = torch.nonzero(out["attention_mask"].any(0)).flatten() if len(idx) else None
    if used is None or not len(used):
        return {k: v[:, :1] for k, v in out.items()}
    first, last = int(used[0]), int(used[-1]) + 1
    return {k: v[:, first:last] for k, v in out.items()}


def chunks(features: dict[str, torch.Tensor], size: int, by_length: bool) -> list[torch.Tensor]:
    """Row index groups of at most ``size`` rows; sorted by length so each chunk needs little padding."""
    n = features["attention_mask"].shape[0]
    order = torch.argsort(features["attention_mask"].sum(1), descending=True, stable=True) if by_length \
        else torch.arange(n)
    return list(torch.split(order, size))


def token_chunks(features: dict[str, torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Row index groups whose padded size (rows x longest row) stays within ``budget`` tokens:
    rows sorted by length, longest first, so short texts go many to a group and long ones few
    (a row longer than the budget goes alone). Memory per mini-batch is then about even."""
    lengths = features["attention_mask"].sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    groups, start = [], 0
    for pos, length in enumerate(lengths[order].tolist()):
        # the group's longest row is its first: sorted longest first
        if pos > start and (pos - start + 1) * int(lengths[order[start]]) > budget:
            groups.append(order[start:pos])
            start = pos
    if len(order):
        groups.append(order[start:])
    return groups


def embed_columns(encoder, feats: list[dict[str, torch.Tensor]], chunk: int, device,
                  min_forwards: int = 0) -> list[torch.Tensor]:
    """Embeddings (with grad) of every padded text column (``feats``: host tensors), each in its
    row order. Chunks are cut and padded on the host, then copied to ``device``.

    ``chunk == 0``: one forward per column, padded to the column's longest text (what
    sentence-transformers does). ``chunk > 0``: the texts of ALL columns are pooled, sorted by length
    and encoded in chunks of ``chunk`` texts padded only to the chunk's longest, then put back in
    place. Same result (a text's embedding depends only on its own tokens), far fewer pad tokens.
    ``min_forwards``: run placeholder forwards until at least that many ran (every rank must run
    as many forwards as the others where forwards communicate, e.g. ZeRO-3's weight gathering).
    """
    if not chunk:
        return [encoder(to_device(f, device)) for f in feats]
    lengths = torch.cat([f["attention_mask"].sum(1) for f in feats])
    col_of = torch.cat([torch.full((f["attention_mask"].shape[0],), c) for c, f in enumerate(feats)])
    row_of = torch.cat([torch.arange(f["attention_mask"].shape[0]) for f in feats])
    order = torch.argsort(lengths, descending=True, stable=True)
    pad_id = getattr(encoder.tokenizer, "pad_token_id", 0) or 0
    outputs = []
    for idx in torch.split(order, chunk):
        width = max(int(lengths[idx].max()), 1)
        batch = {}
        for key in feats[0]:
            fill = pad_id if key == "input_ids" else 0
            rows = []
            for i in idx.tolist():
                t = feats[int(col_of[i])][key][int(row_of[i]), :width]
                if t.shape[0] < width:
                    t = torch.cat([t, t.new_full((width - t.shape[0],), fill)])
                rows.append(t)
            batch[key] = torch.stack(rows)
        outputs.append(encoder(to_device(batch, device)))
    emb = torch.cat(outputs)[to_device(torch.argsort(order), device)]
    for _ in range(min_forwards - len(outputs)):
        emb = emb + 0.0 * encoder(placeholder_features(encoder, device)).sum()
    return list(torch.split(emb, [f["attention_mask"].shape[0] for f in feats]))


def placeholder_features(encoder, device) -> dict[str, torch.Tensor]:
    """One short text (the tokenizer's special tokens around nothing): the forward a rank with an
    empty slice runs, so that its parameters take part in the step like everyone else's."""
    tok = encoder.tokenizer
    ids = tok("")["input_ids"] or [getattr(tok, "pad_token_id", 0) or 0]
    ids = torch.tensor([ids], dtype=torch.long)
    features = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    return to_device(features, device)


def forward_backward(encoder, batch: Batch, loss: Loss, embedder: Embedder, state: DistState, *,
                     loss_scale: float = 1.0, grads=None, timer: Timer | None = None) -> tuple[torch.Tensor, dict]:
    """Loss of one micro-batch (this rank's share of the global mean, a detached tensor: nothing is
    read back from the device here), gradients accumulated into the encoder's ``.grad`` (or
    DeepSpeed's partitions). ``loss_scale`` divides by the number of accumulation steps. ``encoder``
    may be a DeepSpeed engine wrapping our Encoder (it passes attribute lookups through), so that
    every forward is one the engine sees.

    Every rank issues the same collectives whatever its slice holds, an empty one included: the
    same gathers (one per candidate column), the same number of forwards and backwards (an empty
    or smaller slice runs placeholder forwards whose output is multiplied by zero)."""
    if grads is None:
        from ..backends.allreduce import AutogradBackward

        grads = AutogradBackward()
    device = state.device
    layout = batch.layout
    if loss.cache is not None and not isinstance(layout, Unpadded):
        layout = None  # cached mini-batches of packed rows would need a packing each: padded columns
    layout = to_device(layout, device) if layout is not None else None
    feats = [] if layout is not None else batch.features  # host tensors: padded columns move chunk by chunk
    n_cols = batch.n_cols or len(batch.features)
    if loss.cache is not None:
        return _cached(encoder, feats, layout, n_cols, batch, loss, embedder, state, loss_scale, grads, timer)
    forwards = embedder.forwards(n_cols, batch.sizes)
    with embedder.autocast():
        if batch.rows:
            embs = embedder.embed(encoder, feats, layout, device, min_forwards=forwards)
        else:
            embs = _empty_slice_embeddings(encoder, n_cols, forwards, device)
        value, info = compute(loss, embs, batch, state, timer)
    grads.backward(value * loss_scale)
    return value.detach(), info


def _empty_slice_embeddings(encoder, n_cols: int, forwards: int, device) -> list[torch.Tensor]:
    """Zero-row embeddings for each column, tied to ``forwards`` placeholder forwards (x 0)."""
    zero = sum(0.0 * encoder(placeholder_features(encoder, device)).sum() for _ in range(max(forwards, 1)))
    empty = torch.zeros((0, encoder.dim), device=device) + zero
    return [empty for _ in range(n_cols)]


class _RngReplay:
    """Captures the RNG state before a forward so the re-forward with grad draws the same dropout."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def replay(self):
        cpu_now = torch.get_rng_state()
        cuda_now = torch.cuda.get_rng_state(self.device) if self.cuda is not None else None
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield
        finally:
            torch.set_rng_state(cpu_now)
            if cuda_now is not None:
                torch.cuda.set_rng_state(cuda_now, self.device)


def _cached(encoder, feats, layout, n_cols, batch: Batch, loss: Loss, embedder: Embedder, state, loss_scale,
            grads, timer) -> tuple[torch.Tensor, dict]:
    """Gradient caching (Gao et al. 2021): the loss sees the whole global batch, activations only
    ever exist for one mini-batch. 1) embed mini-batches without grad, 2) loss + gradient w.r.t. the
    embeddings, 3) re-embed each mini-batch with grad (same RNG) and backpropagate its slice.

    Mini-batches are row groups of each padded column, or with an unpadded layout consecutive texts
    of a column (one token range each, no padding to sort away). Every rank runs as many
    mini-batches per column as the rank that needs most, a smaller or empty slice topping up with
    placeholder ones, so forwards and backwards pair up across ranks."""
    device = state.device
    columns, per_column = _mini_batches(feats, layout, n_cols, batch, loss.cache, embedder, state)
    starts = [sum(layout.column_sizes[:c]) for c in range(n_cols)] if isinstance(layout, Unpadded) else None
    reps, plans = [], []
    for c in range(n_cols):
        col_parts, col_plan = [], []
        groups = columns[c] if batch.rows else []
        for idx in groups + [None] * (per_column - len(groups)):
            rng = _RngReplay(device)
            if idx is None:
                sub = placeholder_features(encoder, device)
            elif starts is not None:
                sub = sub_unpadded(layout, starts[c] + idx[0], starts[c] + idx[1])
            else:
                sub = to_device(_slice(feats[c], idx), device)
                idx = to_device(idx, device)  # the rows' places among the column's, for the gradient
            with torch.no_grad(), embedder.autocast():
                out = encoder(sub).float()
            if idx is not None:
                col_parts.append(out)
            col_plan.append((idx, sub, rng))
        if col_parts and starts is not None:
            rep = torch.cat(col_parts)  # consecutive ranges: already in row order
        elif col_parts:
            order = torch.cat(groups)  # host row numbers, in the order they were embedded
            rep = torch.cat(col_parts)[to_device(torch.argsort(order), device)]
        else:
            rep = torch.zeros((0, encoder.dim), device=device)
        reps.append(rep.detach().requires_grad_())
        plans.append(col_plan)
    value, info = compute(loss, reps, batch, state, timer)
    # gradients of the (scaled) loss w.r.t. the cached embeddings; with gathering this backward runs
    # the all-reduce that hands each rank the gradients other ranks computed for its candidates
    grads.backward_cached(value * loss_scale)
    for rep, col_plan in zip(reps, plans):
        for idx, sub, rng in col_plan:
            with rng.replay(), embedder.autocast():
                emb = encoder(sub).float()
            if idx is None:
                grads.backward_outputs(emb, torch.zeros_like(emb))
            elif starts is not None:
                grads.backward_outputs(emb, rep.grad[idx[0]:idx[1]])
            else:
                grads.backward_outputs(emb, rep.grad[idx])
    return value.detach(), info


def _mini_batches(feats, layout, n_cols: int, batch: Batch, cache, embedder: Embedder, state) -> tuple[list, int]:
    """Each column's mini-batches (row index groups; ``(first, last)`` text ranges for an unpadded
    layout) and how many every rank runs per column."""
    if isinstance(layout, Unpadded):
        ends, columns = 0, []
        for size in layout.column_sizes:
            lengths = layout.lengths[ends:ends + size]
            ends += size
            columns.append(token_ranges(lengths, cache.tokens) if cache.tokens else
                           [(a, min(a + cache.rows, size)) for a in range(0, size, cache.rows)])
    elif cache.tokens:
        columns = [token_chunks(f, cache.tokens) for f in feats] if feats else [[] for _ in range(n_cols)]
    else:
        columns = [chunks(f, cache.rows, by_length=bool(embedder.chunk)) for f in feats] if feats else \
            [[] for _ in range(n_cols)]
    if cache.tokens:
        per_column = max([len(g) for g in columns] + [0])
        if state.enabled:  # ranks hold other texts: every rank runs the largest count of mini-batches
            per_column = int(all_reduce_sum([per_column], state, op=torch.distributed.ReduceOp.MAX)[0])
    else:
        per_column = math.ceil(max(batch.sizes) / cache.rows)
    return columns, per_column


def token_ranges(lengths, budget: int) -> list[tuple[int, int]]:
    """Consecutive texts whose tokens sum to at most ``budget`` (a longer text goes alone): the
    unpadded counterpart of ``token_chunks`` (memory follows real tokens, there is no padding)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > budget:
            out.append((start, i))
            start, total = i, 0
        total += n
    if len(lengths):
        out.append((start, len(lengths)))
    return out
