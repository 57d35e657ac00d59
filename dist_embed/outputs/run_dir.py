"""One run per output directory: who may write into it, and what a fresh start clears.

A run takes the directory's lock (``.dist-embed.lock``, an flock held for the life of the process
that took it: the launcher, or rank 0 when something else started the workers), so a second live
run into the same directory is refused with the first one's host and PID; a lock whose holder died
is free again. A run that does not ``--resume`` refuses a directory that holds another run's
checkpoints or final model, unless ``--overwrite`` clears them first. A run that restores no
checkpoint starts one fresh history (the metrics and W&B run of an attempt that died before its
first checkpoint are not continued).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .checkpoint import manifest_info, step_dirs, verify
from ..config import ConfigError
from ..exit_codes import BAD_INPUT_MARKER, PREEMPTED_MARKER

log = logging.getLogger("dist_embed")

LOCK = ".dist-embed.lock"
CLAIMED_ENV = "DIST_EMBED_OUTPUT_CLAIMED"  # set by a launcher that holds the lock for its workers
# what a run writes into its output_dir (--overwrite removes these, nothing else)
RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "row_ids", "config.yaml", "deepspeed_config.json",
               "wandb_run_id", "wandb", "report.png", "train.sbatch", "ray", "negatives", PREEMPTED_MARKER,
               BAD_INPUT_MARKER)
FRESH_START_CLEARS = ("metrics.jsonl", "wandb_run_id", PREEMPTED_MARKER, BAD_INPUT_MARKER)
_held: list[int] = []  # lock file descriptors kept open for the life of this process


class RunComplete(Exception):
    """``--resume latest`` on a run whose final model is written: nothing to do (exit 0, nothing
    rewritten). Every launcher passes ``--resume latest``, so a requeued or resubmitted job that
    already finished ends here instead of training its last steps again."""


def already_complete(output_dir: str, resume: str | None) -> str | None:
    """With ``--resume latest``: what to say if the run in ``output_dir`` is complete (an intact
    ``final/``), else None. A damaged final/ is not complete: the run goes on from its checkpoint."""
    final = Path(output_dir) / "final"
    if resume != "latest" or not final.is_dir():
        return None
    problem = verify(final)
    if problem:
        log.warning("%s is not usable (%s): resuming from the latest checkpoint, which writes it again", final, problem)
        return None
    step = manifest_info(final).get("step")
    return (f"run already complete (final/ at step {step if step is not None else '?'}): nothing to do; pass "
            "--overwrite to train it again from the start, or start a new run from it with "
            f"model.name_or_path={final}")


def output_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot take a run's outputs (None if it can): checked before any heavy work."""
    p = Path(path)
    for parent in [p, *p.parents]:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a directory"
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as e:
        return f"not writable ({e.strerror or e})"
    return None


def previous_run(out: Path) -> str | None:
    """What of another run ``out`` holds (its checkpoints, its final model), or None."""
    found = [f"checkpoints/{p.name}" for _, p in step_dirs(out / "checkpoints")][-2:]
    if (out / "final").is_dir():
        found.append("final/")
    return ", ".join(found) or None


def take_lock(out: Path) -> None:
    """Hold ``out``'s lock until this process ends, or raise ConfigError naming the live holder."""
    import fcntl

    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        raise ConfigError(f"output_dir {out}: in use by a live run (host {holder.get('host', '?')}, pid "
                          f"{holder.get('pid', '?')}, started {holder.get('started', '?')}); wait for it to end or "
                          "choose another output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    _held.append(fd)


def claim(output_dir: str, resume: str | None, overwrite: bool) -> None:
    """Make ``output_dir`` this run's (ConfigError, one line, if it cannot be): writable, locked,
    and either free of another run's checkpoints, resumed (``--resume``), or cleared (``--overwrite``).
    RunComplete: ``--resume latest`` and the run has finished."""
    out = Path(output_dir)
    problem = output_dir_problem(output_dir)
    if problem:
        raise ConfigError(f"output_dir {output_dir}: {problem}")
    if overwrite and resume:
        raise ConfigError("--overwrite starts the run over and --resume continues it: pass one of them")
    take_lock(out)
    done = already_complete(output_dir, resume)
    if done:
        raise RunComplete(done)
    if overwrite:
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        log.info("--overwrite: removed the earlier run's outputs from %s", out)
    elif resume is None:
        found = previous_run(out)
        if found:
            raise ConfigError(f"output_dir {output_dir} holds another run's checkpoints ({found}); continue it "
                              "with --resume latest, or pass --overwrite to delete them and start over")


def start_afresh(out: Path) -> None:
    """A run that restores no checkpoint: what an earlier attempt logged is not this run's history."""
    stale = [name for name in FRESH_START_CLEARS if (out / name).exists()]
    for name in stale:
        (out / name).unlink()
    if "metrics.jsonl" in stale:
        log.info("starting afresh: removed the metrics.jsonl of an earlier attempt that left no checkpoint")
