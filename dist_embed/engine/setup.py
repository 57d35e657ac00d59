"""Setup: everything a training run is made of, built complete from the config (the loop is in
loop.py): the output directory claimed, the precision checked, the losses (with their guide
models), the model as it will train (attention switched for its layout, compiled), the data plan
and sizes, a checkpoint to resume from, the schedule and the backend, the evaluator and the
outputs, in that order, so that a bad setting fails before heavy work. Nothing is patched onto the
run after it is built; the loop moves only its ``Position``.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backends import Backend, make_backend, start_backend
from ..config import Config, ConfigError, dump_config
from ..data.layout import LayoutSpec
from ..distributed import DistState, broadcast_object
from ..evaluation.evaluator import Evaluator
from ..mining.refresh import Refresher
from ..model.encoder import Encoder, ModelError
from ..model.layout_choice import choose_layout
from ..outputs.run_dir import CLAIMED_ENV, RunComplete, claim, start_afresh
from ..outputs.run_outputs import RowLog, RunOutputs, StepBeacon
from ..outputs.tracking import MetricsWriter, rss_mib
from .health import HealthMonitor
from .losses import GuideFilter, Loss, build_loss
from .schedule import Schedule, lambda_lr
from .precision import Precision
from .step import Embedder
from .train_data import TrainData, build_plan, dataset_sizes, shard_data

log = logging.getLogger("dist_embed.train")


@dataclass
class Position:
    """Where the run stands; saved in every checkpoint (the only part of a run the loop changes)."""

    step: int = 0
    epoch: int = 0
    samples: float = 0.0  # the schedule's position (see optim.Schedule)
    samples_per_step: float = 0.0  # global batch x grad_accum at the run's start; kept on resume
    planner_state: dict | None = None  # the data position: the planner's state after the last batch
    history: list = field(default_factory=list)  # eval results, for best-checkpoint and the model card
    logged_until: int = -1  # the last step a stopped run had logged (W&B has it already; -1: none)
    dataset_rows: list = field(default_factory=list)  # rows trained from each dataset, whole run
    window: dict | None = None  # the losses since the last log step (Window.losses), for the checkpoint
    worlds: list = field(default_factory=list)  # [first step, world size, global batch] per stretch of the run
    negatives: dict = field(default_factory=dict)  # the last hard-negative refresh: {"step", "tables": {name: dir}}


@dataclass(frozen=True)
class Run:
    cfg: Config
    state: DistState
    encoder: Encoder
    backend: Backend
    data: TrainData
    losses: tuple[Loss, ...]  # each dataset's loss
    embedder: Embedder
    schedule: Schedule
    health: HealthMonitor
    evaluator: Evaluator
    outputs: RunOutputs
    pos: Position
    save_dtype: torch.dtype = torch.float32  # checkpoints' and final/'s weights (model.save_dtype)
    refresher: Refresher | None = None  # hard negatives re-mined during training (data.hard_negatives)

    @property
    def flops_per_token(self) -> tuple[float, float]:
        """Training FLOPs per token, 6 x parameters (forward 2, backward 4): all of them, and all
        but the embedding tables (whose "matmul" is a lookup): the two MFU figures' numerators."""
        total = sum(p.numel() for p in self.encoder.parameters())
        tables = sum(m.weight.numel() for m in self.encoder.modules() if isinstance(m, torch.nn.Embedding))
        return 6.0 * total, 6.0 * (total - tables)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: exact for max_steps runs at one world size, else an
        estimate (the run ends when the schedule's samples are done, or with the last epoch)."""
        left = max(self.schedule.total - self.pos.samples, 0.0)
        return self.pos.step + math.ceil(left / (self.data.global_batch * self.cfg.training.grad_accum) - 1e-9)


def enable_checkpointing(transformer) -> None:
    """Non-reentrant activation checkpointing (works with inputs that need no grad and restores the
    RNG for the recompute); transformers >= 5.x names it activation_checkpointing_enable."""
    kwargs = {"use_reentrant": False}
    if hasattr(transformer, "activation_checkpointing_enable"):
        transformer.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        transformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_encoder(cfg: Config, state: DistState) -> Encoder:
    m = cfg.model
    try:
        encoder = Encoder.from_pretrained(m.name_or_path, pooling=m.pooling, normalize=m.normalize,
                                          max_seq_length=m.max_seq_length, dropout=m.dropout,
                                          trust_remote_code=m.trust_remote_code, revision=m.revision)
    except (ModelError, FileNotFoundError) as e:
        raise ConfigError(f"model.name_or_path: {e}") from None
    encoder.to(state.device).train()
    if cfg.training.fast_dropout and state.device.type == "cpu":
        from ..model.fast_dropout import use_fast_dropout

        use_fast_dropout(encoder.transformer)
    if m.lora is not None:
        from ..model.lora import apply_lora

        # the adapters' random init must be the same on every rank (the ranks' RNGs differ, for dropout)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.training.seed)
            encoder.transformer = apply_lora(encoder.transformer, m.lora)
    if cfg.training.gradient_checkpointing:
        if not getattr(encoder.transformer, "supports_gradient_checkpointing", False):
            raise ConfigError(f"training.gradient_checkpointing: {type(encoder.transformer).__name__} does not "
                              "support it")
        enable_checkpointing(encoder.transformer)
    return encoder


SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_dtype(setting: str, encoder: Encoder) -> torch.dtype:
    """``model.save_dtype``: as set, or "auto": the starting checkpoint's dtype (fp32 unless it is
    bf16 or fp16). The weights train in fp32 either way."""
    if setting != "auto":
        return SAVE_DTYPES[setting]
    return encoder.source_dtype if encoder.source_dtype in SAVE_DTYPES.values() else torch.float32


def loader_workers(setting, state: DistState) -> int:
    """``data.num_workers``: as set, or "auto": 0 on CPU (its cores compute the step), on a GPU up
    to 4 per rank from this node's CPUs (tokenizing and laying out batches off the training thread)."""
    if setting != "auto":
        return int(setting)
    if state.device.type != "cuda":
        return 0
    per_rank = (os.cpu_count() or 2) // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    return max(1, min(4, per_rank - 1))


def build_losses(cfg: Config, state: DistState) -> tuple[Loss, ...]:
    """Each dataset's loss object; a guide model (frozen, whole on every rank, it only scores
    candidates) is loaded once per path, before the backend starts (after it, ZeRO-3 would build it
    partitioned)."""
    guides: dict[str, GuideFilter] = {}
    losses = []
    for ds in cfg.datasets:
        lc = ds.loss
        guide = None
        if lc.guide_model:
            if lc.guide_model not in guides:
                try:
                    model = Encoder.from_pretrained(lc.guide_model)
                except (ModelError, FileNotFoundError) as e:
                    raise ConfigError(f"loss.guide_model: {e}") from None
                guides[lc.guide_model] = model.to(state.device).eval().requires_grad_(False)
            guide = GuideFilter(guides[lc.guide_model], lc.guide_model, lc.guide_margin, lc.guide_margin_strategy)
        gather = lc.gather_across_devices if lc.gather_across_devices is not None else state.enabled
        losses.append(build_loss(lc, gather, guide))
    return tuple(losses)


def claim_output_dir(cfg: Config, state: DistState, resume: str | None, overwrite: bool) -> None:
    """Rank 0 claims the output_dir unless a launcher of ours did (every rank stops with its line)."""
    if os.environ.get(CLAIMED_ENV) == "1":
        return
    outcome = None
    if state.is_main:
        try:
            claim(cfg.output_dir, resume, overwrite)
        except (ConfigError, RunComplete) as e:
            outcome = (type(e).__name__, str(e))
    outcome = broadcast_object(outcome, state)
    if outcome:
        raise (RunComplete if outcome[0] == "RunComplete" else ConfigError)(outcome[1])


def build_model(cfg: Config, state: DistState, precision: Precision) -> tuple[Encoder, LayoutSpec]:
    """The encoder as it will train, and how batches are laid out for it: loaded, its attention
    switched for the layout (``choose_layout``, with the precision's word on the varlen kernel),
    compiled if asked. All of it before the backend holds the parameters (the optimizer and
    DeepSpeed's engine see the final modules)."""
    t = cfg.training
    encoder = load_encoder(cfg, state)
    too_wide = sorted({dim for ds in cfg.datasets for dim in ds.loss.matryoshka_dims or [] if dim > encoder.dim})
    if too_wide:
        raise ConfigError(f"loss.matryoshka_dims: {too_wide} wider than the model's {encoder.dim}-dimensional "
                          "embeddings")
    layout = choose_layout(encoder, t, precision.varlen(encoder.transformer.config))
    if t.compile:
        if cfg.distributed.backend == "deepspeed":
            raise ConfigError("training.compile: not with distributed.backend=deepspeed (its hooks wrap the modules)")
        compile_encoder(encoder)
    return encoder, layout


def compile_encoder(encoder: Encoder, **options) -> None:
    """``training.compile``: the transformer compiled in place (the weights keep their names), with
    dynamic shapes, so a batch's token count or longest text never forces a recompile (tests count
    them). ``options``: more of torch.compile's (tests pick a backend)."""
    encoder.transformer.compile(dynamic=True, **options)


def plan_data(cfg: Config, state: DistState, encoder: Encoder, layout: LayoutSpec, resume: str | None,
              allow_data_change: bool, allow_fresh_start: bool):
    """The data plan, each dataset's size and the checkpoint to resume from (None: a fresh start,
    which resets the output directory): -> (TrainData, the checkpoint or None)."""
    from . import resume as resuming

    out, d, t = Path(cfg.output_dir), cfg.data, cfg.training
    global_batch = t.batch_size * state.world_size
    plan = build_plan(cfg, global_batch, encoder.tokenizer, encoder.max_seq_length, state.world_size)
    saved = resuming.read_checkpoint(out / "checkpoints", resume, plan, allow_data_change, allow_fresh_start) \
        if resume else None
    if saved is None and state.is_main:
        start_afresh(out)
    if saved and saved.plane != plan.specs[0].plane:  # a resume keeps its checkpoint's plane
        if cfg.data.plane != "auto":
            raise ConfigError(f"--resume {saved.path}: its data was planned by the {saved.plane} plane, this run "
                              f"asks for data.plane={cfg.data.plane}; use auto (or {saved.plane}) to continue it")
        plan = build_plan(cfg, global_batch, encoder.tokenizer, encoder.max_seq_length, state.world_size, saved.plane)
    sharding = None
    if plan.specs[0].plane == "sharded":
        same = saved is not None and saved.data_unchanged
        sharding, scanned = shard_data(plan, cfg, state, saved.data.get("pieces") if same else None,
                                       saved.planner_states if saved and saved.world_size != state.world_size else None,
                                       loader_workers(d.read_workers, state))
        sizes = saved.sizes if same else scanned
    else:
        sizes = saved.sizes if saved and saved.data_unchanged else dataset_sizes(plan, cfg)
    rows = plan.epoch_rows(sizes, global_batch)
    if t.max_steps <= 0 and not rows:
        raise ConfigError("data.train has a stream of unknown length: set training.max_steps")
    if d.sampler == "proportional" and len(sizes) > 1 and None in sizes:
        raise ConfigError("data.sampler=proportional needs every dataset's size; a hub stream has none: set its "
                          "max_rows, streaming: false, or use sampler round_robin/weighted")
    num_workers = loader_workers(d.num_workers, state)
    if num_workers and all(s.source.token_ids for s in plan.specs):
        # padding ids in the training process costs less than shipping the rows to a worker and back
        log.info("data.num_workers=%d not used: every dataset is pre-tokenized, batches are padded in-process",
                 num_workers)
        num_workers = 0
    prefetch = d.prefetch if d.prefetch != "auto" else state.device.type == "cuda"
    data = TrainData(plan, tuple(sizes), rows, global_batch, num_workers, cfg.distributed.balance_ranks, layout,
                     sharding, prefetch=bool(prefetch))
    return data, saved


def build_outputs(cfg: Config, state: DistState, backend: Backend, data: TrainData, losses: tuple[Loss, ...],
                  tokenizer, pos: Position, rss_before_model: float) -> RunOutputs:
    """Rank 0 writes the config (and DeepSpeed's, every "auto" filled) and opens W&B; every rank
    gets its row log hook; the datasets are described for the model card."""
    out = Path(cfg.output_dir)
    wandb = None
    if state.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        if getattr(backend, "config", None) is not None:  # what DeepSpeed ran with, every "auto" filled
            (out / "deepspeed_config.json").write_text(json.dumps(backend.config, indent=2) + "\n")
        if cfg.logging.wandb is not None and cfg.logging.wandb.mode != "disabled":
            from ..outputs.wandb_run import WandbRun

            wandb = WandbRun(cfg.logging.wandb, out, cfg.to_dict(), state.world_size, skip_until=pos.logged_until)
    infos = ()
    if state.is_main:
        from ..outputs.model_card import describe_datasets

        infos = tuple(describe_datasets(cfg, data.plan, list(data.sizes), losses, tokenizer))
    return RunOutputs(out, MetricsWriter(out / "metrics.jsonl" if state.is_main else None, wandb), wandb,
                      tuple(h for h in (RowLog.from_env(out, state.rank), StepBeacon.from_env()) if h is not None),
                      infos, rss_before_model)


def build_run(cfg: Config, state: DistState, resume: str | None = None, *, allow_data_change: bool = False,
              allow_fresh_start: bool = False, overwrite: bool = False) -> Run:
    """The whole run, in the order that fails fast: the output directory, precision, losses, the
    backend's start, the model (``build_model``), the data and the checkpoint (``plan_data``), the
    schedule and the backend, the restored state, the outputs (``build_outputs``)."""
    from . import resume as resuming

    claim_output_dir(cfg, state, resume, overwrite)  # before any heavy work
    t = cfg.training
    precision = Precision.for_device(t.precision, state.device)
    torch.manual_seed(t.seed + state.rank)
    random.seed(t.seed + state.rank)
    losses = build_losses(cfg, state)
    started = start_backend(cfg, state, precision)
    rss_before_model = rss_mib()
    encoder, layout = build_model(cfg, state, precision)
    data, saved = plan_data(cfg, state, encoder, layout, resume, allow_data_change, allow_fresh_start)
    pos = Position(samples_per_step=float(data.global_batch * t.grad_accum), dataset_rows=[0] * len(data.names))
    if saved:
        pos.samples_per_step = saved.meta["schedule"]["samples_per_step"]  # the schedule is the run's
    schedule = Schedule.for_run(t, pos.samples_per_step, data.rows)
    if saved and not saved.data_unchanged and t.max_steps <= 0:
        schedule = resuming.schedule_on_changed_data(saved, t, data.rows, schedule)
    backend = make_backend(cfg, state, encoder, precision,
                           lambda opt: lambda_lr(opt, lambda: schedule.factor(pos.samples)), started)
    warmup_steps = math.ceil(schedule.warmup / pos.samples_per_step)
    health = HealthMonitor(cfg.health.max_bad_steps, cfg.health.plateau_steps, cfg.health.collapse_std,
                           warmup_steps=warmup_steps)
    dims = sorted({dim for loss in losses for dim, _ in getattr(loss, "dims", ()) if dim < encoder.dim}, reverse=True)
    evaluator = Evaluator.from_config(cfg.eval, dims)  # on every rank: each embeds a share of the texts
    if saved:
        resuming.restore(saved, backend, pos, state, Path(cfg.output_dir), data.global_batch)
    if not pos.worlds or pos.worlds[-1][1:] != [state.world_size, data.global_batch]:
        pos.worlds.append([pos.step + 1, state.world_size, data.global_batch])  # a chain of runs: the card says each
    refresher = None
    if cfg.data.hard_negatives is not None:  # every rank reads the data sets' texts once
        refresher = Refresher.for_run(cfg, data.plan, Path(cfg.output_dir))
        refresher.restore(pos, saved.path.parent.parent if saved else None, allow_data_change, state)
    outputs = build_outputs(cfg, state, backend, data, losses, encoder.tokenizer, pos, rss_before_model)
    run = Run(cfg, state, encoder, backend, data, losses, Embedder(layout.kind, t.length_sorted_chunks,
              precision.autocast), schedule, health, evaluator, outputs, pos, save_dtype(cfg.model.save_dtype, encoder),
              refresher)
    # the model, the modules and the config live as long as the run: move them out of the garbage
    # collector's generations, so its full collections (triggered by the data pipeline's churn of
    # rows) stop walking the long-lived objects each time
    gc.freeze()
    gathered = any(getattr(getattr(loss, "inner", loss), "gather", False) for loss in losses) and state.enabled
    log.info("world size %d, device %s, %s rows (%s data plane), global batch %d, about %d optimizer steps "
             "(warm-up %d), precision %s (fp32 weights, saved as %s), %s layout, loss %s%s", state.world_size,
             state.device, data.rows, data.plan.specs[0].plane, data.global_batch, run.total_steps, warmup_steps,
             t.precision, str(run.save_dtype).removeprefix("torch."), layout.kind,
             ", ".join(sorted({ds.loss.name for ds in cfg.datasets})),
             " with negatives gathered across ranks" if gathered else "")
    return run
