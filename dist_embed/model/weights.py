"""Whole weights from wherever they live, and safetensors files written in shards.

Under ZeRO-3 each rank holds 1/N of every parameter. Gathering the whole model at once would put a
full copy on one rank, which is what ZeRO-3 is there to avoid; instead the weights are gathered one
module at a time (DeepSpeed's ``GatheredParameters``), and rank 0 streams them into safetensors
files of at most ``max_shard_size`` bytes each, in the layout transformers writes
(``model-00001-of-00003.safetensors`` ... + ``model.safetensors.index.json``; one file is
``model.safetensors``), which ``from_pretrained`` and so sentence-transformers read.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Iterator

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# safetensors' dtype names -> torch's, for the floating types a model's weights come in
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: this rank holds only its partition (``ds_tensor``)."""
    return hasattr(p, "ds_id")


def full_parameters(params: Iterable[torch.Tensor], modifier_rank: int | None = None):
    """Context in which partitioned parameters are whole on every rank (all ranks must enter it);
    plain parameters need nothing. With ``modifier_rank`` that rank's changes are kept."""
    parts = [p for p in params if is_partitioned(p)]
    if not parts:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parts, modifier_rank=modifier_rank)


def module_weights(module: torch.nn.Module, is_main: bool, prefix: str = "",
                   whole: dict | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The module's state dict, one submodule at a time, as CPU copies (keys as ``state_dict``,
    after ``prefix``). Under ZeRO-3 every rank must run it to the end (each submodule's gather is a
    collective); the tensors are yielded on rank 0 only, so rank 0 holds one submodule at a time.
    ``whole``: {module type: fn(name, submodule) -> tensors} for submodules written as one piece
    (a LoRA layer, merged), computed while all their parameters are gathered."""
    skip: tuple[str, ...] = ()
    for name, sub in module.named_modules():
        if skip and name.startswith(skip):
            continue
        fn = next((f for kind, f in (whole or {}).items() if isinstance(sub, kind)), None)
        if fn is not None:
            skip += (f"{name}.",)
            with full_parameters(sub.parameters()):
                out = fn(name, sub) if is_main else None
            if is_main:
                yield {prefix + k: v.detach().to("cpu").clone() for k, v in out.items()}
            continue
        params = {k: p for k, p in sub._parameters.items() if p is not None}
        buffers = {k: b for k, b in sub._buffers.items()
                   if b is not None and k not in sub._non_persistent_buffers_set}
        if not params and not buffers:
            continue
        with full_parameters(params.values()):
            if is_main:
                yield {prefix + (f"{name}.{k}" if name else k): t.detach().to("cpu").clone()
                       for k, t in {**params, **buffers}.items()}


def dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): store a copy of each."""
    seen: set = set()
    out = {}
    for k, v in state.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if ptr in seen else v.contiguous()
        seen.add(ptr)
    return out


class ShardWriter:
    """Tensors in, safetensors shards of at most ``max_bytes`` out (a tensor larger than that gets
    a shard of its own). Only the current shard is held in memory. A key seen before is skipped."""

    def __init__(self, directory: Path, max_bytes: int):
        self.dir, self.max_bytes = Path(directory), max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.seen: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            if key in self.seen:
                continue
            self.seen.add(key)
            n = t.numel() * t.element_size()
            if self.buffer and self.size + n > self.max_bytes:
                self._flush()
            self.buffer[key] = t
            self.size += n
            self.total += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.dir / f".shard-{len(self.files):05d}.safetensors"
        save_file(dedupe_shared(self.buffer), str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def close(self) -> list[str]:
        """Name the shards (their count is known only now); returns the file names written."""
        if self.buffer or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(self.files[0][0], self.dir / SINGLE)
            return [SINGLE]
        n, weight_map, names = len(self.files), {}, []
        for i, (path, keys) in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.dir / name)
            weight_map.update({k: name for k in keys})
            names.append(name)
        (self.dir / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                  "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        return names + [INDEX]


def write_weights(directory: Path, parts: Iterable[dict[str, torch.Tensor]], max_bytes: int) -> list[str]:
    writer = ShardWriter(directory, max_bytes)
    for part in parts:
        writer.add(part)
    return writer.close()


def weight_files(directory: Path) -> list[Path]:
    """The model's safetensors files: the single file, or the shards its index names."""
    root = Path(directory)
    if (root / INDEX).is_file():
        names = sorted(set(json.loads((root / INDEX).read_text())["weight_map"].values()))
        return [root / n for n in names]
    return [root / SINGLE]


def stored_dtype(directory: Path) -> torch.dtype | None:
    """The floating dtype most of a model's stored weights have (by element count), read from the
    safetensors headers alone; None when the directory has no safetensors weights."""
    from safetensors import safe_open

    counts: dict[torch.dtype, int] = {}
    for path in weight_files(directory):
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                dtype = FLOAT_DTYPES.get(piece.get_dtype())
                if dtype is not None:
                    n = 1
                    for d in piece.get_shape():
                        n *= d
                    counts[dtype] = counts.get(dtype, 0) + n
    return max(counts, key=counts.get) if counts else None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        out.update(load_file(str(path)))
    return out


def remove_weights(directory: Path) -> None:
    """Delete the model's safetensors file(s) and index (an adapter-only export keeps none)."""
    root = Path(directory)
    for p in [root / SINGLE, root / INDEX, *root.glob("model-*-of-*.safetensors")]:
        if p.exists() and (p.name in (SINGLE, INDEX) or SHARD_RE.match(p.name)):
            p.unlink()
