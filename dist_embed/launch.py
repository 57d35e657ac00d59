"""Start workers on this machine (``--nproc N``) with torch's elastic launcher (torchrun).

The workers run the same ``dist-embed train`` entry point; seeing WORLD_SIZE in their environment
they join the process group instead of launching again. Stop signals sent to this process (SIGTERM,
SIGUSR1, SIGINT) are forwarded to the workers themselves, so they can checkpoint and exit with
EXIT_PREEMPTED, rather than to torchrun, which would kill them after a grace period.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def _ignore_usr1() -> None:
    # torchrun has no SIGUSR1 handler and would die of it; its workers install their own
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def launch_local(nproc: int, worker_args: list[str], output_dir: str | None = None, *, nnodes: int = 1,
                 node_rank: int = 0, master_addr: str | None = None, master_port: int | None = None) -> int:
    """Run torchrun for this node: ``nproc`` workers, ranks node_rank*nproc ... (multi-node: one
    call per node, e.g. one srun task per node, all given the same master address and port)."""
    from .cli import BAD_INPUT_MARKER, EXIT_BAD_INPUT, EXIT_PREEMPTED

    env = dict(os.environ)
    # torchrun would force 1 thread per worker; share the cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if nnodes > 1 and not (master_addr and master_port):
        raise ValueError("--nnodes > 1 needs --master-addr and --master-port (the same on every node)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
           "--nproc-per-node", str(nproc), "--master-addr", master_addr or "127.0.0.1",
           "--master-port", str(master_port or free_port()), "--module", "dist_embed.cli", *worker_args]
    markers = {name: Path(output_dir) / name for name in ("PREEMPTED", BAD_INPUT_MARKER)} if output_dir else {}
    for marker in markers.values():
        marker.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_usr1)
    signalled: list[int] = []

    def forward(signum, frame):
        signalled.append(signum)
        for pid in child_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        code = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if code != 0 and "PREEMPTED" in markers and markers["PREEMPTED"].exists():
        return EXIT_PREEMPTED
    if code != 0 and BAD_INPUT_MARKER in markers and markers[BAD_INPUT_MARKER].exists():
        return EXIT_BAD_INPUT
    return code
