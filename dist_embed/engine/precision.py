"""Precision in one place: fp32, bf16 or fp16, what it needs of the device, the autocast every
forward runs under, fp16's loss scaling, the matching DeepSpeed settings, and whether flash
attention's varlen kernel can run (the one decision of it: ``Precision.varlen``)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..families import head_dim
from ..model.varlen import KERNEL_DTYPES, VarlenChoice

log = logging.getLogger("dist_embed")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FLASH_MIN_CAPABILITY = (8, 0)  # torch's flash attention kernels: Ampere and newer
FLASH_MAX_HEAD_DIM = 256


def varlen_kernel_problem(device_type: str, dtype: torch.dtype | None, head_size: int,
                          capability: tuple[int, int] | None = None) -> str | None:
    """Why flash attention's varlen kernel cannot take these inputs (None: it can): a pure function
    of the device, the autocast dtype and the head size, so tests decide it without a GPU."""
    if device_type != "cuda":
        return f"flash attention's varlen kernel runs on CUDA only, not {device_type}"
    if dtype not in KERNEL_DTYPES:
        return "flash attention's varlen kernel takes bf16/fp16, and training.precision=fp32 computes in fp32"
    if capability is not None and tuple(capability) < FLASH_MIN_CAPABILITY:
        return f"flash attention needs a GPU of compute capability >= 8.0, this one is {capability[0]}.{capability[1]}"
    if head_size % 8 or head_size > FLASH_MAX_HEAD_DIM:
        return f"flash attention's varlen kernel takes head sizes that are multiples of 8 up to " \
               f"{FLASH_MAX_HEAD_DIM}; this model's heads have {head_size}"
    return None


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str = "cpu"
    capability: tuple[int, int] | None = None  # a CUDA device's compute capability (None: unknown, or CPU)

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
        capability = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
        return cls(name, device.type, capability)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: fp32, no autocast)."""
        return DTYPES[self.name]

    def autocast(self):
        """The context every training forward runs in: weights stay fp32, matmuls run in the dtype."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def varlen(self, model_config) -> VarlenChoice:
        """What unpadded tokens of this model run on here: the kernel where it can run; elsewhere
        the per-text reference attention on CPU (its host reads cost nothing there), and on CUDA
        nothing (a refusal, one line): the reference would read back from the GPU in every layer."""
        problem = varlen_kernel_problem(self.device_type, self.dtype, head_dim(model_config), self.capability)
        if problem is None:
            return VarlenChoice(kernel=True)
        if self.device_type == "cpu":
            return VarlenChoice(kernel=False)
        return VarlenChoice(kernel=False, refusal=f"training.layout=unpadded: {problem}; use training.layout=auto "
                                                  "(padded or packed texts)")

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 only: dynamic loss scaling (fp16 gradients underflow without it). fp16 runs on CUDA
        (``for_device``); the scaler follows the precision's device so tests can run its path on CPU."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None

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
