"""Precision in one place: fp32, bf16 or fp16, what it needs of the device, the autocast every
forward runs under, fp16's loss scaling, and the matching DeepSpeed settings."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ..config import ConfigError

log = logging.getLogger("dist_embed")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str = "cpu"

    @classmethod
    def for_device(cls, name: str, device: torch.device) -> "Precision":
        """The precision ``training.precision`` names, checked against the device (ConfigError)."""
        if name == "fp16" and device.type != "cuda":
            raise ConfigError("training.precision=fp16 needs a CUDA GPU (its loss scaling); this worker runs on "
                              f"{device.type}. Use training.precision=bf16 (autocast works on CPU) or fp32")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("training.precision=bf16 is not supported by this GPU; use fp16 or fp32")
        if name == "bf16" and device.type == "cpu":
            cap = torch.backends.cpu.get_cpu_capability().upper()
            if "BF16" not in cap and "AMX" not in cap and cap != "AVX512":
                log.warning("training.precision=bf16 on a CPU without native bf16 matrix instructions (torch "
                            "reports %s): bf16 matmuls are emulated and can be ~100x slower than fp32 here", cap)
        return cls(name, device.type)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: fp32, no autocast)."""
        return DTYPES[self.name]

    def autocast(self):
        """The context every training forward runs in: weights stay fp32, matmuls run in the dtype."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 only: dynamic loss scaling (fp16 gradients underflow without it)."""
        return torch.amp.GradScaler("cuda") if self.name == "fp16" else None

    def fill_deepspeed(self, ds: dict, origin: str) -> None:
        """DeepSpeed's bf16/fp16 sections from ours ("auto" filled; a contradiction is a ConfigError)."""
        for name in ("bf16", "fp16"):
            section = ds.setdefault(name, {})
            on = self.name == name
            if section.get("enabled", "auto") == "auto":
                section["enabled"] = on
            elif bool(section["enabled"]) != on:
                raise ConfigError(f"{origin}: {name}.enabled: {section['enabled']!r} contradicts "
                                  f"training.precision={self.name}; set it to \"auto\"")
