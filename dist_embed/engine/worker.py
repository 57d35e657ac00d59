"""The one worker entry: every launcher (--nproc, torchrun, accelerate, srun, Ray) starts a process
or thread that calls ``run_worker``, which joins the process group, trains, and turns the outcome
into an exit code and a marker file the launcher reads."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import ConfigError
from ..data.readers import DataError
from ..distributed import finish, init_distributed
from ..outputs.run_dir import RunComplete
from ..exit_codes import BAD_INPUT_MARKER, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, PREEMPTED_MARKER

log = logging.getLogger("dist_embed")


def run_worker(cfg, resume: str | None, *, allow_data_change: bool = False, allow_fresh_start: bool = False,
               overwrite: bool = False, hard_exit: bool = True) -> int:
    """The one worker entry point that --nproc, torchrun, accelerate, srun and Ray all start.

    Returns the exit code (0 done, 2 bad input, 75 stopped by a signal, 1 failed) and leaves a
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
    except Exception:
        log.exception("training failed")
        code = EXIT_FAILED
    if state.enabled and hard_exit:
        finish(state, code, sync=code in (EXIT_OK, EXIT_PREEMPTED))  # never returns
    return code


def write_marker(out: Path, name: str, text: str, rank: int) -> None:
    """A marker file, written whole (the first rank to fail may be any rank)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{name}.rank{rank}"
    tmp.write_text(f"{text}\n")
    os.replace(tmp, out / name)
