"""What the code needs to know of each model family (transformers' ``model_type``), in one table.

The collate (``data/layout.py``: where a text's positions start), the encoder (``model/encoder.py``:
how long a text may be, which class holds the encoder, whether a forward builds a cache) and the
layout choice (``model/layout_choice.py``: which layouts a family takes) all read it here, so that
they cannot disagree. A family missing from the table is trained padded, its limits read from its
config as transformers defines them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    # "absolute": a learned position table (it bounds a text's length); "rotary" or "relative": no
    # table, so max_position_embeddings is a soft hint, not a limit
    positions: str
    # layouts beyond padded columns (data/layout.py): "packed" needs absolute positions we can give
    # per text and a mask-aware attention; "unpadded" positions per text (absolute or rotary) and
    # an attention we can replace with the variable-length one
    layouts: tuple[str, ...] = ()
    # RoBERTa-type models number positions from padding_idx + 1 (HF's create_position_ids_from_input_ids)
    positions_after_padding_idx: bool = False
    # causal attention: a decoder embedder; its forward would build a key/value cache unless told not to
    causal: bool = False
    # encoder-decoder checkpoints: the transformers class of the encoder alone (AutoModel would
    # build the decoder too; sentence-transformers loads them the same way)
    encoder_class: str | None = None


_BERT_TYPE = Family("absolute", ("packed", "unpadded"))
_ROBERTA_TYPE = Family("absolute", ("packed", "unpadded"), positions_after_padding_idx=True)
_DECODER = Family("rotary", ("unpadded",), causal=True)

FAMILIES: dict[str, Family] = {
    "bert": _BERT_TYPE,
    "roberta": _ROBERTA_TYPE,
    "xlm-roberta": _ROBERTA_TYPE,
    "camembert": _ROBERTA_TYPE,
    "xlm-roberta-xl": Family("absolute", positions_after_padding_idx=True),
    "llama": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "mistral": _DECODER,
    "gemma": Family("rotary", causal=True),
    "gemma2": Family("rotary", causal=True),
    "t5": Family("relative", encoder_class="T5EncoderModel"),
    "mt5": Family("relative", encoder_class="MT5EncoderModel"),
    "umt5": Family("relative", encoder_class="UMT5EncoderModel"),
}


def family(config) -> Family | None:
    """The table's row for a transformers config (None: a family the table does not know)."""
    return FAMILIES.get(getattr(config, "model_type", ""))


def takes_layout(config, kind: str) -> bool:
    """Whether the family takes the layout ``kind`` ("packed", "unpadded"; "padded" always)."""
    fam = family(config)
    return kind == "padded" or (fam is not None and kind in fam.layouts)


def families_taking(kind: str) -> list[str]:
    """The model types that take layout ``kind`` (for messages)."""
    return [name for name, fam in FAMILIES.items() if kind in fam.layouts]


def position_offset(config) -> int:
    """The position id of a text's first token: 0 (BERT, decoders), padding_idx + 1 (RoBERTa, XLM-R)."""
    fam = family(config)
    if fam is not None and fam.positions_after_padding_idx:
        return int(getattr(config, "pad_token_id", 1) or 0) + 1
    return 0


def position_limit(config) -> int | None:
    """Tokens a text may have: absolute position embeddings bound it (RoBERTa types spend
    padding_idx + 1 of them before the first token); rotary/relative models have no such table."""
    fam = family(config)
    n = getattr(config, "max_position_embeddings", None)
    if fam is not None and fam.positions != "absolute":
        return None
    if not n or getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return None
    return int(n) - position_offset(config)


def is_causal(config) -> bool:
    fam = family(config)
    return fam is not None and fam.causal


def head_dim(config) -> int:
    """The size of one attention head (what an attention kernel is built for)."""
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    return int(config.hidden_size) // int(config.num_attention_heads)
