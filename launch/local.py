"""Start this node's workers (``--nproc N``, and ``--nnodes``): one process per rank, started and
watched here.

The workers run the one worker entry (``python -m dist_embed train``); seeing RANK and WORLD_SIZE
in their environment (what torchrun would set) they join the process group. We start them
ourselves rather than through torchrun so that stop signals (SIGTERM, SIGUSR1, SIGINT) reach the
workers directly, they checkpoint and exit 75, and the user sees one line saying so, not the
elastic agent's ChildFailedError traceback. On several nodes the launchers watch each other
(control.py); a failure anywhere stops every node's workers at once (supervise.py says why in one
line), and ``--max-restarts`` starts a new generation of workers on every node, resuming.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import itertools
import tempfile
from functools import partial
from pathlib import Path

from dist_embed.distributed import free_port
from dist_embed.engine.worker import SUPERVISED_ENV
from dist_embed.exit_codes import (BAD_INPUT_MARKER, EXIT_BAD_INPUT, EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED,
                                   PREEMPTED_MARKER)
from dist_embed.outputs.run_outputs import STEP_FILE_ENV

from .control import Coordinator, Member, Mismatch, Unjoined, Verdict
from .supervise import decide, one_line, read_step, settle, stop_workers, supervise

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
                 grace_s: float = 10.0, signals: LauncherSignals | None = None, max_restarts: int = 0,
                 peer_timeout_s: float = 30.0, join_timeout_s: float = 300.0, ckpt_root: Path | None = None) -> int:
    """Run this node's ``nproc`` workers, ranks node_rank*nproc ... (multi-node: one call per node,
    e.g. one srun task per node, all given the same master address and port: node 0's launcher
    listens there, control.py). Up to ``max_restarts`` times a failed generation of workers is
    started again on every node, resuming from the latest checkpoint. Returns the job's exit code:
    0, 75 (stopped by a signal), 2 (bad input), 76 (a peer lost), else the failure's."""
    if nnodes > 1 and not (master_addr and master_port):
        raise ValueError("--nnodes > 1 needs --master-addr and --master-port (the same on every node)")
    signals = signals or LauncherSignals().install()
    control = None
    try:
        if nnodes > 1 and node_rank == 0:
            try:
                control = Coordinator(master_port, nnodes, nproc, peer_timeout_s, _job_of(output_dir))
            except OSError as e:
                print(f"dist-embed: error: cannot listen on port {master_port} for the other nodes: {e.strerror or e}",
                      file=sys.stderr)
                return EXIT_BAD_INPUT
        elif nnodes > 1:
            control = Member(master_addr, master_port, node_rank, nproc, peer_timeout_s, _job_of(output_dir))
        job = _Job(nproc, worker_args, output_dir, nnodes, node_rank, master_addr, master_port, grace_s,
                   peer_timeout_s, join_timeout_s, ckpt_root)
        return job.run(control, signals, max_restarts)
    finally:
        signals.restore()
        if control is not None:
            control.close()


