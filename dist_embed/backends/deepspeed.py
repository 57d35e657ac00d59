"""DeepSpeed ZeRO (stages 1-3, optional offload) through accelerate, behind the same loop as our all-reduce path.

What stays ours: the global batch plan, gathered negatives (our autograd all-gather), the losses,
the LR schedule, health checks, the checkpoint layout. What DeepSpeed owns: gradient reduction and
partitioning, the optimizer step (and its fp16 loss scaling), clipping, and its sharded state.

Three details make it exact (tests compare against the all-reduce path):
- our losses are "this rank's share of the global mean", so the gradients must be SUMMED over ranks;
  DeepSpeed averages, so every loss handed to it is multiplied by the world size;
- one optimizer step runs several backward passes (grad accumulation, cached-MNRL replays), so the
  engine runs with ``managed_gradient_accumulation: false`` (``step()`` is the boundary) and every
  forward goes through the engine (under ZeRO-3 that is what makes a second backward accumulate
  into the gradient partitions instead of overwriting them);
- "auto" values are filled from our config, so the two can never disagree.
"""
from __future__ import annotations

import copy
import datetime
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..outputs import checkpoint as ckpt
from ..config import Config, ConfigError
from ..distributed import DistState
from .optim import make_adamw
from . import StepResult

log = logging.getLogger(__name__)

STATE_TAG = "deepspeed"  # training_state/deepspeed/: the engine's own (sharded) checkpoint
BETAS, EPS = [0.9, 0.999], 1e-8  # torch AdamW defaults, what the all-reduce path uses


def _set_default_extension_dir() -> None:
    # DeepSpeed JIT-builds small ops (e.g. its CPU shared-memory all-reduce) on first use; keep the
    # build cache in one place we control instead of wherever the first worker's HOME points.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dist_embed"
                              / "torch_extensions"))


def read_ds_config(path: str) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"distributed.deepspeed_config: file not found: {p}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a JSON object")
    return data


