"""Our data-parallel path: no DDP wrapper, one bucketed gradient all-reduce per optimizer step.

Gradients are summed after all micro-batches and cached-MNRL replays, which gives one sync per
step by construction, lets ranks with an empty slice of a ragged batch take part, and needs no
unused-parameter handling. The word-embedding gradient is reduced only over the rows some rank
touched (a small share of the vocabulary per step).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from ..outputs import checkpoint as ckpt
from ..distributed import DistState, all_reduce_grads
from ..model.lora import ADAPTER_FILE, adapter_state, is_lora, load_adapter_state
from . import StepResult
from .optim import make_adamw, step_unless

# training_state/: the fp32 weights, beside a model stored in half precision (model.save_dtype)
MASTER_FILE = "master_weights.safetensors"


class AutogradBackward:
    """How gradients reach the parameters on the all-reduce path: autograd, with the fp16 GradScaler
    if any; our bucketed all-reduce sums them afterwards. (DeepSpeedBackend has the same three methods.)"""

    def __init__(self, scaler=None):
        self.scaler = scaler

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def backward_cached(self, loss: torch.Tensor) -> None:
        """Cached MNRL, loss -> cached embeddings (no parameters involved); replays inherit the scale."""
        self.backward(loss)

    def backward_outputs(self, outputs: torch.Tensor, grad: torch.Tensor) -> None:
        outputs.backward(grad)


class AllReduceBackend:
    """backward / backward_cached / backward_outputs: autograd (with fp16's GradScaler), the step's
    ``AutogradBackward``; the gradients are summed over ranks in ``step``."""

    def __init__(self, cfg, state: DistState, encoder, precision, groups: list[dict], make_scheduler):
        self.cfg, self.state, self.encoder = cfg, state, encoder
        self.model = encoder
        self.collective_eval = False  # an evaluation forward needs no other rank
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        self.optimizer = make_adamw(groups, cfg.training.lr)
        self.scheduler = make_scheduler(self.optimizer)
        self.scaler = precision.grad_scaler()
        self.grads = AutogradBackward(self.scaler)
        self.backward, self.backward_cached = self.grads.backward, self.grads.backward_cached
        self.backward_outputs = self.grads.backward_outputs
        emb = encoder.transformer.get_input_embeddings()
        sparse = state.enabled and emb is not None and emb.weight.requires_grad
        self.word_embeddings = emb.weight if sparse else None
        self.used_rows = torch.zeros(emb.weight.shape[0], dtype=torch.bool) if sparse else None

    def note_batch(self, batch) -> None:
        if self.used_rows is not None:
            for f in batch.features:
                self.used_rows[f["input_ids"].unique()] = True

    def rescale_grads(self, factor: float) -> bool:
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(factor)
        return True

    # -- the optimizer step -----------------------------------------------------------------------

    def step(self, loss: torch.Tensor, timer=None) -> StepResult:
        """Sum the gradients over ranks, clip, and step unless the loss or the gradients are not
        finite: decided on the device (fused AdamW's found-inf flag), never read back here; fp16's
        scaler lowers its scale after an overflow, as always."""
        sparse = (self.word_embeddings, self.used_rows) if self.used_rows is not None else None
        all_reduce_grads(self.params, self.state, self.cfg.distributed.bucket_mb, timer, sparse)
        if self.used_rows is not None:
            self.used_rows.zero_()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.training.max_grad_norm
        if max_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        else:
            norms = [torch.linalg.vector_norm(p.grad) for p in self.params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(norms))
        bad = ~torch.isfinite(grad_norm) | ~torch.isfinite(torch.as_tensor(loss, device=grad_norm.device))
        scale = None
        if self.scaler is not None:
            # GradScaler keeps its scale on the device (``_scale``): before and after, read at the log step
            before = self.scaler._scale.detach().clone()
            step_unless(self.optimizer, bad)
            self.scaler.update()  # from the overflow it found while unscaling
            scale = (before, self.scaler._scale.detach().clone())
        else:
            step_unless(self.optimizer, bad)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm.detach(), ~bad, scale)

    # -- state ------------------------------------------------------------------------------------

    def save(self, directory: Path, is_main: bool, model_dtype: torch.dtype = torch.float32) -> None:
        """The optimizer, schedule (and fp16 scaler) state; the adapters under LoRA; and when the
        checkpoint's model is stored in half precision (``model_dtype``), the trained weights as
        fp32 too (``MASTER_FILE``): a resume continues from the weights training held, exactly."""
        if not is_main:
            return
        from safetensors.torch import save_file

        lora = is_lora(self.encoder.transformer)
        if lora:  # the adapters: resume continues them exactly
            save_file(adapter_state(self.encoder.transformer), str(directory / ADAPTER_FILE))
        if model_dtype != torch.float32:
            master = {f"st_dense.{k}": v.detach().cpu().clone() for k, v in self.encoder.st_dense.state_dict().items()}
            if not lora:  # under LoRA the base is frozen: it comes from model.name_or_path again
                master.update(self.encoder.state_for_saving())
            if master:
                save_file(master, str(directory / MASTER_FILE), metadata={"format": "pt"})
        ckpt.save_tensors(self.optimizer.state_dict(), directory / "optimizer.pt")
        ckpt.save_tensors(self.scheduler.state_dict(), directory / "scheduler.pt")
        if self.scaler is not None:
            ckpt.save_tensors(self.scaler.state_dict(), directory / "scaler.pt")

    def load(self, checkpoint: Path, directory: Path) -> None:
        from safetensors.torch import load_file

        master = directory / MASTER_FILE
        weights = load_file(str(master)) if master.is_file() else self.encoder.saved_weights(checkpoint)
        if is_lora(self.encoder.transformer):  # base weights as loaded; the adapters (and any Dense
            # head, trained in full) from the checkpoint
            load_adapter_state(self.encoder.transformer, load_file(str(directory / ADAPTER_FILE)))
            self.encoder.st_dense.load_state_dict({k.removeprefix("st_dense."): v for k, v in weights.items()
                                                   if k.startswith("st_dense.")}, strict=True)
        else:
            self.encoder.load_weights(weights)
        self.optimizer.load_state_dict(ckpt.load_tensors(directory / "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_tensors(directory / "scheduler.pt"))
        if self.scaler is not None and (directory / "scaler.pt").exists():
            self.scaler.load_state_dict(ckpt.load_tensors(directory / "scaler.pt"))

    def weight_parts(self):
        return None  # the encoder itself holds the full weights

    def evaluating(self):
        return nullcontext(self.encoder)

    def describe(self) -> dict:
        return {"backend": "ddp", "world_size": self.state.world_size}
