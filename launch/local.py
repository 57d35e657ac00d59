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
from functools import partial
from pathlib import Path

from dist_embed.distributed import free_port
from dist_embed.exit_codes import BAD_INPUT_MARKER, EXIT_BAD_INPUT, EXIT_PREEMPTED, PREEMPTED_MARKER

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc), e.g. the workers of a launcher."""
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


class LauncherSignals:
    """Stop signals the launcher receives, recorded from its start and forwarded to every worker
    (SIGINT, Ctrl-C, and SIGHUP, a closed terminal, as SIGTERM): a signal that arrives before the
    workers exist reaches them too."""

    def __init__(self, already: int | None = None):
        self.got: list[int] = [already] if already is not None else []
        self.procs: list[subprocess.Popen] = []
        self.previous: dict = {}

    def install(self) -> "LauncherSignals":
        self.previous = {s: signal.signal(s, self._on_signal) for s in FORWARDED}
        return self

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def _on_signal(self, signum, frame) -> None:
        self.got.append(signum)
        self.forward(signum)

    def forward(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM if signum in (signal.SIGINT, signal.SIGHUP) else signum)
                except ProcessLookupError:
                    pass


def _worker_start(launcher_pid: int) -> None:
    """In each worker before it runs (after fork): stop signals stay pending until its handler is in
    (dist_embed.stops), Ctrl-C is the launcher's to forward, and the worker dies with the launcher
    (SIGKILL when the launcher goes, as torchrun's agent takes its workers down with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGUSR1))
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: workers outlive a killed launcher
        pass
    if os.getppid() != launcher_pid:  # the launcher died before the line above
        os._exit(1)


def launch_local(nproc: int, worker_args: list[str], output_dir: str | None = None, *, nnodes: int = 1,
                 node_rank: int = 0, master_addr: str | None = None, master_port: int | None = None,
                 grace_s: float = 10.0, signals: LauncherSignals | None = None) -> int:
    """Run this node's ``nproc`` workers, ranks node_rank*nproc ... (multi-node: one call per node,
    e.g. one srun task per node, all given the same master address and port). Returns the job's
    exit code: 0, 75 (stopped by a signal), 2 (bad input), else the failure's."""
    if nnodes > 1 and not (master_addr and master_port):
        raise ValueError("--nnodes > 1 needs --master-addr and --master-port (the same on every node)")
    signals = signals or LauncherSignals().install()
    env = dict(os.environ)
    # one process per core share; a worker with more threads than cores only slows the others down
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.update(WORLD_SIZE=str(nnodes * nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK=str(node_rank),
               MASTER_ADDR=master_addr or "127.0.0.1", MASTER_PORT=str(master_port or free_port()))
    if signals.got:  # stopped before any worker existed
        if output_dir:
            (Path(output_dir) / PREEMPTED_MARKER).write_text("\n")  # as a worker would: nothing saved
        print(f"dist-embed: stopped by {signal.Signals(signals.got[0]).name} before the workers started (nothing to "
              "save); run again with --resume latest to start", file=sys.stderr)
        signals.restore()
        return EXIT_PREEMPTED
    markers = {name: Path(output_dir) / name for name in (PREEMPTED_MARKER, BAD_INPUT_MARKER)} if output_dir else {}
    for marker in markers.values():
        marker.unlink(missing_ok=True)
    ranks = {}
    try:
        for local in range(nproc):
            rank = node_rank * nproc + local
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(local))
            p = subprocess.Popen([sys.executable, "-m", "dist_embed", *worker_args], env=rank_env,
                                 preexec_fn=partial(_worker_start, os.getpid()))
            signals.procs.append(p)
            ranks[p.pid] = rank
        if signals.got:  # arrived while starting them: pending in each worker until it can act on it
            signals.forward(signals.got[0])
        codes, first_failure = _wait_all(signals.procs, ranks, grace_s)
    finally:
        signals.restore()
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    if all(c == EXIT_PREEMPTED for c in failed) and PREEMPTED_MARKER in markers and markers[PREEMPTED_MARKER].exists():
        name = signal.Signals(signals.got[0]).name if signals.got else "a signal"
        where = markers[PREEMPTED_MARKER].read_text().strip()
        if where:
            print(f"dist-embed: stopped by {name}; checkpoint at {where}; resume with --resume latest", file=sys.stderr)
        else:
            print(f"dist-embed: stopped by {name} before the first step (nothing to save); run again with "
                  "--resume latest to start", file=sys.stderr)
        return EXIT_PREEMPTED
    if BAD_INPUT_MARKER in markers and markers[BAD_INPUT_MARKER].exists():
        print(f"dist-embed: error: {markers[BAD_INPUT_MARKER].read_text().strip()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if first_failure:
        print(f"dist-embed: {first_failure}", file=sys.stderr)
    first = failed[0]
    return first if first > 0 else 1  # killed by a signal: a failure


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _wait_all(procs: list[subprocess.Popen], ranks: dict[int, int], grace_s: float) -> tuple[list[int], str]:
    """Wait for every worker; once one has failed, give the rest ``grace_s`` to finish (a dead peer
    breaks their collectives at once), then SIGKILL them. Returns the exit codes and which rank
    failed first and how ("" if none did, or it stopped on a signal or bad input: those say so)."""
    import time

    deadline, first = None, ""
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes, first
        if deadline is None and any(c not in (None, 0) for c in codes):
            deadline = time.monotonic() + grace_s
            p, code = next((p, c) for p, c in zip(procs, codes) if c not in (None, 0))
            if code not in (EXIT_PREEMPTED, EXIT_BAD_INPUT):
                first = f"rank {ranks[p.pid]} (pid {p.pid}) {describe_exit(code)}; the other workers were stopped"
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