def fill_ds_config(raw: dict, cfg: Config, world_size: int, hidden_size: int, precision,
                   origin: str = "deepspeed config") -> dict:
    """Replace every ``"auto"`` with the value our config implies; refuse values that contradict it.

    Filled: batch sizes, gradient accumulation, clipping, precision, optimizer lr/betas/eps/weight
    decay, ZeRO bucket sizes (from the hidden size, as accelerate does). A ``scheduler`` section is
    refused: the warm-up/decay schedule is ours (training.warmup_*), shared with the all-reduce path.
    """
    t = cfg.training
    ds = copy.deepcopy(raw)
    if "scheduler" in ds:
        raise ConfigError(f"{origin}: scheduler: remove this section; dist_embed applies its own linear warm-up "
                          "and decay (training.warmup_steps / warmup_ratio) under every backend")
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(f"{origin}: zero_optimization.stage: expected 1, 2 or 3 (got {stage!r}); "
                          "for plain data parallelism use distributed.backend=ddp")
    want = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm or 0.0,
    }
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif have != value:
            raise ConfigError(f"{origin}: {key}: {have!r} contradicts the training config, which implies {value!r}; "
                              f"set it to \"auto\"")
    precision.fill_deepspeed(ds, origin)  # the run's Precision (engine/precision.py owns the rules)
    if "optimizer" in ds:
        opt = ds["optimizer"]
        if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
            raise ConfigError(f"{origin}: optimizer.type: {opt.get('type')!r} is not supported; use AdamW "
                              "(or drop the section to use dist_embed's fused AdamW)")
        params = opt.setdefault("params", {})
        for key, value in (("lr", t.lr), ("betas", BETAS), ("eps", EPS), ("weight_decay", t.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    # a transformer layer has ~12 H^2 weights. DeepSpeed's defaults for the last two (1e9) keep
    # every gathered weight from the forward until its backward when the model has fewer than 1e9
    # parameters, i.e. the whole model on every rank during the step: bound them to a few layers
    layer = 12 * hidden_size * hidden_size
    sizes = {"reduce_bucket_size": hidden_size * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 10 * hidden_size,
             "stage3_max_live_parameters": 3 * layer, "stage3_max_reuse_distance": 2 * layer}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if stage == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
        if zero.get("overlap_comm"):
            raise ConfigError(f"{origin}: zero_optimization.overlap_comm: must be false with stage 3 here (we "
                              "drive several backward passes per step, which DeepSpeed overlaps only at stage 2)")
    if ds.get("managed_gradient_accumulation", False):
        raise ConfigError(f"{origin}: managed_gradient_accumulation: must be false (dist_embed decides where an "
                          "optimizer step ends)")
    ds["managed_gradient_accumulation"] = False
    ds.setdefault("steps_per_print", 10**9)  # we log; DeepSpeed's own per-step prints would duplicate it
    ds.setdefault("wall_clock_breakdown", False)
    left = _auto_keys(ds)
    if left:
        raise ConfigError(f"{origin}: no value to fill \"auto\" in {', '.join(left)}; set them explicitly")
    return ds


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


def _hidden_size(cfg: Config) -> int | None:
    """The model's hidden size, from its config alone (ZeRO bucket sizes are set from it)."""
    from transformers import AutoConfig

    from ..model.encoder import resolve_model_path

    try:
        conf = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name_or_path),
                                          trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    except (OSError, ValueError):
        return None  # loading the model reports what is wrong with it, in one line
    return getattr(conf, "hidden_size", None) or getattr(conf, "d_model", None)


def _fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """ZeRO-3 gathers and frees every layer's weights each forward and backward. glibc raises its
    mmap threshold after such frees (up to 32 MB), so later layer-sized buffers come from the heap,
    which fragments and is not given back: measured peak RSS per rank 8.0 GB -> 5.9 GB with the
    threshold fixed at 1 MB (334M-parameter model, 2 ranks, CPU). Host memory only; a no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class DeepSpeedSetup:
    """The filled config and accelerate's Accelerator, made BEFORE the model: from then on, under
    ZeRO-3, transformers builds every model partitioned across the ranks (DeepSpeed's ``zero.Init``
    through accelerate's weak reference to the config) and loads its checkpoint module by module
    (rank 0 reads, the others only get their partitions). So no rank ever holds the whole model."""

    def __init__(self, cfg: Config, state: DistState, precision):
        _set_default_extension_dir()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        from accelerate import Accelerator, DeepSpeedPlugin
        from accelerate.utils import InitProcessGroupKwargs

        path = cfg.distributed.deepspeed_config
        self.path = path
        self.config = fill_ds_config(read_ds_config(path), cfg, state.world_size, _hidden_size(cfg) or 768,
                                     precision, origin=path)
        self.stage = int(self.config["zero_optimization"]["stage"])
        if self.stage == 3:
            _fixed_mmap_threshold()
        backend = "nccl" if state.device.type == "cuda" else "gloo"
        # accelerate keeps its state in process-wide singletons; a process trains one model, so
        # one Accelerator per process is what it expects
        self.accelerator = Accelerator(
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=self.config, zero3_init_flag=self.stage == 3),
            kwargs_handlers=[InitProcessGroupKwargs(backend=backend,
                                                    timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))])


class DeepSpeedBackend:
    """The engine plus the few operations the trainer needs from it."""

    def __init__(self, setup: DeepSpeedSetup, cfg: Config, state: DistState, encoder, param_groups: list[dict],
                 make_scheduler):
        from accelerate.utils import DummyOptim, DummyScheduler

        self.state = state
        self.config, self.stage, self.accelerator = setup.config, setup.stage, setup.accelerator
        # under ZeRO-3 an evaluation forward gathers each layer from all ranks: every rank runs it
        self.collective_eval = self.stage == 3
        if "optimizer" in self.config:  # DeepSpeed builds the optimizer (e.g. torch AdamW via torch_adam)
            optimizer = DummyOptim(param_groups, lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
            scheduler = DummyScheduler(optimizer, lr_scheduler_callable=make_scheduler)
        else:  # our fused AdamW, wrapped by ZeRO
            optimizer = make_adamw(param_groups, cfg.training.lr)
            scheduler = make_scheduler(optimizer)
        self.engine, self.optimizer, scheduler = self.accelerator.prepare(encoder, optimizer, scheduler)
        self.model = self.engine  # every training forward goes through the engine
        # the schedule object itself (accelerate wraps it); DeepSpeed steps it only if it was handed over
        self.scheduler = getattr(scheduler, "scheduler", scheduler)
        self._engine_steps_scheduler = self.engine.lr_scheduler is not None
        self.world_size = state.world_size
        log.info("DeepSpeed ZeRO stage %d (%s), micro batch %d, grad accumulation %d, optimizer %s", self.stage,
                 setup.path, self.config["train_micro_batch_size_per_gpu"], self.config["gradient_accumulation_steps"],
                 type(self.engine.optimizer).__name__)

    # -- the step -------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """A loss that depends on the parameters (our losses are shares of a global mean: x world)."""
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def backward_cached(self, loss: torch.Tensor) -> None:
        """Cached MNRL, loss -> cached embeddings: no parameters involved, so plain autograd."""
        loss.backward()

    def backward_outputs(self, outputs: torch.Tensor, grad: torch.Tensor) -> None:
        """Backpropagate a known gradient w.r.t. ``outputs`` (cached-MNRL replay)."""
        self.backward((outputs * grad).sum())

    def note_batch(self, batch) -> None:
        pass

    def rescale_grads(self, factor: float) -> bool:
        return False  # the gradients already sit in DeepSpeed's partitions

    def step(self, loss, timer=None) -> StepResult:
        """DeepSpeed reduces, clips and steps; it skips a step whose gradients are not finite (and
        lowers the fp16 loss scale). DeepSpeed reads its overflow flag on the host itself; what we
        add reads nothing back: the norm and whether the loss was finite stay tensors where they
        are (the loop reads them on log steps)."""
        import math

        scale = self.loss_scale()
        self.engine.step()
        if not self._engine_steps_scheduler:
            self.scheduler.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else norm.detach() if isinstance(norm, torch.Tensor) else norm
        if not self.engine.was_step_applied():
            return StepResult(norm, False, (scale, self.loss_scale()) if scale is not None else None)
        return StepResult(norm, torch.isfinite(loss) if isinstance(loss, torch.Tensor) else math.isfinite(loss))

    def loss_scale(self) -> float | None:
        return getattr(self.engine.optimizer, "loss_scale", None) if self.config["fp16"]["enabled"] else None

    # -- weights and checkpoints ----------------------------------------------------------------

    def weight_parts(self):
        """The whole weights, one module at a time, keyed as ``Encoder.state_for_saving``: all ranks
        must iterate it to the end (under ZeRO-3 each module is gathered from every rank); the
        tensors come out on rank 0 only, so no rank ever holds more than one module gathered."""
        self._release_gathered()
        yield from self.engine.module.weight_parts(self.state.is_main)

    @contextmanager
    def evaluating(self):
        """The encoder itself: ZeRO-1/2 keep full weights on every rank; under ZeRO-3 its forward
        gathers one layer at a time, so every rank must run the same forwards (``collective_eval``)."""
        self._release_gathered()
        try:
            yield self.engine.module
        finally:
            self._release_gathered()

    def _release_gathered(self) -> None:
        """ZeRO-3 prefetches the weights the recorded order of modules says come next; forwards in
        another order (evaluation) can leave some gathered or in flight: partition them all again."""
        if self.stage == 3:
            self.engine.empty_partition_cache()

    def save(self, directory: Path, is_main: bool, model_dtype: torch.dtype = torch.float32) -> None:
        """Every rank writes its shards of the optimizer/model state under ``directory`` (they hold
        the fp32 master weights: the model's stored dtype, ``model_dtype``, does not matter here)."""
        self.engine.save_checkpoint(str(directory), tag=STATE_TAG, client_state={}, save_latest=False)
        if is_main:
            ckpt.save_tensors(self.scheduler.state_dict(), directory / "scheduler.pt")

    def load(self, checkpoint: Path, directory: Path) -> None:
        """Weights, optimizer shards and DeepSpeed's step counters, then our schedule."""
        path, _ = self.engine.load_checkpoint(str(directory), tag=STATE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ConfigError(f"{directory}: no DeepSpeed checkpoint found under tag {STATE_TAG!r}")
        self.scheduler.load_state_dict(ckpt.load_tensors(directory / "scheduler.pt"))

    def describe(self) -> dict:
        return {"backend": "deepspeed", "zero_stage": self.stage, "world_size": self.world_size}
