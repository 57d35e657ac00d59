"""The training loop, readable top to bottom (setup.py builds the run, resume.py checkpoints it).

``train`` builds the run and calls ``fit``; ``loop`` is the whole story of a run: batches ->
forward/backward (step.py) -> optimizer step (the backend) -> logs, evals, checkpoints, stop
signals -> final evaluation and model.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..distributed import DistState, all_reduce_sum, all_reduce_tensor, barrier
from ..evaluation.evaluator import PRIMARY_KEYS
from ..outputs.tracking import Progress, Timer, Window, peak_flops, peak_memory, read_all
from . import resume
from .health import sts_events
from .setup import Run, build_run
from .step import forward_backward
from .stops import STOPS, Preempted

log = logging.getLogger("dist_embed.train")


def train(cfg, state: DistState, resume_from: str | None = None, **kwargs) -> Path:
    """The worker's job: set up (or resume) the run, train it, return the final model's directory."""
    return fit(build_run(cfg, state, resume_from, **kwargs))


def fit(run: Run) -> Path:
    """``loop`` with stop signals recorded (a checkpoint, then exit 75) and W&B closed either way."""
    owned = not STOPS.installed and STOPS.install()  # a worker installed them at its start
    wandb = run.outputs.wandb
    code = 1
    try:
        if STOPS.requested(run.state):  # signalled during set-up: nothing trained, nothing to save
            raise Preempted(STOPS.signum)
        final = loop(run)
        code = 0
        if wandb is not None:
            wandb.log_model(final)
        return final
    except Preempted:
        code = 75
        raise
    finally:
        if wandb is not None:
            wandb.finish(code)
        if owned:
            STOPS.uninstall()


def loop(run: Run) -> Path:
    cfg, t, pos, backend, data = run.cfg, run.cfg.training, run.pos, run.backend, run.data
    if pos.step == 0 and cfg.eval.before_training:
        evaluate(run)
    t_start, start_step, rows_trained = time.perf_counter(), pos.step, 0
    progress = Progress(run.total_steps, pos.step, run.state.is_main, t.log_steps)
    timer, window = Timer(), Window(run.flops_per_token, peak_flops(run.state.device))
    window.restore_losses(pos.window, run.state.is_main)  # a resumed run: the steps since the last log
    # what the host's time in forward_backward is: the computation on a CPU; on a GPU only queueing
    # the work (it runs asynchronously, and the wait for it shows as "sync" on log steps)
    busy = "compute" if run.state.device.type == "cpu" else "launch"
    pending: list[dict] = []  # steps whose loss, grad norm, ... are still on the device
    done = finished(run)
    if not done and run.refresher is not None and run.refresher.due(pos) and not refresh(run, timer):
        raise Preempted(STOPS.signum, resume.save(run) if pos.step else None)  # a resumed run: where it was
    batches = open_batches(run)
    while not done:
        # -- one optimizer step: grad_accum micro-batches (fewer if the epoch ends first) -----------
        micro, step_loss, step_rows, row_ids, epoch_ended, info = 0, 0.0, 0, [], False, {}
        for _ in range(t.grad_accum):
            t0 = time.perf_counter()
            batch, planner_state = next(batches)
            timer.add("data", time.perf_counter() - t0)
            if batch is None:  # a stream of unknown length ended the epoch
                epoch_ended = True
                break
            t0, comm_before = time.perf_counter(), timer.totals.get("comm", 0.0)
            backend.note_batch(batch)
            micro_loss, info = forward_backward(backend.model, batch, run.losses[batch.dataset], run.embedder,
                                                run.state, loss_scale=1.0 / t.grad_accum, grads=backend, timer=timer)
            timer.add(busy, time.perf_counter() - t0 - (timer.totals.get("comm", 0.0) - comm_before))
            pos.planner_state = planner_state
            step_loss = step_loss + micro_loss
            micro += 1
            step_rows += batch.global_size
            pos.dataset_rows[batch.dataset] += batch.global_size
            window.add_batch(batch, micro_loss)
            row_ids.extend((batch.dataset, i) for i in batch.row_ids.tolist())
            if epoch_complete(run):  # every row of the epoch is in: close the step here
                epoch_ended = True
                break
        if micro:
            if micro < t.grad_accum:  # the epoch ended mid-accumulation: average over what we had
                step_loss = step_loss * (t.grad_accum / micro)
                if not backend.rescale_grads(t.grad_accum / micro):
                    log.warning("step %d: the epoch ended after %d of %d accumulation micro-batches; this "
                                "backend cannot re-weight the gradient (%.2f of a full step)", pos.step + 1,
                                micro, t.grad_accum, micro / t.grad_accum)
            # the schedule's position moves before the backend sets the lr for the next step
            pos.samples += step_rows if t.max_steps <= 0 else data.global_batch * t.grad_accum
            pending.append(optimizer_step(run, step_loss / t.grad_accum, timer) | {
                "step": pos.step + 1, "rows": step_rows, "lr": backend.scheduler.get_last_lr()[0], **info})
            pos.step += 1
            rows_trained += step_rows
        step_epoch = pos.epoch  # the epoch this step's rows belong to (hooks get it, not the next one)
        if epoch_ended:
            warn_short_batches(run)
            pos.epoch, pos.planner_state = pos.epoch + 1, None
        done = finished(run)
        if not micro:
            continue
        if not done and run.refresher is not None and run.refresher.due(pos):
            batches.close()  # batches planned ahead carry the old negatives: plan again from the position
            if refresh(run, timer):
                batches = open_batches(run)
        # -- after the step: hooks, then on log steps the step's readings (health, logs, progress) ----
        for hook in run.outputs.hooks:
            hook.after_step(pos.step, step_epoch, row_ids)
        evaluating = cfg.eval.steps and pos.step % cfg.eval.steps == 0 and not done
        saving = cfg.checkpoint.steps and pos.step % cfg.checkpoint.steps == 0 and not done
        stopping = not done and STOPS.requested(run.state)
        if pos.step % t.log_steps == 0 or done or evaluating or saving or stopping:
            read_steps(run, pending, window, timer, progress, log_now=pos.step % t.log_steps == 0 or done)
        if evaluating:
            evaluate(run)
        if saving or stopping:  # the window's losses go into the checkpoint: logs as if never stopped
            pos.window = window.losses(run.state)
        if saving:
            resume.save(run)
        if stopping:
            progress.close()
            raise Preempted(STOPS.signum, resume.save(run))
    progress.close()
    read_steps(run, pending, window, timer, progress, log_now=True)
    evaluate(run)
    final = resume.save(run, final=True)
    # the whole run's peak memory, the final evaluation and save included (a collective)
    metrics = run.outputs.metrics
    metrics.write({"step": pos.step, "epoch": data.epoch_progress(pos), "final": True,
                   **peak_memory(run.state, run.outputs.rss_before_model)})
    metrics.close()
    if run.state.is_main:
        log.info("%s", summary(run, final, time.perf_counter() - t_start, start_step, rows_trained))
    return final


# ---------------------------------------------------------------------------------------------
# the loop's helpers


def open_batches(run: Run):
    """This rank's batches from the data position on, with the last hard-negative refresh's columns."""
    renew = run.refresher.planner_renewals() if run.refresher is not None else None
    return run.data.batches(run.pos, run.state, run.encoder.tokenizer, run.encoder.max_seq_length, renew)


def refresh(run: Run, timer: Timer) -> bool:
    """Hard negatives mined again with the current weights (mining/refresh.py); False if a stop
    signal cut it short (the loop then saves and stops: the resumed run mines again)."""
    t0 = time.perf_counter()
    done = run.refresher.refresh(run, stop=lambda: STOPS.requested(run.state))
    timer.add("refresh", time.perf_counter() - t0)
    return done


def epoch_complete(run: Run) -> bool:
    """The planner knows the epoch has no batch left (known sizes), so the step can close now."""
    state = run.pos.planner_state
    return state is not None and state["complete"]


def finished(run: Run) -> bool:
    if run.cfg.training.max_steps > 0:
        return run.pos.samples >= run.schedule.total - 1e-6
    return run.pos.epoch >= run.cfg.training.epochs


def optimizer_step(run: Run, local_loss, timer: Timer) -> dict:
    """The backend's step with the global loss; what it leaves to read: device tensors (or numbers)."""
    t0 = time.perf_counter()
    loss = all_reduce_tensor(local_loss.detach().clone(), run.state) if hasattr(local_loss, "detach") else \
        all_reduce_sum([local_loss], run.state)[0]
    res = run.backend.step(loss, timer)
    timer.add("optimizer", time.perf_counter() - t0)
    before, after = res.scale if res.scale is not None else (None, None)
    return {"loss": loss, "grad_norm": res.grad_norm, "applied": res.applied, "scale_before": before,
            "scale_after": after}