class _Job:
    """This node's part of the job: generations of workers until one ends it."""

    def __init__(self, nproc, worker_args, output_dir, nnodes, node_rank, master_addr, master_port, grace_s,
                 window, join_timeout_s, ckpt_root):
        self.nproc, self.worker_args, self.nnodes, self.node_rank = nproc, list(worker_args), nnodes, node_rank
        self.master_addr, self.master_port, self.grace_s = master_addr, master_port, grace_s
        self.window, self.join_timeout_s, self.ckpt_root = window, join_timeout_s, ckpt_root
        self.markers = {n: Path(output_dir) / n for n in (PREEMPTED_MARKER, BAD_INPUT_MARKER)} if output_dir else {}
        self.output_dir = output_dir
        self.env = dict(os.environ)
        # one process per core share; a worker with more threads than cores only slows the others down
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        self.env.update(WORLD_SIZE=str(nnodes * nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK=str(node_rank),
                        MASTER_ADDR=master_addr or "127.0.0.1", **{SUPERVISED_ENV: "1"})

    def run(self, control, signals: LauncherSignals, max_restarts: int) -> int:
        restarts, resume = 0, _resume_of(self.worker_args)
        fd, step_path = tempfile.mkstemp(prefix="dist-embed-step-")
        os.close(fd)
        step_file = Path(step_path)
        try:
            for generation in itertools.count():
                started = self._rendezvous(control, signals, resume, generation)
                if isinstance(started, int):
                    return started
                port, resume = started
                if signals.got:  # stopped before any worker existed
                    return self._stopped_before_start(signals, control)
                verdict = self._generation(control, signals, port, resume, step_file)
                step = max(read_step(step_file), control.step if control is not None else 0, verdict.step or 0)
                restart = verdict.code not in (EXIT_OK, EXIT_PREEMPTED, EXIT_BAD_INPUT) and \
                    decide(control, verdict, restarts, max_restarts, bool(signals.got))
                if isinstance(control, Coordinator) and verdict.code not in (EXIT_OK, EXIT_PREEMPTED):
                    control.abort(Verdict(verdict.code, verdict.why, restart, step))  # every node, at once
                if verdict.code in (EXIT_OK, EXIT_PREEMPTED, EXIT_BAD_INPUT):
                    return self._end(verdict, signals)
                if restart:
                    restarts += 1
                print(one_line(verdict, step, restart, (restarts, max_restarts), self.ckpt_root), file=sys.stderr,
                      flush=True)
                if not restart:
                    return verdict.code
                resume = "latest"
        finally:
            step_file.unlink(missing_ok=True)

    def _rendezvous(self, control, signals: LauncherSignals, resume: str | None, generation: int):
        """(the process group's port, the workers' --resume) for the next generation, or an exit code."""
        stopping = lambda: bool(signals.got)  # noqa: E731
        try:
            if isinstance(control, Coordinator):
                if control.gather(self.join_timeout_s, stopping) is None:
                    return self._stopped_before_start(signals, control)
                port = free_port("")
                control.go(port, resume)
                return port, resume
            if isinstance(control, Member):
                msg = control.join(self.join_timeout_s, stopping)
                if msg is None:
                    return self._stopped_before_start(signals, control)
                if msg["t"] == "abort":  # the job ended (or was stopped) before this node could join again
                    if int(msg["code"]) == EXIT_PREEMPTED:
                        print("dist-embed: the job was stopped before the workers started again; run again with "
                              "--resume latest", file=sys.stderr)
                    elif int(msg["code"]) == EXIT_BAD_INPUT:
                        print(f"dist-embed: error: {msg['why']}", file=sys.stderr)
                    else:
                        print(f"dist-embed: {msg['why']}; exit {msg['code']}", file=sys.stderr)
                    return int(msg["code"])
                return int(msg["port"]), msg.get("resume")
        except Mismatch as e:
            control.abort(Verdict(EXIT_BAD_INPUT, str(e), restart=False))
            print(f"dist-embed: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Unjoined as e:
            if isinstance(control, Coordinator):  # the members waiting for it learn it too
                control.abort(Verdict(EXIT_PEER_LOST, str(e), restart=False))
            print(f"dist-embed: {e}; exit {EXIT_PEER_LOST}: run the job again with every node", file=sys.stderr,
                  flush=True)
            return EXIT_PEER_LOST
        return (self.master_port if self.master_port and generation == 0 else free_port()), resume

    def _generation(self, control, signals: LauncherSignals, port: int, resume: str | None, step_file: Path):
        """Start this node's workers, watch them and the other nodes, stop what is left: the verdict."""
        for marker in self.markers.values():
            marker.unlink(missing_ok=True)
        args = _with_resume(self.worker_args, resume)
        ranks, signals.procs = {}, []
        try:
            for local in range(self.nproc):
                rank = self.node_rank * self.nproc + local
                env = dict(self.env, RANK=str(rank), LOCAL_RANK=str(local), MASTER_PORT=str(port))
                if local == 0:
                    env[STEP_FILE_ENV] = str(step_file)
                p = subprocess.Popen([sys.executable, "-m", "dist_embed", *args], env=env,
                                     preexec_fn=partial(_worker_start, os.getpid()))
                signals.procs.append(p)
                ranks[p.pid] = rank
            if signals.got:  # arrived while starting them: pending in each worker until it can act on it
                signals.forward(signals.got[0])
            verdict = supervise(signals.procs, ranks, control, self.markers.get(BAD_INPUT_MARKER), step_file,
                                self.grace_s, self.window, socket.gethostname() if self.nnodes > 1 else "")
        finally:
            stop_workers(signals.procs)
        verdict = settle(control, verdict, self.window)
        if isinstance(control, Coordinator) and verdict.code in (EXIT_OK, EXIT_PREEMPTED):
            control.await_done(self.window)
        elif isinstance(control, Member) and verdict.code in (EXIT_OK, EXIT_PREEMPTED):
            control.report("done", verdict.code)
        return verdict

    def _stopped_before_start(self, signals: LauncherSignals, control) -> int:
        if self.output_dir:
            (Path(self.output_dir) / PREEMPTED_MARKER).write_text("\n")  # as a worker would: nothing saved
        if isinstance(control, Coordinator):
            control.abort(Verdict(EXIT_PREEMPTED, "stopped", restart=False))
        name = signal.Signals(signals.got[0]).name if signals.got else "a signal"
        print(f"dist-embed: stopped by {name} before the workers started (nothing to save); run again with "
              "--resume latest to start", file=sys.stderr)
        return EXIT_PREEMPTED

    def _end(self, verdict, signals: LauncherSignals) -> int:
        if verdict.code == EXIT_OK:
            return EXIT_OK
        if verdict.code == EXIT_BAD_INPUT:
            print(f"dist-embed: error: {verdict.why}", file=sys.stderr)
            return EXIT_BAD_INPUT
        marker = self.markers.get(PREEMPTED_MARKER)
        name = signal.Signals(signals.got[0]).name if signals.got else "a signal"
        where = marker.read_text().strip() if marker is not None and marker.exists() else None
        if where:
            print(f"dist-embed: stopped by {name}; checkpoint at {where}; resume with --resume latest", file=sys.stderr)
        elif where is not None:
            print(f"dist-embed: stopped by {name} before the first step (nothing to save); run again with "
                  "--resume latest to start", file=sys.stderr)
        return EXIT_PREEMPTED


def _job_of(output_dir: str | None) -> str:
    """What every node of one job agrees on: its output directory (resolved)."""
    return str(Path(output_dir).resolve()) if output_dir else ""


def _resume_of(args: list[str]) -> str | None:
    return args[args.index("--resume") + 1] if "--resume" in args[:-1] else None


def _with_resume(args: list[str], resume: str | None) -> list[str]:
    """The worker arguments with this generation's ``--resume`` (the coordinator's, on every node)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        else:
            out.append(a)
    return out + (["--resume", resume] if resume else [])
