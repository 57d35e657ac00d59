"""Setup: everything a training run is made of, built from the config (the loop is in train.py).

``build_run`` checks the output directory, seeds, loads the model, plans the data, reads the
checkpoint to resume from (resume.py), fixes the learning-rate schedule, wraps the model in its
backend and opens the trackers, in that order, so that a bad setting fails before heavy work.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backends import Backend, make_backend, start_backend
from ..config import Config, ConfigError, dump_config
from ..data.loader import MixSpec, PlanSpec
from ..data.readers import DataError, Source
from ..data.rows import Schema, manifest_rows, scan
from ..data.shards import shard_urls
from ..distributed import DistState, broadcast_object
from ..evaluation.sts import StsData, load_sts
from ..evaluation.retrieval import load_retrieval
from ..outputs.run_dir import CLAIMED_ENV, claim, start_afresh
from .health import HealthMonitor
from ..model.encoder import Encoder, ModelError
from .optim import DTYPES, Schedule, lambda_lr
from .step import StepSpec
from ..outputs.tracking import MetricsWriter, rss_mib

log = logging.getLogger("dist_embed.train")


@dataclass
class Position:
    """Where the run stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    samples: float = 0.0  # the schedule's position (see optim.Schedule)
    samples_per_step: float = 0.0  # global batch x grad_accum at the run's start; kept on resume
    planner_state: dict | None = None  # the data position: the planner's state after the last batch
    history: list = field(default_factory=list)  # eval results, for best-checkpoint and the model card
    logged_until: int = 0  # the last step a stopped run had logged (W&B has it already)
    dataset_rows: list = field(default_factory=list)  # rows trained from each dataset, whole run


