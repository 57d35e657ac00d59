"""Sequence packing beside the model: the texts of a batch side by side in rows, each attending
only to itself, so the linear layers see almost no padding and each embedding is the one the text
gets alone (tests pin that)."""
from __future__ import annotations

import torch

# absolute position embeddings and a 4D-mask-aware attention: safe to pack. RoBERTa-type models
# number positions from padding_idx + 1 (HF's create_position_ids_from_input_ids): POSITION_OFFSET
PACKABLE = ("bert", "roberta", "xlm-roberta", "camembert")
ROBERTA_TYPE = ("roberta", "xlm-roberta", "camembert")


def position_offset(config) -> int:
    """The position id of a text's first token: 0 (BERT), padding_idx + 1 (RoBERTa, XLM-R)."""
    if getattr(config, "model_type", "") in ROBERTA_TYPE:
        return int(getattr(config, "pad_token_id", 1) or 0) + 1
    return 0


def pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """Best-fit decreasing: text indices per row, each row holding at most ``row_len`` tokens.

    Longest texts first, each into the row it leaves the least room in (rows are kept in buckets
    by free room, so a text scans at most ``row_len`` buckets, not every row).
    """
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


def embed_packed(encoder, feats: list[dict[str, torch.Tensor]], row_len: int | str) -> list[torch.Tensor]:
    """Embeddings of all columns with the texts packed side by side into rows of ``row_len`` tokens
    (``"auto"``: as many as the longest text has).

    Each text keeps its own position ids (0..n-1, shifted as the model numbers them) and attends only to itself (a block-diagonal 4D
    mask), so its embedding is the one it gets alone; but the linear layers, most of the compute,
    see almost no padding. Attention still spans the whole row, so narrow rows are cheaper: on
    short-text batches rows as wide as the longest text fill nearly every slot, as fixed wide rows
    do, with less attention work (docs/performance.md). Pooling is per text over its own tokens.
    """
    device = feats[0]["input_ids"].device
    masks = [f["attention_mask"].bool() for f in feats]
    tokens = torch.cat([f["input_ids"][m] for f, m in zip(feats, masks)])  # real tokens, text after text
    counts = torch.cat([m.sum(1) for m in masks])
    lengths = counts.tolist()
    width = max(lengths) if row_len == "auto" else max(int(row_len), max(lengths))
    start = [0] * len(lengths)  # where each text begins in the flattened [rows, width] grid
    layout = pack_rows(lengths, width)
    for r, members in enumerate(layout):
        offset = r * width
        for i in members:
            start[i] = offset
            offset += lengths[i]
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts)  # text of each token
    first = torch.cumsum(counts, 0) - counts  # index in `tokens` of each text's first token
    pos = torch.arange(len(tokens), device=device) - first[owner]
    starts = torch.tensor(start, dtype=torch.long, device=device)
    slot = starts[owner] + pos
    pad_id = getattr(encoder.tokenizer, "pad_token_id", 0) or 0
    cells = len(layout) * width
    input_ids = torch.full((cells,), pad_id, dtype=torch.long, device=device).index_put_((slot,), tokens)
    positions = torch.zeros(cells, dtype=torch.long, device=device).index_put_((slot,), pos)
    segment = torch.full((cells,), -1, dtype=torch.long, device=device).index_put_((slot,), owner)
    segment = segment.view(len(layout), width)
    # padding tokens attend among themselves (a fully masked query row would give NaN)
    mask = (segment[:, :, None] == segment[:, None, :])[:, None]
    positions = positions + position_offset(encoder.transformer.config)
    emb = encoder({"input_ids": input_ids.view_as(segment), "position_ids": positions.view_as(segment),
                   "token_type_ids": torch.zeros_like(segment), "attention_mask": mask}, packed=(slot, owner, counts))
    return list(torch.split(emb, [f["attention_mask"].shape[0] for f in feats]))


MASK_AWARE = ("sdpa", "dist_embed_sdpa")  # attention functions that honour a boolean 4D mask


def can_pack(encoder) -> bool:
    """Packing needs absolute positions we can give per text and an attention that applies our block-diagonal
    boolean mask; "eager" attention ADDS a mask to the scores, so packed texts would see each other."""
    cfg = encoder.transformer.config
    return getattr(cfg, "model_type", "") in PACKABLE and getattr(cfg, "_attn_implementation", "sdpa") in MASK_AWARE
