"""The one tokenization path: training batches and evaluation both go through ``tokenize_columns``."""
from __future__ import annotations

import hashlib
import json
from itertools import chain

import numpy as np
import torch


def tokenize_columns(tokenizer, columns: list[list[str]], max_length: int) -> list[dict[str, torch.Tensor]]:
    """One encoding per text column, each padded to its own longest text (dynamic padding).

    Fast tokenizers: all columns go through the Rust backend in ONE call and are padded here
    (faster than the Python-side padding of ``tokenizer(...)``, same ids; a test pins that).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or tokenizer.padding_side != "right":
        out = []
        for texts in columns:
            enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out.append({k: v for k, v in enc.items()})
        return out
    backend.enable_truncation(max_length)
    backend.no_padding()
    flat = [t for texts in columns for t in texts]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    encs = encode(flat)
    with_types = "token_type_ids" in tokenizer.model_input_names
    zero_types = with_types and single_type_ids_are_zero(backend)
    pad_id = tokenizer.pad_token_id or 0
    out, start = [], 0
    for texts in columns:
        part = encs[start:start + len(texts)]
        start += len(texts)
        ids = [e.ids for e in part]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        mask = np.arange(int(lengths.max())) < lengths[:, None]  # row-major: fills rows in order
        feat = {"input_ids": _padded(ids, mask, total, pad_id)}
        if zero_types:
            feat["token_type_ids"] = torch.zeros(mask.shape, dtype=torch.long)
        elif with_types:
            feat["token_type_ids"] = _padded([e.type_ids for e in part], mask, total, 0)
        feat["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
        out.append(feat)
    return out


def single_type_ids_are_zero(backend) -> bool:
    """Whether the tokenizer's post-processor gives a single text type id 0 everywhere (BERT's
    template does), so we need not read ``type_ids`` back from every encoding."""
    post = backend.post_processor
    if post is None:
        return True
    spec = json.loads(post.__getstate__())
    if spec.get("type") in ("BertProcessing", "RobertaProcessing", "ByteLevel"):
        return True
    if spec.get("type") == "TemplateProcessing":
        return all(next(iter(piece.values())).get("type_id", 0) == 0 for piece in spec.get("single", []))
    return False


def _padded(rows: list[list[int]], mask: np.ndarray, total: int, fill: int) -> torch.Tensor:
    arr = np.full(mask.shape, fill, dtype=np.int64)
    arr[mask] = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=total)
    return torch.from_numpy(arr)


def features_from_ids(tokenizer, columns: list[list[bytes]]) -> list[dict[str, torch.Tensor]]:
    """``tokenize_columns``' output from token ids made ahead of time (``prepare-data
    --tokenizer``; each text's ids as int32 bytes): only the padding is left to do. Same tensors,
    a test pins it."""
    with_types = "token_type_ids" in tokenizer.model_input_names
    pad_id = tokenizer.pad_token_id or 0
    out = []
    for ids in columns:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) // 4
        mask = np.arange(int(lengths.max())) < lengths[:, None]
        arr = np.full(mask.shape, pad_id, dtype=np.int64)
        arr[mask] = np.frombuffer(b"".join(ids), dtype="<i4")
        feat = {"input_ids": torch.from_numpy(arr)}
        if with_types:
            feat["token_type_ids"] = torch.zeros(mask.shape, dtype=torch.long)
        feat["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
        out.append(feat)
    return out


def tokenizer_fingerprint(tokenizer, max_length: int) -> str:
    """What pre-tokenized ids are valid for: the tokenizer's full definition and the length cap."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{spec}\n{max_length}".encode()).hexdigest()[:16]
