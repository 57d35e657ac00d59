"""Start workers on this machine (``--nproc N``): one process per rank, started and watched here.

The workers run the same ``dist-embed train`` entry point; seeing RANK and WORLD_SIZE in their
environment (what torchrun would set) they join the process group instead of launching again.
We start them ourselves rather than through torchrun so that stop signals (SIGTERM, SIGUSR1,
SIGINT) reach the workers directly, they checkpoint and exit 75, and the user sees one line
saying so, not the elastic agent's ChildFailedError traceback. A worker that fails takes the
others down after a short grace period (a dead peer also breaks their collectives at once).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ..distributed import free_port
from ..exit_codes import BAD_INPUT_MARKER, EXIT_BAD_INPUT, EXIT_PREEMPTED, PREEMPTED_MARKER

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc), i.e. torchrun's worker processes."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def _worker_signals() -> None:
    # the launcher forwards SIGINT (Ctrl-C) as SIGTERM; a worker must not die of the terminal's copy
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def launch_local(nproc: int, worker_args: list[str], output_dir: str | None = None, *, nnodes: int = 1,
                 node_rank: int = 0, master_addr: str | None = None, master_port: int | None = None,
                 grace_s: float = 10.0) -> int:
    """Run this node's ``nproc`` workers, ranks node_rank*nproc ... (multi-node: one call per node,
    e.g. one srun task per node, all given the same master address and port). Returns the job's
    exit code: 0, 75 (stopped by a signal after a checkpoint), 2 (bad input), else the failure's."""
    if nnodes > 1 and not (master_addr and master_port):
        raise ValueError("--nnodes > 1 needs --master-addr and --master-port (the same on every node)")
    env = dict(os.environ)
    # one process per core share; a worker with more threads than cores only slows the others down
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.update(WORLD_SIZE=str(nnodes * nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK=str(node_rank),
               MASTER_ADDR=master_addr or "127.0.0.1", MASTER_PORT=str(master_port or free_port()))
    markers = {name: Path(output_dir) / name for name in (PREEMPTED_MARKER, BAD_INPUT_MARKER)} if output_dir else {}
    for marker in markers.values():
        marker.unlink(missing_ok=True)
    procs = []
    for local in range(nproc):
        rank_env = dict(env, RANK=str(node_rank * nproc + local), LOCAL_RANK=str(local))
        procs.append(subprocess.Popen([sys.executable, "-m", "dist_embed.cli", *worker_args], env=rank_env,
                                      preexec_fn=_worker_signals))
    signalled: list[int] = []

    def forward(signum, frame):
        signalled.append(signum)
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        codes = _wait_all(procs, grace_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    if all(c == EXIT_PREEMPTED for c in failed) and markers.get(PREEMPTED_MARKER, Path("/nonexistent")).exists():
        name = signal.Signals(signalled[0]).name if signalled else "a signal"
        where = markers[PREEMPTED_MARKER].read_text().strip()
        print(f"dist-embed: stopped by {name}; checkpoint at {where}; resume with --resume latest", file=sys.stderr)
        return EXIT_PREEMPTED
    if BAD_INPUT_MARKER in markers and markers[BAD_INPUT_MARKER].exists():
        return EXIT_BAD_INPUT
    first = failed[0]
    return first if first > 0 else 1  # killed by a signal: a failure


def _wait_all(procs: list[subprocess.Popen], grace_s: float) -> list[int]:
    """Wait for every worker; once one has failed, the rest get ``grace_s`` to finish, then SIGKILL."""
    import time

    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if deadline is None and any(c not in (None, 0) for c in codes):
            deadline = time.monotonic() + grace_s
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
