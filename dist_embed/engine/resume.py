"""Checkpoints of a run: write one (all ranks), pick and check one to resume from, restore it.

A checkpoint is the sentence-transformers model directory plus ``training_state/``: the backend's
optimizer state, every rank's RNG state, ``trainer.json`` (step, schedule position, eval history)
and ``data_state.json`` (the planner's state and the data fingerprint it is valid for).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..outputs import checkpoint as ckpt
from ..config import ConfigError
from ..data.loader import MixSpec, json_without_ids
from ..distributed import barrier

log = logging.getLogger("dist_embed.train")


@dataclass
class Saved:
    path: Path
    meta: dict  # trainer.json
    data: dict  # data_state.json
    data_unchanged: bool
    planner_states: list | None = None  # the sharded plane: every rank's planner state
    epoch_rows_done: int = 0  # rows the checkpoint had trained of its epoch (before any restart of it)

    @property
    def sizes(self) -> list[int | None]:
        return self.data["sizes"]

    @property
    def plane(self) -> str:
        return self.data.get("plane", "global")

    @property
    def world_size(self) -> int:
        return self.meta["world_size"]


def read_checkpoint(ckpt_root: Path, what: str, plan: MixSpec, allow_data_change: bool,
                    allow_fresh_start: bool) -> Saved | None:
    """The checkpoint ``--resume`` names (``latest``: the newest intact one), checked against this
    run's data. Refuses (ConfigError) other data or another data plan (files, seed, buffers,
    max_rows...) unless ``allow_data_change``: then the data position is kept if the files are the
    same, else the checkpoint's epoch restarts on the new data. ``latest`` with only broken
    checkpoints is refused too unless ``allow_fresh_start``: never start over on top of them."""
    if what == "latest":
        path = ckpt.find_resumable(ckpt_root)
        if path is None:
            broken = ckpt.step_dirs(ckpt_root)
            if broken and not allow_fresh_start:
                raise ConfigError(
                    f"--resume latest: none of the {len(broken)} checkpoint(s) in {ckpt_root} is usable "
                    "(see the warnings above); refusing to start over and overwrite them. Move them away, or "
                    "pass --resume-or-start-fresh to start from scratch")
            log.info("--resume latest: no usable checkpoint in %s, starting from scratch", ckpt_root)
            return None
    else:
        path = Path(what)
        if not path.is_dir():
            raise ConfigError(f"--resume {path}: no such checkpoint directory (give 'latest' or a "
                              f"{ckpt_root}/step-N directory)")
        problem = ckpt.verify(path)
        if problem:
            raise ConfigError(f"--resume {path}: {problem}")
    sd = path / ckpt.STATE_DIR
    if not (sd / "trainer.json").is_file():
        step = ckpt.manifest_info(path).get("step")
        what = f"a finished model (at step {step})" if step is not None else "a model without training state"
        raise ConfigError(f"--resume {path}: {what}, not a checkpoint: there is no training state to continue "
                          f"from (checkpoints are {ckpt_root}/step-N). To train it further, start a new run from "
                          f"it with model.name_or_path={path}")
    meta = json.loads((sd / "trainer.json").read_text())
    if not (sd / "data_state.json").is_file():
        raise ConfigError(f"--resume {path}: no data_state.json (a checkpoint of an older dist_embed); start a "
                          f"new run from its weights with model.name_or_path={path}")
    data = json.loads((sd / "data_state.json").read_text())
    ours = plan.fingerprint()  # the plane is the checkpoint's to choose (setup follows it)
    changed = [k for k in sorted(set(ours) | set(data["fingerprint"]))
               if k != "plane" and ours.get(k) != data["fingerprint"].get(k)]
    if changed:
        what_changed = ", ".join("data files (names, sizes or modification times)" if k == "source" else k
                                 for k in changed)
        if not allow_data_change:
            raise ConfigError(f"--resume {path}: the data configuration differs from the checkpoint's "
                              f"({what_changed}); resuming would not continue the same data order. Use the "
                              "original data and settings, or pass --allow-data-change to continue anyway")
        log.warning("--allow-data-change: resuming on changed data (%s)", what_changed)
        rows_done = (data["planner"] or {}).get("rows_done", 0)
        if {"source", "names"} & set(changed):
            data["planner"] = None  # reader offsets mean nothing in other files: restart this epoch
            log.warning("the data files changed: epoch %d restarts from the beginning of the new data", data["epoch"])
    states = None
    if data.get("plane") == "sharded" and data["planner"] is not None:
        states = [json.loads((sd / f"data_state-rank{r}.json").read_text())["planner"]
                  for r in range(meta["world_size"])]
    return Saved(path, meta, data, not changed, states, rows_done if changed else 0)


def schedule_on_changed_data(saved: Saved, training, rows: int, schedule):
    """An epoch run resumed on changed data (--allow-data-change): the schedule ends when the rest
    of the run on the new data ends, from the samples trained up to the checkpoint's epoch start;
    an epoch restarted on the new files (its first rows abandoned) continues from that start,
    so neither is its lr spent early nor its last steps trained at lr 0."""
    from .schedule import Schedule

    start = saved.meta["schedule"]["samples"] - saved.epoch_rows_done
    if saved.data["planner"] is None:  # the epoch restarts: its abandoned rows are trained again
        saved.meta["schedule"]["samples"] = start
    return Schedule(start + (training.epochs - saved.data["epoch"]) * rows, schedule.warmup)


def check_resumable(path: Path, saved: dict, saved_world: int, ours: dict, world: int) -> None:
    """DDP checkpoints resume at any world size (the data plan is re-split); DeepSpeed's optimizer
    shards only load into the same ZeRO stage and world size."""
    if saved.get("backend") == "ddp" == ours["backend"] or {**saved, "world_size": saved_world} == ours:
        return

    def name(info: dict, n: int) -> str:
        kind = f"DeepSpeed ZeRO-{info['zero_stage']}" if info.get("backend") == "deepspeed" else "DDP"
        return f"{kind} with {n} process{'es' if n != 1 else ''}"

    raise ConfigError(
        f"--resume {path}: written by {name(saved, saved_world)}, this run is {name(ours, world)}. "
        "A DeepSpeed checkpoint resumes only under the same ZeRO stage and world size, and DDP and DeepSpeed "
        "optimizer states do not convert into each other. Resume with the original settings, or start a new "
        f"run from its weights (model.name_or_path={path}; optimizer state and data position start afresh).")


def restore(saved: Saved, backend, pos, state, out: Path, global_batch: int) -> None:
    """Weights, optimizer and schedule state (``backend``), the position ``pos``, RNG (same world
    size) and one metrics history in ``out``."""
    meta = saved.meta
    sd = saved.path / ckpt.STATE_DIR
    check_resumable(saved.path, meta.get("backend", {"backend": "ddp"}), meta["world_size"], backend.describe(),
                    state.world_size)
    backend.load(saved.path, sd)
    pos.step, pos.samples = meta["step"], meta["schedule"]["samples"]
    pos.epoch, pos.planner_state = saved.data["epoch"], saved.data["planner"]
    if saved.planner_states and meta["world_size"] == state.world_size:
        pos.planner_state = saved.planner_states[state.rank]  # the sharded plane: this rank's own
    pos.history = meta.get("history", [])
    pos.window = meta.get("window")  # the first log record averages the same steps as without the stop
    pos.worlds = [list(w) for w in meta.get("worlds") or [[1, meta["world_size"], meta["global_batch"]]]]
    pos.negatives = meta.get("negatives") or {}  # the hard-negative refresh its rows used
    if len(meta.get("dataset_rows") or []) == len(pos.dataset_rows):
        pos.dataset_rows = list(meta["dataset_rows"])
    rng_file = sd / f"rng-rank{state.rank}.pt"
    if meta["world_size"] == state.world_size:
        if rng_file.exists():
            ckpt.set_rng_state(ckpt.load_tensors(rng_file), state.device)
    else:
        log.warning("resuming a %d-process run with %d processes: global batch %d -> %d; the rest of epoch %d "
                    "is cut into batches of the new size from the saved data position (no row repeated or "
                    "lost); the lr schedule continues by samples trained", meta["world_size"],
                    state.world_size, meta["global_batch"], global_batch, pos.epoch)
    if state.is_main:
        pos.logged_until = truncate_metrics(out / "metrics.jsonl", pos.step)
    log.info("resumed from %s at step %d (epoch %d, %d rows into it)", saved.path, pos.step, pos.epoch,
             (pos.planner_state or {}).get("rows_done", 0))


def truncate_metrics(path: Path, step: int) -> int:
    """One history: drop what a stopped run logged after the checkpoint we resume from (those
    steps are redone now), so metrics.jsonl and the plots hold each step once. Returns the last
    step that was logged (-1: none): W&B cannot take steps back, so those up to it are not sent again
    (resume is exact, so at the same world size they are the values it already shows; after a
    world-size change it keeps the stopped run's values for them)."""
    if not path.exists():
        return -1
    keep, dropped, last = [], 0, -1
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec_step = json.loads(line).get("step", 0)
        except ValueError:
            dropped += 1  # a line cut by a kill
            continue
        last = max(last, rec_step if rec_step is not None else -1)
        if rec_step is not None and rec_step > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in keep), encoding="utf-8")
        os.replace(tmp, path)
        log.info("metrics.jsonl: dropped %d records after step %d (redone by this run)", dropped, step)
    return last


