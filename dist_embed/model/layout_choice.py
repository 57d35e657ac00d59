"""Which layout of a batch's texts an encoder takes (``data/layout.py`` computes them in the
collate): unpadded tokens through the variable-length attention where flash attention's kernel
runs (the decision is ``engine/precision.py``'s, handed here as a ``VarlenChoice``), packed rows with
a block-diagonal mask for BERT-type encoders elsewhere (the fastest on CPU), else each column padded
(with length-sorted chunks). Which family takes which layout: ``dist_embed/families.py``."""
from __future__ import annotations

from ..config import ConfigError
from ..data.layout import LayoutSpec
from ..families import families_taking, position_offset, takes_layout
from .fast_dropout import FAST_DROPOUT_ATTENTION
from .varlen import VARLEN_ATTENTION, VARLEN_REFERENCE, VarlenChoice, use_varlen_attention

# attention functions that honour a boolean 4D mask; "eager" ADDS a mask to the scores, so packed
# texts would see each other
MASK_AWARE = ("sdpa", FAST_DROPOUT_ATTENTION, VARLEN_ATTENTION, VARLEN_REFERENCE)


def _config(encoder):
    return encoder.transformer.config


def _attention(encoder) -> str:
    return getattr(_config(encoder), "_attn_implementation", "sdpa")


def can_pack(encoder) -> bool:
    """Absolute positions we can give per text, and an attention that applies our mask."""
    return takes_layout(_config(encoder), "packed") and _attention(encoder) in MASK_AWARE


def can_unpad(encoder) -> bool:
    """Positions we can give per text (absolute, or rotary for the decoders) and an attention we
    can replace with the variable-length one."""
    return takes_layout(_config(encoder), "unpadded") and _attention(encoder) in MASK_AWARE


def _single_type(encoder) -> bool:
    """Layouts carry no token type ids: every text must be one segment of type 0."""
    from ..data.tokenization import single_type_ids_are_zero

    backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
    return "token_type_ids" not in encoder.tokenizer.model_input_names or \
        (backend is not None and single_type_ids_are_zero(backend))


def choose_layout(encoder, training, varlen: VarlenChoice) -> LayoutSpec:
    """``training.layout`` resolved for this encoder ("auto": unpadded where ``varlen`` says the
    kernel runs and the model can, else packed rows where ``pack_length`` and the model allow, else
    padded); the model's attention is switched to the varlen one for "unpadded". An unpadded
    layout the device cannot run (``varlen.refusal``: fp32 or an unsupported head size on CUDA) is
    a ConfigError, never a silent per-text fallback."""
    kind = training.layout
    single = _single_type(encoder)
    model_type, attention = getattr(_config(encoder), "model_type", "?"), _attention(encoder)
    if kind == "auto":
        if varlen.kernel and can_unpad(encoder) and single:
            kind = "unpadded"
        elif training.pack_length and can_pack(encoder) and single:
            kind = "packed"
        else:
            kind = "padded"
    elif kind == "unpadded" and not (can_unpad(encoder) and single):
        raise ConfigError(f"training.layout=unpadded: {model_type} with attention {attention} cannot take unpadded "
                          f"tokens ({', '.join(families_taking('unpadded'))} on SDPA can); use auto")
    elif kind == "unpadded" and varlen.refusal:
        raise ConfigError(varlen.refusal)
    elif kind == "packed" and not (can_pack(encoder) and single):
        raise ConfigError(f"training.layout=packed: {model_type} cannot be packed "
                          f"({', '.join(families_taking('packed'))} on SDPA can); use auto")
    if kind == "unpadded":
        use_varlen_attention(encoder.transformer, kernel=varlen.kernel)
    tok = encoder.tokenizer
    return LayoutSpec(kind, pad_id=getattr(tok, "pad_token_id", 0) or 0,
                      position_offset=position_offset(_config(encoder)),
                      row_len=training.pack_length or "auto", bucket=getattr(training, "layout_bucket", 0),
                      max_filler=min(encoder.max_seq_length, 128))
