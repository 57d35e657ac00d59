"""The one worker entry: every launcher (--nproc, torchrun, accelerate, srun, Ray) starts a process
or thread that calls ``run_worker``, which joins the process group, trains, and turns the outcome
into an exit code and a marker file the launcher reads. A process group that breaks under a rank (a
peer lost) is told apart from a failure of the rank itself: exit 76, its traceback only in a log file."""
from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from pathlib import Path

from ..config import ConfigError
from ..data.readers import DataError
from ..distributed import finish, init_distributed
from ..exit_codes import (BAD_INPUT_MARKER, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED,
                          PREEMPTED_MARKER, WORKER_LOGS)
from ..outputs.run_dir import RunComplete

log = logging.getLogger("dist_embed")
# set by our launcher for its workers: it says in one line what happened to the job, so a worker
# whose process group broke writes only to its log file
SUPERVISED_ENV = "DIST_EMBED_SUPERVISED"


def run_worker(cfg, resume: str | None, *, allow_data_change: bool = False, allow_fresh_start: bool = False,
               overwrite: bool = False, hard_exit: bool = True) -> int:
    """The one worker entry point that --nproc, torchrun, accelerate, srun and Ray all start.

    Returns the exit code (0 done, 2 bad input, 75 stopped by a signal, 76 the process group broke
    under this rank: a peer was lost, 1 failed) and leaves a
    marker in output_dir for the launcher (BAD_INPUT: the one line; PREEMPTED: the checkpoint).
    ``hard_exit``: end the process after the last barrier (our own process group); Ray owns its
    worker processes and process group, so there the code is returned."""
    from ..outputs.tracking import setup_logging
    from .health import TrainingHealthError
    from .loop import train
    from .stops import STOPS, Preempted

    STOPS.install()  # usually done at process start already (main); Ray's thread cannot
    state = init_distributed(cfg.distributed.timeout_s, group_of_one=cfg.distributed.backend == "deepspeed")
    setup_logging(state.rank)
    code = EXIT_OK
    out = Path(cfg.output_dir)
    try:
        train(cfg, state, resume, allow_data_change=allow_data_change, allow_fresh_start=allow_fresh_start,
              overwrite=overwrite)
    except RunComplete as e:  # --resume latest on a finished run: nothing to do, nothing rewritten
        if state.is_main:
            log.info("%s", e)
    except (ConfigError, DataError) as e:
        log.error("%s", e)
        code = EXIT_BAD_INPUT
        if state.enabled or not hard_exit:  # torchrun and Ray report any failure alike: say which
            write_marker(out, BAD_INPUT_MARKER, f"{e}", state.rank)
    except Preempted as e:
        log.warning("%s; exit code %d (requeue and resume with --resume latest)", e, EXIT_PREEMPTED)
        code = EXIT_PREEMPTED
        if state.is_main:
            write_marker(out, PREEMPTED_MARKER, str(e.checkpoint or ""), state.rank)
    except TrainingHealthError as e:
        log.error("training stopped: %s", e)
        code = EXIT_FAILED
    except Exception as e:
        if state.enabled and group_broke(e):
            code = EXIT_PEER_LOST
            where = log_to_file(out, state.rank, "the process group broke under this rank (a peer was lost?)")
            if not os.environ.get(SUPERVISED_ENV):  # torchrun, Ray: nobody else says it
                log.error("the process group broke (a peer was lost?): %s: %s; traceback in %s", type(e).__name__,
                          str(e).strip().splitlines()[0] if str(e).strip() else "", where)
        else:
            log.exception("training failed")
            code = EXIT_FAILED
    if state.enabled and hard_exit:
        finish(state, code, sync=code in (EXIT_OK, EXIT_PREEMPTED))  # never returns
    return code


def group_broke(e: BaseException) -> bool:
    """A collective failed because a peer went away (gloo: "Connection closed by peer", a receive
    timed out; NCCL and the store: torch's DistError), not because of anything this rank did: the
    innermost frame of a RuntimeError is torch.distributed's own."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    if not isinstance(e, RuntimeError) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "torch/distributed/" in tb.tb_frame.f_code.co_filename.replace("\\", "/")


def log_to_file(out: Path, rank: int, what: str) -> Path:
    """Append the exception being handled, with what happened, to output_dir/logs/rank<R>.log."""
    path = out / WORKER_LOGS / f"rank{rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()} pid {os.getpid()} rank {rank}: "
                    f"{what}\n{traceback.format_exc()}\n")
    except OSError as e:  # the log is a courtesy: the exit code still says what happened
        log.warning("could not write %s: %s", path, e)
    return path


def write_marker(out: Path, name: str, text: str, rank: int) -> None:
    """A marker file, written whole (the first rank to fail may be any rank)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{name}.rank{rank}"
    tmp.write_text(f"{text}\n")
    os.replace(tmp, out / name)
