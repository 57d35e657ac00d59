"""The training loop, readable top to bottom: setup, resume, then steps with eval and checkpoints."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, dump_config
from .data.loader import PlanSpec, rank_batches
from .data.readers import Schema, Source, scan
from .distributed import DistState, all_reduce_grads, all_reduce_sum, barrier
from .evaluation import PRIMARY, evaluate_sts, load_sts
from .health import HealthMonitor, sts_events
from .model import Encoder, ModelError
from .step import AutogradBackward, StepSpec, forward_backward
from .tracking import MetricsWriter, Progress, Timer

log = logging.getLogger("dist_embed.train")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written and the job should be requeued."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up from 0 to the peak lr, then linear decay to 0, as a function of the run's
    position in samples (HF's curve, step for step, while the global batch stays the same).

    Measured in samples, the curve survives a change of world size: resuming a 2-process run with 1
    process continues from the same point at the same lr and still ends at zero. ``total`` is
    ``epochs x rows`` (rows actually trained) or ``max_steps x`` the starting global batch x
    grad_accum; ``warmup`` is ``warmup_steps x`` that batch, or ``warmup_ratio x total``.
    """

    total: float
    warmup: float

    def factor(self, done: float) -> float:
        if done < self.warmup:
            return done / max(self.warmup, 1e-12)
        return max(0.0, (self.total - done) / max(self.total - self.warmup, 1e-12))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (the usual transformer recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """Fused AdamW (one kernel for all parameters; on CPU 5x faster than the per-tensor loop)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # an older torch without the fused CPU kernel
        return torch.optim.AdamW(groups, lr=lr)


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


def peak_memory(state: DistState) -> dict[str, float]:
    """Peak memory of the largest process so far, MiB: host RSS, and GPU memory allocated on CUDA."""
    import resource

    values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]  # Linux reports KiB
    if state.device.type == "cuda":
        values.append(torch.cuda.max_memory_allocated(state.device) / 2**20)
    values = all_reduce_sum(values, state, op=torch.distributed.ReduceOp.MAX)
    out = {"mem/peak_rss_mib": round(values[0], 1)}
    if len(values) > 1:
        out["mem/peak_gpu_mib"] = round(values[1], 1)
    return out


class Trainer:
    def __init__(self, cfg: Config, state: DistState, resume: str | None = None, *, allow_data_change: bool = False,
                 allow_fresh_start: bool = False):
        self.cfg, self.state = cfg, state
        self.allow_data_change, self.allow_fresh_start = allow_data_change, allow_fresh_start
        problem = ckpt.output_dir_problem(cfg.output_dir) if state.is_main else None
        if problem:  # before any heavy work
            raise ConfigError(f"output_dir {cfg.output_dir}: {problem}")
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        check_precision(cfg.training.precision, state.device)
        torch.manual_seed(cfg.training.seed + state.rank)
        random.seed(cfg.training.seed + state.rank)

        m = cfg.model
        try:
            self.encoder = Encoder.from_pretrained(m.name_or_path, pooling=m.pooling, normalize=m.normalize,
                                                   max_seq_length=m.max_seq_length, dropout=m.dropout,
                                                   trust_remote_code=m.trust_remote_code, revision=m.revision)
        except (ModelError, FileNotFoundError) as e:
            raise ConfigError(f"model.name_or_path: {e}") from None
        self.encoder.to(state.device).train()
        if cfg.training.fast_dropout and state.device.type == "cpu":
            from .fast_dropout import use_fast_dropout

            use_fast_dropout(self.encoder.transformer)
        self.params = [p for p in self.encoder.parameters() if p.requires_grad]
        # word-embedding rows touched this step, for the sparse gradient all-reduce (multi-process only)
        emb = self.encoder.transformer.get_input_embeddings()
        sparse = state.enabled and cfg.distributed.backend == "ddp" and emb is not None and emb.weight.requires_grad
        self.word_embeddings = emb.weight if sparse else None
        self.used_rows = torch.zeros(emb.weight.shape[0], dtype=torch.bool) if self.word_embeddings is not None \
            else None

        d, t = cfg.data, cfg.training
        self.schema = Schema.for_loss(cfg.loss.name)
        self.source = Source(d.train, d.format, d.subset, d.split, d.streaming, d.max_rows)
        self.global_batch = t.batch_size * state.world_size
        self.plan = PlanSpec(self.source, self.schema, dict(d.columns), d.on_error, t.seed, self.global_batch,
                             d.shuffle, d.shuffle_buffer, d.no_duplicates, d.dedup_buffer)
        self.step = 0
        self.epoch = 0
        self.samples = 0.0  # the schedule's position (see Schedule)
        self.planner_state: dict | None = None  # the data position: planner state after the last batch
        self.history: list[dict] = []  # eval results, for best-checkpoint and the model card
        self.samples_per_step = float(self.global_batch * t.grad_accum)  # at the run's start; kept on resume
        saved = self._read_resume(resume) if resume else None
        self.rows = saved["data"]["rows"] if saved and saved["data"]["data_unchanged"] else self._count_rows()
        if t.max_steps > 0:
            total = t.max_steps * self.samples_per_step
        elif self.rows:
            total = float(t.epochs * self.rows)
        else:
            raise ConfigError("data.train is a stream of unknown length: set training.max_steps")
        warmup = t.warmup_steps * self.samples_per_step if t.warmup_steps else t.warmup_ratio * total
        self.schedule = Schedule(total, warmup)
        warmup_steps = math.ceil(warmup / self.samples_per_step)

        groups = param_groups(self.encoder, t.weight_decay)
        make_scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: self.schedule.factor(self.samples))
        self.ds = None  # DeepSpeedBackend when distributed.backend is deepspeed
        self.scaler = None
        if cfg.distributed.backend == "deepspeed":
            from .deepspeed_engine import DeepSpeedBackend

            self.ds = DeepSpeedBackend(cfg, state, self.encoder, groups, make_scheduler)
            self.optimizer, self.scheduler = self.ds.optimizer, self.ds.scheduler
            self.model, self.grads = self.ds.engine, self.ds  # every training forward goes through the engine
        else:
            self.optimizer = make_adamw(groups, t.lr)
            self.scheduler = make_scheduler(self.optimizer)
            self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
            self.model, self.grads = self.encoder, AutogradBackward(self.scaler)
        gather = cfg.loss.gather_across_devices if cfg.loss.gather_across_devices is not None else state.enabled
        self.spec = StepSpec(cfg.loss.name, scale=cfg.loss.scale, margin=cfg.loss.margin,
                             distance=cfg.loss.distance, gather=gather, mini_batch_size=cfg.loss.mini_batch_size,
                             chunk=t.length_sorted_chunks, pack=t.pack_length, autocast_dtype=DTYPES[t.precision])
        self.eval_sets = [load_sts(s.path, s.name) for s in cfg.eval.sts] if state.is_main else []

        self.health = HealthMonitor(cfg.health.max_bad_steps, cfg.health.plateau_steps, cfg.health.collapse_std,
                                    warmup_steps=warmup_steps)
        self.stop_signal: int | None = None
        self.logged_until = 0  # the last step a stopped run had logged (W&B has it already)
        if saved:
            self._resume(saved)
        if state.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
            if self.ds is not None:  # what DeepSpeed actually ran with, every "auto" filled
                (self.out / "deepspeed_config.json").write_text(json.dumps(self.ds.config, indent=2) + "\n")
        self.wandb = None
        if state.is_main and cfg.logging.wandb is not None and cfg.logging.wandb.mode != "disabled":
            from .wandb_run import WandbRun

            self.wandb = WandbRun(cfg.logging.wandb, self.out, cfg.to_dict(), state.world_size,
                                  skip_until=self.logged_until)
        self.metrics = MetricsWriter(self.out / "metrics.jsonl" if state.is_main else None, self.wandb)
        self.row_log = None
        if os.environ.get("DIST_EMBED_LOG_ROW_IDS"):
            # audit trail for tests and drills: which rows each rank trained on, per optimizer step
            (self.out / "row_ids").mkdir(parents=True, exist_ok=True)
            self.row_log = open(self.out / "row_ids" / f"rank{state.rank}.jsonl", "a", encoding="utf-8")
        log.info("world size %d, device %s, %s rows, global batch %d, about %d optimizer steps (warm-up %d), "
                 "precision %s, loss %s%s", state.world_size, state.device, self.rows, self.global_batch,
                 self.total_steps, warmup_steps, t.precision, cfg.loss.name,
                 " with negatives gathered across ranks" if gather and state.enabled else "")

    # ------------------------------------------------------------------------------------------

    def _count_rows(self) -> int | None:
        d = self.cfg.data
        if self.source.format == "hf" and d.streaming:
            return None  # a hub stream: no pre-scan; rows are validated as they arrive
        t0 = time.perf_counter()
        res = scan(self.source, self.schema, dict(d.columns), d.on_error, d.max_skip_fraction)
        log.info("%s: %d rows checked in %.1fs%s", d.train, res.rows, time.perf_counter() - t0,
                 f" ({res.skips.total} skipped)" if res.skips.total else "")
        return res.rows

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: exact for max_steps runs at one world size, else an
        estimate (the run ends when the schedule's samples are done, or with the last epoch)."""
        left = max(self.schedule.total - self.samples, 0.0)
        return self.step + math.ceil(left / (self.global_batch * self.cfg.training.grad_accum) - 1e-9)

    def _dataset_info(self):
        """Name, size, columns and token-length statistics of the first 1000 rows, for the model card."""
        from itertools import islice

        from .model_card import dataset_info

        first = list(islice(self.plan.rows(), 1000))
        cols = list(self.schema.texts)
        width = len(first[0].texts) if first else len(cols)
        if self.schema.optional_prefix:
            p = self.schema.optional_prefix
            cols += [p if i == 0 else f"{p}_{i + 1}" for i in range(width - len(cols))]
        texts = [r.texts + ((r.score,) if r.score is not None else ()) for r in first]
        info = dataset_info(self.cfg.data.train, self.rows, cols, [t[:len(cols)] for t in texts],
                            self.encoder.tokenizer)
        if self.schema.score:
            info.columns.append("score")
            info.sample = [t for t in texts[:3]]
        return info

    def _read_resume(self, what: str) -> dict | None:
        """The checkpoint to resume from, its trainer.json and data state, checked against this run.

        Refuses (ConfigError) a checkpoint made on other data or another data plan (files, seed,
        buffers, max_rows...) unless ``--allow-data-change``; then the data position is kept if
        the files are the same, else the checkpoint's epoch restarts on the new data."""
        if what == "latest":
            path = ckpt.find_resumable(self.ckpt_root)
            if path is None:
                broken = ckpt.step_dirs(self.ckpt_root)
                if broken and not self.allow_fresh_start:
                    raise ConfigError(
                        f"--resume latest: none of the {len(broken)} checkpoint(s) in {self.ckpt_root} is usable "
                        "(see the warnings above); refusing to start over and overwrite them. Move them away, or "
                        "pass --resume-or-start-fresh to start from scratch")
                log.info("--resume latest: no usable checkpoint in %s, starting from scratch", self.ckpt_root)
                return None
        else:
            path = Path(what)
            problem = ckpt.verify(path)
            if problem:
                raise ConfigError(f"--resume {path}: {problem}")
        sd = path / ckpt.STATE_DIR
        meta = json.loads((sd / "trainer.json").read_text())
        data_file = sd / "data_state.json"
        if not data_file.is_file():
            raise ConfigError(f"--resume {path}: no data_state.json (a checkpoint of an older dist_embed); start a "
                              f"new run from its weights with model.name_or_path={path}")
        data = json.loads(data_file.read_text())
        ours = self.plan.fingerprint()
        changed = [k for k in sorted(set(ours) | set(data["fingerprint"])) if ours.get(k) != data["fingerprint"].get(k)]
        data["data_unchanged"] = not changed
        if changed:
            what_changed = ", ".join("data files (names, sizes or modification times)" if k == "source" else k
                                     for k in changed)
            if not self.allow_data_change:
                raise ConfigError(f"--resume {path}: the data configuration differs from the checkpoint's "
                                  f"({what_changed}); resuming would not continue the same data order. Use the "
                                  "original data and settings, or pass --allow-data-change to continue anyway")
            log.warning("--allow-data-change: resuming on changed data (%s)", what_changed)
            if "source" in changed:
                data["planner"] = None  # reader offsets mean nothing in other files: restart this epoch
                log.warning("the data files changed: epoch %d restarts from the beginning of the new data",
                            data["epoch"])
        return {"path": path, "meta": meta, "data": data}

    def _resume(self, saved: dict) -> None:
        path, meta, data = saved["path"], saved["meta"], saved["data"]
        sd = path / ckpt.STATE_DIR
        self._check_resumable(path, meta.get("backend", {"backend": "ddp"}), meta["world_size"])
        if self.ds is not None:
            self.ds.load(sd)  # weights, optimizer shards and DeepSpeed's step counters
        else:
            from safetensors.torch import load_file

            weights = load_file(str(path / "model.safetensors"))
            self.encoder.transformer.load_state_dict(
                {k: v for k, v in weights.items() if k not in self.encoder.extra_state}, strict=True)
            self.optimizer.load_state_dict(ckpt.load_tensors(sd / "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_tensors(sd / "scheduler.pt"))
        if self.scaler is not None and (sd / "scaler.pt").exists():
            self.scaler.load_state_dict(ckpt.load_tensors(sd / "scaler.pt"))
        self.step = meta["step"]
        sched = meta["schedule"]
        self.samples, self.samples_per_step = sched["samples"], sched["samples_per_step"]
        t = self.cfg.training
        # the schedule is fixed by the run's starting global batch, whatever the world size now
        total = t.max_steps * self.samples_per_step if t.max_steps > 0 else float(t.epochs * self.rows)
        warmup = t.warmup_steps * self.samples_per_step if t.warmup_steps else t.warmup_ratio * total
        self.schedule = Schedule(total, warmup)
        self.epoch, self.planner_state = data["epoch"], data["planner"]
        self.history = meta.get("history", [])
        rng_file = sd / f"rng-rank{self.state.rank}.pt"
        if meta["world_size"] == self.state.world_size and rng_file.exists():
            ckpt.set_rng_state(ckpt.load_tensors(rng_file))
        if meta["world_size"] != self.state.world_size:
            log.warning("resuming a %d-process run with %d processes: global batch %d -> %d; the rest of epoch %d "
                        "is cut into batches of the new size from the saved data position (no row repeated or "
                        "lost); the lr schedule continues by samples trained", meta["world_size"],
                        self.state.world_size, meta["global_batch"], self.global_batch, self.epoch)
        if self.state.is_main:
            self._truncate_metrics(self.step)
        log.info("resumed from %s at step %d (epoch %d, %d rows into it)", path, self.step, self.epoch,
                 (self.planner_state or {}).get("rows_done", 0))

    def _truncate_metrics(self, step: int) -> None:
        """One history: drop what a stopped run logged after the checkpoint we resume from (those
        steps are redone now), so metrics.jsonl and the plots hold each step once.

        W&B cannot take back logged steps; the redone steps up to the last one it has are not sent
        again (``logged_until``). Resume is exact, so at the same world size they are the values it
        already shows; after a world-size change it keeps the stopped run's values for them."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec_step = json.loads(line).get("step", 0)
            except ValueError:
                dropped += 1  # a line cut by a kill
                continue
            self.logged_until = max(self.logged_until, rec_step or 0)
            if rec_step is not None and rec_step > step:
                dropped += 1
            else:
                keep.append(line)
        if dropped:
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(l + "\n" for l in keep), encoding="utf-8")
            os.replace(tmp, path)
            log.info("metrics.jsonl: dropped %d records after step %d (redone by this run)", dropped, step)

    def _backend_info(self) -> dict:
        return self.ds.describe() if self.ds is not None else {"backend": "ddp", "world_size": self.state.world_size}

    def _check_resumable(self, path: Path, saved: dict, saved_world: int) -> None:
        """DDP checkpoints resume at any world size (the data plan is re-split); DeepSpeed's optimizer
        shards only load into the same ZeRO stage and world size."""
        ours = self._backend_info()
        if saved.get("backend") == "ddp" == ours["backend"] or {**saved, "world_size": saved_world} == ours:
            return

        def name(info: dict, world: int) -> str:
            kind = f"DeepSpeed ZeRO-{info['zero_stage']}" if info.get("backend") == "deepspeed" else "DDP"
            return f"{kind} with {world} process{'es' if world != 1 else ''}"

        raise ConfigError(
            f"--resume {path}: written by {name(saved, saved_world)}, this run is {name(ours, self.state.world_size)}. "
            "A DeepSpeed checkpoint resumes only under the same ZeRO stage and world size, and DDP and DeepSpeed "
            "optimizer states do not convert into each other. Resume with the original settings, or start a new "
            f"run from its weights (model.name_or_path={path}; optimizer state and data position start afresh).")

    # ------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        results: dict[str, float] = {}
        encoder = self.encoder
        if self.ds is not None and self.cfg.eval.sts:
            encoder = self.ds.encoder_for_eval()  # under ZeRO-3 all ranks take part in gathering the weights
        if self.state.is_main and self.eval_sets:
            for data in self.eval_sets:
                m = evaluate_sts(encoder, data, self.cfg.eval.batch_size)
                results.update({f"eval/{data.name}/{k}": v for k, v in m.items()})
            self.encoder.train()
            rec = {"step": self.step, "epoch": self.epoch_progress(), **results}
            self.metrics.write(rec)
            self.history.append(rec)
            self.report_events(sts_events(self.step, results))
            log.info("eval at step %d: %s", self.step, ", ".join(
                f"{k.split('/', 1)[1]}={v:.4f}" for k, v in results.items() if k.endswith(PRIMARY)))
        barrier(self.state)
        return results

    def save(self, final: bool = False) -> Path:
        """All ranks call this; rank 0 writes the model, each rank its RNG state, rank 0 commits."""
        target = self.out / "final" if final else self.ckpt_root / f"step-{self.step}"
        tmp = ckpt.staging_dir(target)
        if self.state.is_main:
            ckpt.begin(target)
        barrier(self.state)
        # under DeepSpeed the full weights are gathered to rank 0 (a collective under ZeRO-3)
        weights = self.ds.full_state_dict() if self.ds is not None else None
        if not final:
            sd = tmp / ckpt.STATE_DIR
            if self.state.is_main:
                sd.mkdir(parents=True, exist_ok=True)
            barrier(self.state)
            ckpt.save_tensors(ckpt.rng_state(), sd / f"rng-rank{self.state.rank}.pt")
            if self.ds is not None:
                self.ds.save(sd)  # every rank writes its optimizer (and ZeRO-3 weight) shards
        if self.state.is_main:
            self.encoder.save(tmp, self.encoder.state_for_saving(weights) if weights is not None else None)
            self._write_card(tmp)
            if not final:
                if self.ds is None:
                    ckpt.save_tensors(self.optimizer.state_dict(), sd / "optimizer.pt")
                ckpt.save_tensors(self.scheduler.state_dict(), sd / "scheduler.pt")
                if self.scaler is not None:
                    ckpt.save_tensors(self.scaler.state_dict(), sd / "scaler.pt")
                at_step = next((h for h in reversed(self.history) if h["step"] == self.step), {})
                (sd / "trainer.json").write_text(json.dumps({
                    "step": self.step, "epoch": self.epoch, "world_size": self.state.world_size,
                    "global_batch": self.global_batch, "backend": self._backend_info(),
                    "schedule": {"samples": self.samples, "samples_per_step": self.samples_per_step,
                                 "total": self.schedule.total, "warmup": self.schedule.warmup},
                    "metrics": {k: v for k, v in at_step.items() if k.startswith("eval/")},
                    "history": self.history}, indent=1))
                # the data position: the planner's state after the last batch trained (same on every rank)
                (sd / "data_state.json").write_text(json.dumps({
                    "fingerprint": self.plan.fingerprint(), "rows": self.rows, "epoch": self.epoch,
                    "planner": self.planner_state}))
        barrier(self.state)
        if self.state.is_main:
            ckpt.commit(tmp, target)
            if not final:
                protect = set()
                metric = self.cfg.checkpoint.keep_best
                best = ckpt.best_checkpoint(self.ckpt_root, metric) if metric else None
                if best:
                    protect.add(best[0])
                    (self.ckpt_root / "best.json").write_text(json.dumps(
                        {"path": str(best[0]), "metric": metric, "value": best[1]}) + "\n")
                ckpt.prune(self.ckpt_root, self.cfg.checkpoint.keep_last, protect)
            log.info("saved %s", target)
        barrier(self.state)
        return target

    def _write_card(self, directory: Path) -> None:
        from .model_card import render

        final_metrics = {k: v for k, v in (self.history[-1] if self.history else {}).items() if k.startswith("eval/")}
        card = render(encoder=self.encoder, base_model=self.cfg.model.name_or_path, cfg=self.cfg,
                      data=getattr(self, "dataset_info", None), metrics_path=self.out / "metrics.jsonl",
                      step=self.step, final_metrics=final_metrics, world_size=self.state.world_size)
        (directory / "README.md").write_text(card, encoding="utf-8")

    # ------------------------------------------------------------------------------------------

    def _batches(self):
        """(this rank's micro-batch, planner state after it), epoch after epoch, from the current
        data position; (None, None) when a stream of unknown length ends an epoch."""
        while True:
            epoch = self.epoch
            planner = self.plan.planner(epoch, self.planner_state)
            yield from rank_batches(planner, self.global_batch, self.state.rank, self.state.world_size,
                                    self.encoder.tokenizer, self.encoder.max_seq_length, self.cfg.data.num_workers,
                                    pin_memory=self.state.device.type == "cuda",
                                    balance=self.cfg.distributed.balance_ranks)
            if self.epoch == epoch:  # the loop did not see the epoch's last row (rows unknown)
                yield None, None

    def _epoch_complete(self) -> bool:
        return bool(self.rows) and self.planner_state is not None and self.planner_state["rows_done"] >= self.rows

    def epoch_progress(self) -> float:
        """Epochs done as a fraction (sentence-transformers logs 0.5 for half an epoch)."""
        done = (self.planner_state or {}).get("rows_done", 0)
        return round(self.epoch + (min(done / self.rows, 1.0) if self.rows else 0.0), 4)

    def report_events(self, events: list[dict]) -> None:
        for ev in events:
            log.warning("%s", ev["message"])
            if self.state.is_main:
                self.metrics.write({**ev, "epoch": self.epoch, **{f"health/{k}": v for k, v in
                                                                      self.health.counters.items()}})

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_signal is None:
            self.stop_signal = signum
            log.warning("%s received: finishing this step, then checkpointing and exiting", name)
        else:
            log.warning("%s received again: already stopping; the checkpoint is written atomically", name)

    def _stop_requested(self) -> bool:
        """All ranks agree to stop if any rank was signalled (one tiny all-reduce per step)."""
        if not self.state.enabled:
            return self.stop_signal is not None
        (n,) = all_reduce_sum([1.0 if self.stop_signal is not None else 0.0], self.state)
        return n > 0

    def fit(self) -> Path:
        # signal handlers can only be set from the main thread (Ray runs the loop in another one)
        in_main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS} if in_main else {}
        code = 1
        try:
            final = self._fit()
            code = 0
            if self.wandb is not None:
                self.wandb.log_model(final)
            return final
        except Preempted:
            code = 75
            raise
        finally:
            if self.wandb is not None:
                self.wandb.finish(code)
            for s, h in previous.items():
                signal.signal(s, h)

    def _fit(self) -> Path:
        cfg, t = self.cfg, self.cfg.training
        if self.state.is_main:
            self.dataset_info = self._dataset_info()
        if self.step == 0 and cfg.eval.before_training:
            self.evaluate()
        t_start, start_step = time.perf_counter(), self.step
        progress = Progress(self.total_steps, self.step, self.state.is_main, t.log_steps)
        timer = Timer()
        window = {"loss": 0.0, "n": 0, "samples": 0, "real": 0, "padded": 0, "t0": time.perf_counter()}
        batches = self._batches()
        self.rows_trained = 0  # by this run (the summary's samples/s)
        done = self._finished()
        while not done:
            micro = 0
            step_loss = 0.0
            step_rows = 0
            row_ids = []
            epoch_ended = False
            for _ in range(t.grad_accum):
                t0 = time.perf_counter()
                batch, planner_state = next(batches)
                timer.add("data", time.perf_counter() - t0)
                if batch is None:  # a stream of unknown length ended the epoch
                    epoch_ended = True
                    break
                t0 = time.perf_counter()
                comm_before = timer.totals.get("comm", 0.0)
                if self.used_rows is not None:
                    for f in batch["features"]:
                        self.used_rows[f["input_ids"].unique()] = True
                micro_loss, info = forward_backward(self.model, batch, self.spec, self.state,
                                                    loss_scale=1.0 / t.grad_accum, grads=self.grads, timer=timer)
                step_loss += micro_loss
                timer.add("compute", time.perf_counter() - t0 - (timer.totals.get("comm", 0.0) - comm_before))
                self.planner_state = planner_state
                micro += 1
                step_rows += batch["global_size"]
                window["real"] += batch["real_tokens"]
                window["padded"] += batch["padded_tokens"]
                if self.row_log:
                    row_ids.extend(batch["row_ids"].tolist())
                if self._epoch_complete():  # every row of the epoch is in: close the step here
                    epoch_ended = True
                    break
            if micro:
                if micro < t.grad_accum:  # the epoch ended mid-accumulation: average over what we had
                    if self.ds is None:
                        for p in self.params:
                            if p.grad is not None:
                                p.grad.mul_(t.grad_accum / micro)
                    else:  # the gradients already sit in DeepSpeed's partitions
                        log.warning("step %d: the epoch ended after %d of %d accumulation micro-batches; under "
                                    "DeepSpeed this step's gradient is not re-weighted (%.2f of a full step)",
                                    self.step + 1, micro, t.grad_accum, micro / t.grad_accum)
                    step_loss *= t.grad_accum / micro
                # the schedule's position moves before the lr for the next step is set
                self.samples += step_rows if t.max_steps <= 0 else self.global_batch * t.grad_accum
                loss, grad_norm, ok = self._optimizer_step(step_loss / t.grad_accum, timer)
                self.step += 1
                self.rows_trained += step_rows
                window["samples"] += step_rows
            if epoch_ended:
                self._warn_short_batches()
                self.epoch += 1
                self.planner_state = None
            done = self._finished()
            if not micro:
                continue
            if ok:
                self.report_events(self.health.good_step(self.step, loss, info["candidates"], info["emb_std"]))
            if self.row_log:
                self.row_log.write(json.dumps({"step": self.step, "epoch": self.epoch, "rows": row_ids}) + "\n")
                self.row_log.flush()
            if math.isfinite(loss):
                window["loss"] += loss
                window["n"] += 1
            lr = self.scheduler.get_last_lr()[0]
            rate = window["samples"] / max(time.perf_counter() - window["t0"], 1e-9)  # before the window resets
            if self.step % t.log_steps == 0 or done:
                self._log_window(window, timer, lr, grad_norm)
            progress.update(self.step, {"loss": loss, "lr": lr, "samples/s": rate})
            if cfg.eval.steps and self.step % cfg.eval.steps == 0 and not done:
                self.evaluate()
            if cfg.checkpoint.steps and self.step % cfg.checkpoint.steps == 0 and not done:
                self.save()
            if not done and self._stop_requested():
                progress.close()
                self._log_window(window, timer, lr, grad_norm)
                saved = self.save()
                if self.state.is_main:
                    (self.out / "PREEMPTED").write_text(f"{saved}\n")
                raise Preempted(self.stop_signal or signal.SIGTERM, saved)
        progress.close()
        if window["n"]:
            self._log_window(window, timer, self.scheduler.get_last_lr()[0], None)
        self.evaluate()
        final = self.save(final=True)
        self.metrics.close()
        if self.state.is_main:
            log.info("%s", self.summary(final, time.perf_counter() - t_start, start_step))
        return final

    def _warn_short_batches(self) -> None:
        short, lonely = ((self.planner_state or {}).get("batcher") or {}).get("short", (0, 0))
        if short and self.state.is_main:
            log.warning("no-duplicates batching, epoch %d: %d global batches closed short of %d rows because their "
                        "rows repeat texts; %d rows could not be batched with any other row (trained alone). "
                        "De-duplicate the data, raise data.dedup_buffer, or set data.no_duplicates=false",
                        self.epoch, short, self.global_batch, lonely)

    def _finished(self) -> bool:
        if self.cfg.training.max_steps > 0:
            return self.samples >= self.schedule.total - 1e-6
        return self.epoch >= self.cfg.training.epochs

    def summary(self, final: Path, seconds: float, start_step: int) -> str:
        """The end-of-run table: what ran, how fast, the eval metrics before and after, where it went."""
        steps = self.step - start_step
        lines = ["run summary",
                 f"  steps          {self.step} ({steps} in this run, {seconds:.0f}s, "
                 f"{steps / max(seconds, 1e-9):.2f} steps/s, "
                 f"{self.rows_trained / max(seconds, 1e-9):.1f} samples/s)",
                 f"  rows trained   {self.rows_trained} in this run",
                 f"  world size     {self.state.world_size} x batch {self.cfg.training.batch_size}"]
        if self.history:
            first, last = self.history[0], self.history[-1]
            for key in (k for k in last if k.endswith("/" + PRIMARY)):
                best = max((h for h in self.history if h.get(key) is not None), key=lambda h: h[key], default=last)
                lines.append(f"  {key:<40} step {first['step']}: {first.get(key, float('nan')):.4f} -> "
                             f"step {last['step']}: {last[key]:.4f} (best {best[key]:.4f} at step {best['step']})")
        lines.append(f"  model          {final}")
        return "\n".join(lines)

    def _optimizer_step(self, local_loss: float, timer: Timer) -> tuple[float, float, bool]:
        if self.ds is not None:
            return self._deepspeed_step(local_loss, timer)
        t = self.cfg.training
        t0 = time.perf_counter()
        sparse = None
        if self.used_rows is not None:
            sparse = (self.word_embeddings, self.used_rows.to(self.state.device))
        all_reduce_grads(self.params, self.state, self.cfg.distributed.bucket_mb, timer, sparse)
        if self.used_rows is not None:
            self.used_rows.zero_()
        (loss,) = all_reduce_sum([local_loss], self.state)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if t.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        ok = True
        if self.scaler is not None:
            # fp16: the scaler skips steps whose gradients overflowed and lowers the scale
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() < scale:
                self.report_events([self.health.fp16_skipped(self.step + 1, scale, self.scaler.get_scale())])
            elif not math.isfinite(loss):
                self.report_events([self.health.bad_step(self.step + 1, loss, grad_norm)])
                ok = False
        elif math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            self.report_events([self.health.bad_step(self.step + 1, loss, grad_norm)])
            ok = False
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        timer.add("optimizer", time.perf_counter() - t0)
        return loss, grad_norm, ok

    def _deepspeed_step(self, local_loss: float, timer: Timer) -> tuple[float, float, bool]:
        """DeepSpeed reduces, clips and steps; it skips a step whose gradients are not finite (and
        lowers the fp16 loss scale), which we report as the DDP path does."""
        t0 = time.perf_counter()
        (loss,) = all_reduce_sum([local_loss], self.state)
        scale = self.ds.loss_scale()
        grad_norm, applied = self.ds.step()
        if not applied:
            if scale is not None:
                self.report_events([self.health.fp16_skipped(self.step + 1, scale, self.ds.loss_scale())])
            else:
                self.report_events([self.health.bad_step(self.step + 1, loss, grad_norm)])
        elif not math.isfinite(loss):
            self.report_events([self.health.bad_step(self.step + 1, loss, grad_norm)])
            applied = False
        timer.add("optimizer", time.perf_counter() - t0)
        return loss, grad_norm, applied

    def _log_window(self, window: dict, timer: Timer, lr: float, grad_norm: float | None) -> None:
        if not window["n"]:
            return
        elapsed = time.perf_counter() - window["t0"]
        real, padded = all_reduce_sum([window["real"], window["padded"]], self.state)
        phases = timer.pop()
        gather = phases.pop("gather", 0.0)
        total = sum(phases.values()) or 1.0
        rec = {"step": self.step, "epoch": self.epoch_progress(), "loss": window["loss"] / window["n"], "lr": lr,
               "grad_norm": grad_norm, "samples_per_second": window["samples"] / elapsed,
               "tokens_per_second": real / elapsed, "padding_ratio": 1 - real / max(padded, 1),
               "seconds_per_step": elapsed / window["n"], "gather_seconds_per_step": gather / window["n"]}
        rec.update({f"time/{k}": v / total for k, v in phases.items()})
        rec.update(peak_memory(self.state))
        self.metrics.write(rec)
        window.update(loss=0.0, n=0, samples=0, real=0, padded=0, t0=time.perf_counter())
