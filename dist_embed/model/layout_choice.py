"""Which layout of a batch's texts an encoder takes (``data/layout.py`` computes them in the
collate): unpadded tokens through the variable-length attention where the device has the kernel
(CUDA in bf16/fp16), packed rows with a block-diagonal mask for BERT-type encoders elsewhere (the
fastest on CPU), else each column padded (with length-sorted chunks)."""
from __future__ import annotations

from ..config import ConfigError
from ..data.layout import DECODERS, ENCODERS, LayoutSpec, position_offset

# attention functions that honour a boolean 4D mask; "eager" ADDS a mask to the scores, so packed
# texts would see each other
MASK_AWARE = ("sdpa", "dist_embed_sdpa", "dist_embed_varlen")


def _config(encoder):
    return encoder.transformer.config


def can_pack(encoder) -> bool:
    """Absolute positions we can give per text, and an attention that applies our mask."""
    cfg = _config(encoder)
    return getattr(cfg, "model_type", "") in ENCODERS and getattr(cfg, "_attn_implementation", "sdpa") in MASK_AWARE


def can_unpad(encoder) -> bool:
    """Positions we can give per text (absolute, or rotary for the decoders) and an attention we
    can replace with the variable-length one."""
    cfg = _config(encoder)
    return getattr(cfg, "model_type", "") in ENCODERS + DECODERS and \
        getattr(cfg, "_attn_implementation", "sdpa") in MASK_AWARE


def _single_type(encoder) -> bool:
    """Layouts carry no token type ids: every text must be one segment of type 0."""
    from ..data.tokenization import single_type_ids_are_zero

    backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
    return "token_type_ids" not in encoder.tokenizer.model_input_names or \
        (backend is not None and single_type_ids_are_zero(backend))


def choose_layout(encoder, device_type: str, precision: str, training) -> LayoutSpec:
    """``training.layout`` resolved for this encoder, device and precision ("auto": unpadded on CUDA
    in bf16/fp16 where the model can, else packed rows where ``pack_length`` and the model allow,
    else padded); the model's attention is switched to the varlen one for "unpadded"."""
    kind = training.layout
    single = _single_type(encoder)
    if kind == "auto":
        if device_type == "cuda" and precision in ("bf16", "fp16") and can_unpad(encoder) and single:
            kind = "unpadded"
        elif training.pack_length and can_pack(encoder) and single:
            kind = "packed"
        else:
            kind = "padded"
    elif kind == "unpadded" and not (can_unpad(encoder) and single):
        raise ConfigError(f"training.layout=unpadded: {getattr(_config(encoder), 'model_type', '?')} with attention "
                          f"{getattr(_config(encoder), '_attn_implementation', '?')} cannot take unpadded tokens "
                          f"(BERT, RoBERTa, XLM-R, {', '.join(DECODERS)} on SDPA can); use auto")
    elif kind == "packed" and not (can_pack(encoder) and single):
        raise ConfigError(f"training.layout=packed: {getattr(_config(encoder), 'model_type', '?')} cannot be packed "
                          "(BERT-type encoders on SDPA can); use auto")
    if kind == "unpadded":
        from .varlen import use_varlen_attention

        use_varlen_attention(encoder.transformer)
    tok = encoder.tokenizer
    return LayoutSpec(kind, pad_id=getattr(tok, "pad_token_id", 0) or 0,
                      position_offset=position_offset(_config(encoder)),
                      row_len=training.pack_length or "auto", bucket=getattr(training, "layout_bucket", 0),
                      max_filler=min(encoder.max_seq_length, 128))
