#!/usr/bin/env python3
"""Two nodes against one: step time over a network, and the sharded plane's hash exchange in it.

    sudo python benchmarks/two_nodes.py [--steps 30] [--repeats 2]

Three real trainings of the quickstart (MiniLM, 32 triplets per process per step, seq 64, fp32,
no-duplicates batching, evaluation and checkpoints off), 2 processes each, side by side in one
invocation: ``--nproc 2`` on one node (loopback), and ``--nnodes 2 --nproc 1`` across two
network-namespace nodes (tests/netns.py: a veth pair through a bridge) on the sharded and on the
global data plane. Step time: the median of the per-step ``seconds_per_step`` after the first 5
steps. The exchange: the time rank 0 spends in the sharded plane's collectives (its planner's
``GlooExchange``: hash ownership and the agreed batch sizes), measured in the workers through a
``sitecustomize`` this script writes (nothing in the library is timed for it), per step; on CPU
the planner runs in the training thread, so this time is part of the step. ``comm_share``: the
step's share in the gradient all-reduce and the embedding gathers (``time/comm`` in metrics.jsonl).
One thread per process everywhere: the nodes share this machine's cores. Needs root (namespaces).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

TIMING = '''
import json, os, time
try:
    from dist_embed.data import sharded as _sharded
except Exception:
    _sharded = None
if _sharded is not None and os.environ.get("BENCH_EXCHANGE_DIR") and os.environ.get("RANK"):
    _total = {"seconds": 0.0, "calls": 0}
    _path = os.path.join(os.environ["BENCH_EXCHANGE_DIR"], "rank" + os.environ["RANK"] + ".json")

    def _timed(f):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                _total["seconds"] += time.perf_counter() - t0
                _total["calls"] += 1
                with open(_path, "w") as out:
                    json.dump(_total, out)
        return call

    _sharded.GlooExchange.lost = _timed(_sharded.GlooExchange.lost)
    _sharded.GlooExchange.gather = _timed(_sharded.GlooExchange.gather)
'''


def args_for(out: Path, steps: int, plane: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "train", str(REPO / "configs" / "quickstart.yaml"),
            f"output_dir={out}", f"training.max_steps={steps}", "training.log_steps=1", "eval.steps=0", "eval.sts=[]",
            "eval.retrieval=[]", "eval.before_training=false", "checkpoint.steps=0", f"data.plane={plane}"]


def measure(cluster, name: str, plane: str, nnodes: int, steps: int, root: Path) -> dict:
    out, timing = root / name, root / f"{name}-exchange"
    timing.mkdir(parents=True)
    # the nodes share this machine's cores: one thread per process, as --nproc 2 sets on one node
    env = dict(os.environ, HF_HUB_OFFLINE="1", BENCH_EXCHANGE_DIR=str(timing), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root / "site"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    base = args_for(out, steps, plane)
    if nnodes == 1:
        procs = [cluster.popen(cluster.nodes[0], base + ["--nproc", "2"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    else:
        procs = [cluster.popen(cluster.nodes[i], base + ["--nproc", "1", "--nnodes", "2", "--node-rank", str(i),
                                                         "--master-addr", "node0", "--master-port", "29700"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(nnodes)]
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode:
            sys.exit(f"{name}: exit {p.returncode}\n{err[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "seconds_per_step" in r][5:]
    per_step = [r["seconds_per_step"] for r in timed]
    exchange = json.loads((timing / "rank0.json").read_text()) if (timing / "rank0.json").exists() else \
        {"seconds": 0.0, "calls": 0}
    s_step = statistics.median(per_step)
    total_steps = max(r["step"] for r in records if "seconds_per_step" in r)
    ex_step = exchange["seconds"] / total_steps
    return {"run": name, "plane": plane, "nodes": nnodes, "s_per_step": round(s_step, 4),
            "exchange_s_per_step": round(ex_step, 5),
            "exchange_calls_per_step": round(exchange["calls"] / total_steps, 2),
            "exchange_share": round(ex_step / s_step, 4),
            "comm_share": round(statistics.median(r.get("time/comm", 0.0) for r in timed), 4)}


def main() -> None:
    from netns import NetnsCluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    why = NetnsCluster.unavailable()
    if why:
        sys.exit(f"cannot build the nodes: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "site").mkdir()
        (root / "site" / "sitecustomize.py").write_text(TIMING)
        cluster = NetnsCluster(2, root / "nodes").start()
        try:
            for repeat in range(args.repeats):
                for name, plane, nnodes in (("one-node", "sharded", 1), ("two-nodes", "sharded", 2),
                                            ("two-nodes-global", "global", 2)):
                    print(json.dumps(measure(cluster, f"{name}-{repeat}", plane, nnodes, args.steps, root)),
                          flush=True)
        finally:
            cluster.close()


if __name__ == "__main__":
    main()