KEYS = ("loss", "grad_norm", "applied", "scale_before", "scale_after", "emb_std")


def read_steps(run: Run, pending: list[dict], window: Window, timer: Timer, progress: Progress,
               log_now: bool) -> None:
    """Read every pending step's values at once (the step's one wait for the device), then in step
    order: health events, the window's loss, the progress line; a metrics record if ``log_now``."""
    t0 = time.perf_counter()
    values = read_all([rec.get(k) for rec in pending for k in KEYS])
    timer.add("sync", time.perf_counter() - t0)
    readings = [dict(zip(KEYS, values[i * len(KEYS):(i + 1) * len(KEYS)])) for i in range(len(pending))]
    for rec, got in zip(pending, readings):
        step, loss = rec["step"], got["loss"]
        if got["scale_before"] is not None and got["scale_after"] < got["scale_before"]:
            report_events(run, [run.health.fp16_skipped(step, got["scale_before"], got["scale_after"])])
        elif not got["applied"]:
            report_events(run, [run.health.bad_step(step, loss, got["grad_norm"])])
        else:
            report_events(run, run.health.good_step(step, loss, rec.get("candidates"), got["emb_std"]))
        window.add_step(loss, rec["rows"])
        progress.update(step, {"loss": loss, "lr": rec["lr"], "samples/s": window.rate(),
                               **(run.refresher.progress() if run.refresher is not None else {})})
    if pending and log_now:
        log_window(run, window, timer, pending[-1]["lr"], readings[-1]["grad_norm"])
    pending.clear()