def save(run, final: bool = False) -> Path:
    """All ranks call this; rank 0 writes the model, each rank its RNG (and backend) state, rank 0
    commits: written to a staging directory, fsynced, a manifest last, renamed into place."""
    state, pos, ckpt_root = run.state, run.pos, run.outputs.ckpt_root
    target = run.outputs.out / "final" if final else ckpt_root / f"step-{pos.step}"
    tmp = ckpt.staging_dir(target)
    if state.is_main:
        ckpt.begin(target)
    barrier(state)
    if not final:
        sd = tmp / ckpt.STATE_DIR
        if state.is_main:
            sd.mkdir(parents=True, exist_ok=True)
        barrier(state)
        ckpt.save_tensors(ckpt.rng_state(state.device), sd / f"rng-rank{state.rank}.pt")
        if run.data.sharding is not None:
            (sd / f"data_state-rank{state.rank}.json").write_text(json.dumps({"planner": pos.planner_state},
                                                                              default=json_without_ids))
        run.backend.save(sd, state.is_main, run.save_dtype)  # DeepSpeed: every rank writes its shards
    lora = run.cfg.model.lora
    adapter = None
    if final and lora is not None and lora.export == "adapter":
        from ..model.lora import adapter_state

        adapter = adapter_state(run.encoder.transformer)  # every rank: ZeRO-3 gathers the adapters
    # the collectives below run in the same order on every rank: rank 0 consumes ``parts`` in save()
    parts = run.backend.weight_parts()  # None: the encoder's own; under ZeRO-3 gathered module by module
    if not state.is_main:
        for _ in parts or ():  # every rank takes part in each module's gather
            pass
    if state.is_main:
        run.encoder.save(tmp, parts, run.cfg.checkpoint.max_shard_size, dtype=run.save_dtype)
        if adapter is not None:
            # the adapter alone: transformers (so sentence-transformers) loads the base model it names
            from ..model.lora import write_adapter
            from ..model.encoder import resolve_model_path
            from ..model.weights import remove_weights

            remove_weights(tmp)  # without the base's files transformers looks for
            (tmp / "config.json").unlink()  # adapter_config.json and loads the base it names
            base = resolve_model_path(run.cfg.model.name_or_path)
            write_adapter(tmp, run.encoder.transformer, str(Path(base).resolve()) if Path(base).exists() else base,
                          adapter)
        write_card(run, tmp)
        if not final:
            at_step = next((h for h in reversed(pos.history) if h["step"] == pos.step), {})
            (sd / "trainer.json").write_text(json.dumps({
                "step": pos.step, "epoch": pos.epoch, "world_size": state.world_size,
                "global_batch": run.data.global_batch, "backend": run.backend.describe(),
                "save_dtype": str(run.save_dtype).removeprefix("torch."),
                "schedule": {"samples": pos.samples, "samples_per_step": pos.samples_per_step,
                             "total": run.schedule.total, "warmup": run.schedule.warmup},
                "metrics": {k: v for k, v in at_step.items() if k.startswith("eval/")},
                "history": pos.history, "dataset_rows": pos.dataset_rows, "window": pos.window,
                "worlds": pos.worlds, "negatives": pos.negatives}, indent=1))
            # the data position: the planner's state after the last batch trained (the global plane:
            # the same on every rank; the sharded plane: rank 0's here, every rank's in its own file)
            sharding = run.data.sharding
            (sd / "data_state.json").write_text(json.dumps({
                "fingerprint": run.data.plan.fingerprint(), "rows": run.data.rows, "sizes": list(run.data.sizes),
                "epoch": pos.epoch, "planner": pos.planner_state, "plane": run.data.plan.specs[0].plane,
                "pieces": [[p.to_json() for p in table] for table in sharding.pieces] if sharding else None},
                default=json_without_ids))
    barrier(state)
    if state.is_main:
        ckpt.commit(tmp, target, {"step": pos.step})
        if not final:
            protect = set()
            metric = run.cfg.checkpoint.keep_best
            best = ckpt.best_checkpoint(ckpt_root, metric) if metric else None
            if best:
                protect.add(best[0])
                (ckpt_root / "best.json").write_text(json.dumps(
                    {"path": str(best[0]), "metric": metric, "value": best[1]}) + "\n")
            ckpt.prune(ckpt_root, run.cfg.checkpoint.keep_last, protect)
        log.info("saved %s", target)
    barrier(state)
    return target


def write_card(run, directory: Path) -> None:
    from ..outputs.model_card import render

    history = run.pos.history
    final_metrics = {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("eval/")}
    card = render(encoder=run.encoder, base_model=run.cfg.model.name_or_path, cfg=run.cfg, losses=list(run.losses),
                  data=list(run.outputs.dataset_info), metrics_path=run.outputs.out / "metrics.jsonl",
                  step=run.pos.step, final_metrics=final_metrics, world_size=run.state.world_size,
                  worlds=run.pos.worlds)
    (directory / "README.md").write_text(card, encoding="utf-8")
