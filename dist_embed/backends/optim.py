"""The optimizer every backend steps: parameter groups (no decay on biases and norms), fused AdamW,
and a step skipped on the device when the loss or the gradients are not finite."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (the usual transformer recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition is flat: its full shape is ds_shape
        (no_decay if ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """Fused AdamW: one kernel for all parameters (far faster than the per-tensor loop, on CPU too:
    docs/performance.md)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # an older torch without the fused CPU kernel
        return torch.optim.AdamW(groups, lr=lr)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip`` (a device bool): fused AdamW reads the flag inside its
    kernel (the found-inf path torch's GradScaler uses), so the host never waits for the value.
    Other optimizers read it back first."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, skip.to(torch.float32).reshape(())
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(skip):
        optimizer.step()
