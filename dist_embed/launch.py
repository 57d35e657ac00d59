"""Start workers on this machine (``--nproc N``) with torch's elastic launcher (torchrun).

The workers run the same ``dist-embed train`` entry point; seeing WORLD_SIZE in their environment
they join the process group instead of launching again.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_local(nproc: int, worker_args: list[str]) -> int:
    env = dict(os.environ)
    # torchrun would force 1 thread per worker; share the cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--module", "dist_embed.cli",
           *worker_args]
    proc = subprocess.run(cmd, env=env)
    return proc.returncode