def evaluate(run: Run) -> dict[str, float]:
    """Every rank embeds a share of the eval texts (under ZeRO-3 in lockstep: each forward gathers
    the weights layer by layer); rank 0 scores, logs and keeps the record."""
    with run.backend.evaluating() as encoder:
        results = run.evaluator.evaluate(encoder, run.state, lockstep=run.backend.collective_eval)
    run.encoder.train()
    if run.state.is_main and run.evaluator:
        rec = {"step": run.pos.step, "epoch": run.data.epoch_progress(run.pos), **results}
        run.outputs.metrics.write(rec)
        run.pos.history.append(rec)
        report_events(run, sts_events(run.pos.step, results))
        log.info("eval at step %d: %s", run.pos.step, ", ".join(
            f"{k.split('/', 1)[1]}={v:.4f}" for k, v in results.items() if k.endswith(PRIMARY_KEYS)))
    barrier(run.state)
    return results


def report_events(run: Run, events: list[dict]) -> None:
    for ev in events:
        log.warning("%s", ev["message"])
        if run.state.is_main:
            run.outputs.metrics.write({**ev, "epoch": run.pos.epoch,
                                       **{f"health/{k}": v for k, v in run.health.counters.items()}})


def warn_short_batches(run: Run) -> None:
    short, lonely = ((run.pos.planner_state or {}).get("batcher") or {}).get("short", (0, 0))
    if short and run.state.is_main:
        log.warning("no-duplicates batching, epoch %d: %d global batches closed short of %d rows because their "
                    "rows repeat texts; %d rows could not be batched with any other row (trained alone). "
                    "De-duplicate the data, raise data.dedup_buffer, or set data.no_duplicates=false",
                    run.pos.epoch, short, run.data.global_batch, lonely)


def log_window(run: Run, window: Window, timer: Timer, lr: float, grad_norm: float | None) -> None:
    names = run.data.names
    rec = window.record(run.state, timer, names)
    if rec is not None:
        if len(names) > 1:
            rec.update({f"data/{n}/rows": r for n, r in zip(names, run.pos.dataset_rows)})
        run.outputs.metrics.write({"step": run.pos.step, "epoch": run.data.epoch_progress(run.pos), "lr": lr,
                                   "grad_norm": grad_norm, **rec})


def summary(run: Run, final: Path, seconds: float, start_step: int, rows_trained: int) -> str:
    """The end-of-run table: what ran, how fast, the eval metrics before and after, where it went."""
    steps = run.pos.step - start_step
    lines = ["run summary",
             f"  steps          {run.pos.step} ({steps} in this run, {seconds:.0f}s, "
             f"{steps / max(seconds, 1e-9):.2f} steps/s, {rows_trained / max(seconds, 1e-9):.1f} samples/s)",
             f"  rows trained   {rows_trained} in this run",
             f"  world size     {run.state.world_size} x batch {run.cfg.training.batch_size}"]
    history = run.pos.history
    if history:
        first, last = history[0], history[-1]
        for key in (k for k in last if k.endswith(tuple("/" + k for k in PRIMARY_KEYS))):
            best = max((h for h in history if h.get(key) is not None), key=lambda h: h[key], default=last)
            lines.append(f"  {key:<40} step {first['step']}: {first.get(key, float('nan')):.4f} -> "
                         f"step {last['step']}: {last[key]:.4f} (best {best[key]:.4f} at step {best['step']})")
    lines.append(f"  model          {final}")
    return "\n".join(lines)