@dataclass
class Run:
    cfg: Config
    state: DistState
    out: Path
    encoder: Encoder
    backend: Backend
    plan: MixSpec
    rows: int | None  # rows per epoch (None: a stream of unknown length)
    sizes: list  # rows of each dataset (None: unknown)
    global_batch: int
    specs: list[StepSpec]  # the step (loss) of each dataset
    schedule: Schedule
    health: HealthMonitor
    metrics: MetricsWriter
    eval_sets: list[StsData]  # loaded on every rank (the texts are embedded across ranks)
    pos: Position
    retrieval_sets: list = field(default_factory=list)  # RetrievalData, loaded on every rank
    wandb: object = None
    num_workers: int = 0  # dataloader workers (0 when every dataset is pre-tokenized: nothing to tokenize)
    row_log: object = None  # DIST_EMBED_LOG_ROW_IDS: per-step row ids of each rank (tests, drills)
    dataset_info: object = None  # for the model card (rank 0)
    rss_before_model: float | None = None  # MiB, this rank, once libraries and process group are up

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: exact for max_steps runs at one world size, else an
        estimate (the run ends when the schedule's samples are done, or with the last epoch)."""
        left = max(self.schedule.total - self.pos.samples, 0.0)
        return self.pos.step + math.ceil(left / (self.global_batch * self.cfg.training.grad_accum) - 1e-9)

    def epoch_progress(self) -> float:
        """Epochs done as a fraction (sentence-transformers logs 0.5 for half an epoch)."""
        done = (self.pos.planner_state or {}).get("rows_done", 0)
        return round(self.pos.epoch + (min(done / self.rows, 1.0) if self.rows else 0.0), 4)


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("training.precision=fp16 needs a CUDA GPU; this worker runs on "
                          f"{device.type}. Use training.precision=bf16 (autocast works on CPU) or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("training.precision=bf16 is not supported by this GPU; use fp16 or fp32")
    if precision == "bf16" and device.type == "cpu":
        cap = torch.backends.cpu.get_cpu_capability()
        if "BF16" not in cap.upper() and "AMX" not in cap.upper() and cap.upper() != "AVX512":
            log.warning("training.precision=bf16 on a CPU without native bf16 matrix instructions (torch reports "
                        "%s): bf16 matmuls are emulated and can be ~100x slower than fp32 here", cap)


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


def dataset_sizes(plan: MixSpec, cfg: Config) -> list[int | None]:
    """Rows of each dataset: from a shard manifest, else one validating pass over local data (bad
    data fails in seconds, not mid-run); None for a hub stream (validated as it arrives)."""
    d = cfg.data
    sizes = []
    for name, spec, dcfg in zip(plan.names, plan.specs, cfg.data.datasets()):
        src = spec.source
        if src.format == "hf" and dcfg.streaming:
            sizes.append(None)
            continue
        if src.format == "wds":
            urls, man = shard_urls(src.path)
            if man is not None:
                sizes.append(manifest_rows(man, src.path, spec.schema, dict(spec.columns), src.max_rows))
                log.info("%s (%s): %d rows (from its manifest, validated by prepare-data)", name, src.path, sizes[-1])
                continue
        t0 = time.perf_counter()
        res = scan(src, spec.schema, dict(spec.columns), d.on_error, d.max_skip_fraction)
        log.info("%s (%s): %d rows checked in %.1fs%s", name, src.path, res.rows, time.perf_counter() - t0,
                 f" ({res.skips.total} skipped)" if res.skips.total else "")
        sizes.append(res.rows)
    return sizes


def build_plan(cfg: Config, global_batch: int, tokenizer, max_seq_length: int) -> MixSpec:
    """The data plan: one ``PlanSpec`` per dataset, and the sampler that mixes them."""
    d, t = cfg.data, cfg.training
    specs = []
    for ds in d.datasets():
        src = Source(ds.path, ds.format, ds.subset, ds.split, ds.streaming, ds.max_rows)
        use_ids = src.format == "wds" and not ds.prompts and pretokenized_for(src.path, tokenizer, max_seq_length)
        if use_ids:
            src = Source(ds.path, ds.format, ds.subset, ds.split, ds.streaming, ds.max_rows, token_ids=True)
        loss = ds.loss or cfg.loss
        specs.append(PlanSpec(src, Schema.for_loss(loss.name), dict(ds.columns), d.on_error, t.seed, global_batch,
                              d.shuffle, d.shuffle_buffer, d.no_duplicates, d.dedup_buffer,
                              prompts=tuple(sorted(ds.prompts.items()))))
    weights = tuple(ds.weight for ds in d.datasets()) if d.sampler == "weighted" else None
    return MixSpec(tuple(ds.name for ds in d.datasets()), tuple(specs), d.sampler, d.temperature, weights, t.seed)


def pretokenized_for(path: str, tokenizer, max_seq_length: int) -> bool:
    """Whether shards carry token ids made by this very tokenizer at this length (else the
    workers tokenize the text, which gives the same result, only slower)."""
    from ..tools.prepare import tokenizer_fingerprint

    _, man = shard_urls(path)
    tok = (man or {}).get("tokenizer")
    if not tok:
        return False
    ok = tok.get("max_seq_length") == max_seq_length and tok.get("fingerprint") == tokenizer_fingerprint(
        tokenizer, max_seq_length)
    if not ok:
        log.warning("%s: its token ids were made for tokenizer %s at length %s, not this model's (length %d): "
                    "tokenizing the text instead", path, tok.get("name"), tok.get("max_seq_length"), max_seq_length)
    return ok


def loss_step_spec(loss, cfg: Config, state: DistState, guides: dict | None = None) -> StepSpec:
    t = cfg.training
    gather = loss.gather_across_devices if loss.gather_across_devices is not None else state.enabled
    guide = None
    if loss.guide_model:  # a frozen model on every rank that only scores candidates (one per path)
        guides = {} if guides is None else guides
        if loss.guide_model not in guides:
            try:
                g = Encoder.from_pretrained(loss.guide_model)
            except (ModelError, FileNotFoundError) as e:
                raise ConfigError(f"loss.guide_model: {e}") from None
            guides[loss.guide_model] = g.to(state.device).eval().requires_grad_(False)
        guide = guides[loss.guide_model]
    return StepSpec(loss.name, scale=loss.scale, margin=loss.margin, distance=loss.distance,
                    score_max=loss.score_max, matryoshka=loss.matryoshka(), gather=gather,
                    mask_same_text=loss.mask_same_text, guide=guide, guide_margin=loss.guide_margin,
                    guide_margin_strategy=loss.guide_margin_strategy,
                    mini_batch_size=loss.mini_batch_size, mini_batch_tokens=loss.mini_batch_tokens or 0,
                    chunk=t.length_sorted_chunks, pack=t.pack_length, autocast_dtype=DTYPES[t.precision])


def build_run(cfg: Config, state: DistState, resume: str | None = None, *, allow_data_change: bool = False,
              allow_fresh_start: bool = False, overwrite: bool = False) -> Run:
    from . import resume as resuming

    if os.environ.get(CLAIMED_ENV) != "1":  # no launcher of ours claimed the output_dir for this run
        problem = None
        if state.is_main:  # before any heavy work
            try:
                claim(cfg.output_dir, resume, overwrite)
            except ConfigError as e:
                problem = str(e)
        problem = broadcast_object(problem, state)  # every rank stops with the same line
        if problem:
            raise ConfigError(problem)
    out = Path(cfg.output_dir)
    d, t = cfg.data, cfg.training
    check_precision(t.precision, state.device)
    torch.manual_seed(t.seed + state.rank)
    random.seed(t.seed + state.rank)
    # guide models (frozen, whole on every rank) load before the backend starts: after it, ZeRO-3
    # builds every model partitioned
    guides: dict = {}
    specs = [loss_step_spec(ds.loss or cfg.loss, cfg, state, guides) for ds in d.datasets()]
    started = start_backend(cfg, state)
    rss_before_model = rss_mib()
    encoder = load_encoder(cfg, state)

    global_batch = t.batch_size * state.world_size
    try:
        plan = build_plan(cfg, global_batch, encoder.tokenizer, encoder.max_seq_length)
    except DataError as e:
        raise ConfigError(str(e)) from None
    pos = Position(samples_per_step=float(global_batch * t.grad_accum), dataset_rows=[0] * len(plan.names))
    saved = resuming.read_checkpoint(out / "checkpoints", resume, plan, allow_data_change, allow_fresh_start) \
        if resume else None
    if saved is None and state.is_main:
        start_afresh(out)
    sizes = saved.sizes if saved and saved.data_unchanged else dataset_sizes(plan, cfg)
    rows = plan.epoch_rows(sizes, global_batch)
    if saved:
        pos.samples_per_step = saved.meta["schedule"]["samples_per_step"]  # the schedule is the run's
    if t.max_steps <= 0 and not rows:
        raise ConfigError("data.train has a stream of unknown length: set training.max_steps")
    if d.sampler == "proportional" and len(sizes) > 1 and None in sizes:
        raise ConfigError("data.sampler=proportional needs every dataset's size; a hub stream has none: set its "
                          "max_rows, streaming: false, or use sampler round_robin/weighted")
    for loss in [cfg.loss] + [ds.loss for ds in d.datasets() if ds.loss]:
        too_wide = [x for x in loss.matryoshka_dims or [] if x > encoder.dim]
        if too_wide:
            raise ConfigError(f"loss.matryoshka_dims: {too_wide} wider than the model's {encoder.dim}-dimensional "
                              "embeddings")
    schedule = Schedule.for_run(t, pos.samples_per_step, rows)
    backend = make_backend(cfg, state, encoder, lambda opt: lambda_lr(opt, lambda: schedule.factor(pos.samples)),
                           started)
    gather = any(s.gather for s in specs)
    warmup_steps = math.ceil(schedule.warmup / pos.samples_per_step)
    health = HealthMonitor(cfg.health.max_bad_steps, cfg.health.plateau_steps, cfg.health.collapse_std,
                           warmup_steps=warmup_steps)
    run = Run(cfg=cfg, state=state, out=out, encoder=encoder, backend=backend, plan=plan, rows=rows,
              sizes=sizes, global_batch=global_batch, specs=specs, schedule=schedule, health=health, metrics=None,
              eval_sets=[load_sts(s.path, s.name, split=s.split, subset=s.subset, columns=s.columns)
                         for s in cfg.eval.sts], pos=pos)  # on every rank: each embeds a share
    run.retrieval_sets = [load_retrieval(s.name, s.queries, s.corpus, s.qrels) for s in cfg.eval.retrieval]
    run.num_workers = d.num_workers
    run.rss_before_model = rss_before_model
    if d.num_workers and all(s.source.token_ids for s in plan.specs):
        # padding ids costs less than shipping rows to a worker process and back (benchmarks/
        # data_pipeline.py: 44.8k rows/s in-process vs 25.2k with 2 workers on pre-tokenized shards)
        log.info("data.num_workers=%d not used: every dataset is pre-tokenized, batches are padded in-process",
                 d.num_workers)
        run.num_workers = 0
    if saved:
        resuming.restore(run, saved)
    if state.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        if getattr(backend, "config", None) is not None:  # what DeepSpeed ran with, every "auto" filled
            (out / "deepspeed_config.json").write_text(json.dumps(backend.config, indent=2) + "\n")
        if cfg.logging.wandb is not None and cfg.logging.wandb.mode != "disabled":
            from ..outputs.wandb_run import WandbRun

            run.wandb = WandbRun(cfg.logging.wandb, out, cfg.to_dict(), state.world_size,
                                 skip_until=pos.logged_until)
    run.metrics = MetricsWriter(out / "metrics.jsonl" if state.is_main else None, run.wandb)
    if os.environ.get("DIST_EMBED_LOG_ROW_IDS"):
        (out / "row_ids").mkdir(parents=True, exist_ok=True)
        run.row_log = open(out / "row_ids" / f"rank{state.rank}.jsonl", "a", encoding="utf-8")
    # the model, the modules and the config live as long as the run: move them out of the garbage
    # collector's generations, so its full collections (triggered by the data pipeline's churn of
    # rows) stop walking ~200k long-lived objects each time
    gc.freeze()
    log.info("world size %d, device %s, %s rows, global batch %d, about %d optimizer steps (warm-up %d), "
             "precision %s, loss %s%s", state.world_size, state.device, rows, global_batch, run.total_steps,
             warmup_steps, t.precision, ", ".join(sorted({s.loss for s in specs})),
             " with negatives gathered across ranks" if gather and state.enabled else "")
    return run

