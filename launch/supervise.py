"""Watching one generation of a node's workers: what ended it, and the one line that says so.

The workers' exit codes tell a cause from a consequence: a worker that raised (1), stopped on bad
input (2) or was killed by a signal is the cause; a worker whose process group broke under it (76)
is a consequence of something elsewhere, which the control channel (``control.py``) names: a lost
node, or a failure another node reported. Every verdict becomes one line on the console (the
workers' tracebacks stay in output_dir/logs/): what happened, after which step, and what a restart
will resume from.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path

from dist_embed.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED

from .control import Coordinator, Member, Verdict

RESTARTABLE = (EXIT_FAILED, EXIT_PEER_LOST)  # torchrun's meaning of --max-restarts: any failure


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def read_step(path: Path | None) -> int:
    try:
        return int(path.read_text().strip() or 0) if path else 0
    except (OSError, ValueError):
        return 0


def local_verdict(procs: list[subprocess.Popen], ranks: dict[int, int], bad_input: Path | None,
                  host: str = "") -> Verdict | None:
    """A verdict from this node's workers alone, once one of them is the cause (or all are done)."""
    codes = [p.poll() for p in procs]
    for p, code in zip(procs, codes):
        if code is None or code in (EXIT_OK, EXIT_PREEMPTED, EXIT_PEER_LOST):
            continue
        who = f"rank {ranks[p.pid]} (pid {p.pid}{', ' + host if host else ''})"
        if code == EXIT_BAD_INPUT:
            text = bad_input.read_text().strip() if bad_input is not None and bad_input.exists() else ""
            return Verdict(EXIT_BAD_INPUT, text or f"{who} stopped on bad input")
        return Verdict(EXIT_PEER_LOST if code < 0 else code, f"{who} {describe_exit(code)}")
    if all(c is not None for c in codes):
        if all(c == EXIT_OK for c in codes):
            return Verdict(EXIT_OK, "")
        if all(c in (EXIT_OK, EXIT_PREEMPTED) for c in codes):
            return Verdict(EXIT_PREEMPTED, "")
    return None


def supervise(procs: list[subprocess.Popen], ranks: dict[int, int], control, bad_input: Path | None,
              step_file: Path | None, grace_s: float, window: float, host: str = "") -> Verdict:
    """Watch the workers (and the other nodes) until the generation ends; the verdict. A worker
    that exits 75 or 76 waits for the others (or a cause) at most ``grace_s`` / ``window`` s."""
    waiting_since = None
    while True:
        if control is not None:
            control.step = max(control.step, read_step(step_file))
            verdict = control.check()
            if verdict is not None:
                return verdict
        verdict = local_verdict(procs, ranks, bad_input, host)
        if verdict is not None:
            return verdict
        codes = [p.poll() for p in procs]
        if any(c is not None for c in codes):
            waiting_since = waiting_since or time.monotonic()
            broke = [p for p, c in zip(procs, codes) if c == EXIT_PEER_LOST]
            if time.monotonic() - waiting_since > (window if broke else grace_s):
                if broke:
                    p = broke[0]
                    return Verdict(EXIT_PEER_LOST, f"the process group broke under rank {ranks[p.pid]} (pid {p.pid}) "
                                                   "and no node reported why")
                return Verdict(EXIT_PREEMPTED, "")  # some stopped on a signal; the rest did not follow
        time.sleep(0.05)


def stop_workers(procs: list[subprocess.Popen]) -> None:
    """SIGKILL whatever still runs (a worker blocked in a collective cannot act on anything gentler)."""
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def restart_point(ckpt_root: Path | None) -> str:
    """The checkpoint a restart resumes from, as the user reads it."""
    if ckpt_root is None:
        return ""
    from dist_embed.outputs.checkpoint import find_resumable

    logging.disable(logging.WARNING)  # a broken checkpoint passed over is the resumed run's to report
    try:
        ckpt = find_resumable(ckpt_root)
    finally:
        logging.disable(logging.NOTSET)
    return str(ckpt) if ckpt is not None else ""


def one_line(verdict: Verdict, step: int, restart: bool, restarts: tuple[int, int], ckpt_root: Path | None) -> str:
    """``dist-embed: <what happened> after step N; <what comes next>``."""
    where = f" after step {step}" if step else " before the first step"
    what, _, how = verdict.why.partition(": ")
    head = f"dist-embed: {what}{where}" + (f": {how}" if how else "")
    if ckpt_root is None:
        point = ""
    else:
        ckpt = restart_point(ckpt_root)
        point = f" from {ckpt}" if ckpt else " from the start (no checkpoint yet)"
    if restart:
        return f"{head}; restarting (restart {restarts[0]} of {restarts[1]}){point}"
    if verdict.code == EXIT_PEER_LOST:
        return f"{head}; exit {verdict.code}: run again with --resume latest to continue{point}"
    return f"{head}; exit {verdict.code}" + (f"; --resume latest continues{point}" if point else "")


def decide(control, verdict: Verdict, restarts: int, max_restarts: int, stopping: bool) -> bool:
    """Whether this generation's failure restarts the workers: the coordinator decides for the job
    (and tells the members), a member follows it, or decides alone when the coordinator is gone."""
    if isinstance(control, Member) and verdict.restart is not None:
        return verdict.restart and not stopping
    return verdict.code in RESTARTABLE and restarts < max_restarts and not stopping


def settle(control, verdict: Verdict, window: float) -> Verdict:
    """A member's local failure goes to the coordinator, whose answer is the job's verdict (at most
    ``window`` s later: if the coordinator is gone too, the local one stands)."""
    if isinstance(control, Member) and verdict.restart is None and verdict.code not in (EXIT_OK, EXIT_PREEMPTED):
        if not verdict.why.startswith(("lost contact", "this node")):  # else the coordinator is out of reach
            control.report("fail", verdict.code, verdict.why)
            answer = control.await_verdict(window + 2)
            if answer is not None:
                return answer
    if isinstance(control, Coordinator):
        control.step = max(control.step, verdict.step or 0)
    return verdict
