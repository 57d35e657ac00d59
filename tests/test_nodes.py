"""Several nodes, each a network namespace with its own hostname and address (tests/netns.py), one
``dist-embed train --nnodes 2`` launcher on each: a node killed, cut off, frozen or missing is
noticed within the stated bounds, named in one line, answered with exit 76 or, with --max-restarts,
a restart. The runs that recover train every row once and give the per-step losses and the final
weights of ``--nproc 2`` on one machine: 2 nodes x 1 process is that same world (dropout off)."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from itertools import count

import pytest

from conftest import REPO, quick_triplets, run_cli, tiny_config, train_losses, write_jsonl
from netns import Console, NetnsCluster
from test_distributed import max_weight_diff, read_row_log
from test_resume import chain_rows

from dist_embed.outputs.checkpoint import step_dirs, verify

pytestmark = pytest.mark.slow
ROWS = 960  # global batch 16: 60 steps, a checkpoint every 5
WINDOW, JOIN = 5, 60  # distributed.peer_timeout_s and join_timeout_s in these tests (defaults 30 and 300)
SLACK = 3  # seconds beyond the window for noticing, saying and exiting on a loaded 2-core machine
PORTS = count(29500)


def namespace_cluster(tmp_path_factory, n: int = 2) -> NetnsCluster:
    why = NetnsCluster.unavailable()
    if why:  # e.g. not root, or a container without CAP_SYS_ADMIN
        pytest.skip(f"no network namespaces here: {why}")
    return NetnsCluster(n, tmp_path_factory.mktemp("nodes")).start()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    cluster = namespace_cluster(tmp_path_factory)
    yield cluster
    cluster.close()


_JOBS: dict = {}  # one reference run per test session, shared with test_cluster_jobs


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model):
    """The config every multi-node test runs (dropout off, every row logged), and an uninterrupted
    ``--nproc 2`` run of it on one machine: what every 2-node run must equal (the same world)."""
    if "job" not in _JOBS:
        root = tmp_path_factory.mktemp("job")
        data = write_jsonl(root / "t.jsonl", quick_triplets(ROWS))
        cfg = tiny_config(root, tiny_model, data, data={"no_duplicates": True},
                          training={"max_steps": -1, "epochs": 1, "batch_size": 8, "log_steps": 1},
                          checkpoint={"steps": 5, "keep_last": 3})
        reference = root / "reference"
        r = run_cli("train", cfg, f"output_dir={reference}", "--nproc", "2", env={"DIST_EMBED_LOG_ROW_IDS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        _JOBS["job"] = (cfg, reference)
    return _JOBS["job"]


def launch(nodes, i, cfg, out, port, *extra, nnodes=2) -> Console:
    cmd = [sys.executable, "-m", "launch.cli", "train", cfg, f"output_dir={out}", "--nproc", "1", "--nnodes", nnodes,
           "--node-rank", i, "--master-addr", "node0", "--master-port", port, f"distributed.peer_timeout_s={WINDOW}",
           f"distributed.join_timeout_s={JOIN}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", DIST_EMBED_LOG_ROW_IDS="1")
    return Console(nodes.popen(nodes.nodes[i], cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True))


def wait_for_step(out, step: int, consoles=(), timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        f = out / "metrics.jsonl"
        if f.exists() and any(json.loads(l).get("step", 0) >= step and "loss" in l for l in f.read_text().splitlines()):
            return
        assert all(c.proc.poll() is None for c in consoles), "\n".join(c.text()[-2000:] for c in consoles)
        time.sleep(0.05)
    raise TimeoutError(step)


def assert_same_as_reference(out, reference) -> None:
    """Every row once in the chain of steps that made the weights, the same per-step losses (one
    history across the restart) and the same final weights as the uninterrupted run."""
    ids = [i for rows in chain_rows(read_row_log(out)).values() for i in rows]
    assert Counter(ids) == Counter(range(ROWS))
    assert train_losses(out) == pytest.approx(train_losses(reference), rel=1e-6)
    assert max_weight_diff(out, reference) < 1e-6


def no_traceback(*consoles) -> None:
    for c in consoles:
        assert "Traceback" not in c.text(), c.text()[-3000:]


def test_a_killed_node_is_named_at_once_and_the_job_recovers_when_it_comes_back(nodes, job, tmp_path):
    """SIGKILL of every process on node 1 mid-run: its connection closes, so node 0 knows at once
    (bound: the slack alone, whatever the window), says so in one line and waits for it; node 1
    started again (the same command) rejoins and the job finishes as if nothing had happened."""
    cfg, reference = job
    out, port = tmp_path / "run", next(PORTS)
    n0, n1 = (launch(nodes, i, cfg, out, port, "--max-restarts", "1") for i in (0, 1))
    wait_for_step(out, 8, [n0, n1])
    killed = time.monotonic()
    nodes.signal_node(nodes.nodes[1], signal.SIGKILL)
    said = n0.wait_for(r"^dist-embed: lost node 1 \(node1, rank 1\) after step \d+: its connection closed; "
                       r"restarting \(restart 1 of 1\) from .*checkpoints/step-\d+$", SLACK)
    n1.wait(30)
    again = launch(nodes, 1, cfg, out, port, "--max-restarts", "1")
    first_step = n0.wait_for(r"INFO dist_embed: step \d+/", 120, after=said)
    assert [n0.wait(300), again.wait(300)] == [0, 0], n0.text()[-3000:] + again.text()[-3000:]
    print(f"\nkill: noticed {said - killed:.2f} s after the kill; first step {first_step - said:.1f} s after the "
          "restart line (node 1 started again by hand meanwhile)")
    assert len(n0.ours()) == 1, n0.ours()
    no_traceback(n0, again)
    assert_same_as_reference(out, reference)


def test_a_partition_is_noticed_on_both_sides_and_once_healed_the_job_goes_on(nodes, job, tmp_path):
    cfg, reference = job
    out, port = tmp_path / "run", next(PORTS)
    n0, n1 = (launch(nodes, i, cfg, out, port, "--max-restarts", "1") for i in (0, 1))
    wait_for_step(out, 8, [n0, n1])
    cut = time.monotonic()
    nodes.link(nodes.nodes[1], up=False)
    try:
        said0 = n0.wait_for(r"^dist-embed: lost node 1 \(node1, rank 1\) after step \d+: no heartbeat for \d+ s; "
                            r"restarting \(restart 1 of 1\)", WINDOW + SLACK)
        said1 = n1.wait_for(r"^dist-embed: lost contact with node 0 \(node0, rank 0\) after step \d+: no heartbeat "
                            r"for \d+ s; restarting \(restart 1 of 1\)", WINDOW + SLACK)
    finally:
        nodes.link(nodes.nodes[1], up=True)
    healed = time.monotonic()
    first_step = n0.wait_for(r"INFO dist_embed: step \d+/", 120, after=healed)
    assert [n0.wait(300), n1.wait(300)] == [0, 0], n0.text()[-3000:] + n1.text()[-3000:]
    print(f"\npartition: noticed {said0 - cut:.2f} s (node 0) and {said1 - cut:.2f} s (node 1) after the cut; first "
          f"step {first_step - healed:.1f} s after the heal")
    no_traceback(n0, n1)
    assert_same_as_reference(out, reference)


def test_a_frozen_node_is_given_up_and_once_continued_leaves_without_harm(nodes, job, tmp_path):
    """SIGSTOP of node 1 for longer than the window: node 0 gives it up (exit 76, one line); once
    continued, node 1 finds itself given up and leaves too, and every checkpoint is intact."""
    cfg, _ = job
    out, port = tmp_path / "run", next(PORTS)
    n0, n1 = (launch(nodes, i, cfg, out, port) for i in (0, 1))
    wait_for_step(out, 8, [n0, n1])
    frozen_at = time.monotonic()
    frozen = nodes.signal_node(nodes.nodes[1], signal.SIGSTOP)
    try:
        said0 = n0.wait_for(r"^dist-embed: lost node 1 \(node1, rank 1\) after step \d+: no heartbeat for \d+ s; "
                            r"exit 76: run again with --resume latest to continue from .*checkpoints/step-\d+$",
                            WINDOW + SLACK)
        assert n0.wait(SLACK) == 76
        time.sleep(2)
    finally:
        continued = time.monotonic()
        nodes.signal_node(nodes.nodes[1], signal.SIGCONT, only=set(frozen))
    said1 = n1.wait_for(r"^dist-embed: this node \(node1\) was given up by the others after step \d+: it was stopped "
                        r"for \d+ s; exit 76", SLACK)
    assert n1.wait(SLACK) == 76
    print(f"\nfreeze: noticed {said0 - frozen_at:.2f} s after SIGSTOP; node 1 left {said1 - continued:.2f} s after "
          "SIGCONT")
    assert len(n0.ours()) == 1 and len(n1.ours()) == 1, (n0.ours(), n1.ours())
    no_traceback(n0, n1)
    assert all(verify(path) is None for _, path in step_dirs(out / "checkpoints"))
    assert not nodes.processes(nodes.nodes[1])  # nothing of the job is left behind


def test_a_node_that_never_joins_is_named_within_the_join_timeout(nodes, job, tmp_path):
    """Node 0 waits for a node 1 that never comes; a node 1 whose node 0 never comes waits for it:
    each gives up after distributed.join_timeout_s with one line. Two nodes that name different
    output directories are not one job: both refuse, exit 2."""
    cfg, _ = job
    alone0 = launch(nodes, 0, cfg, tmp_path / "a", next(PORTS), "distributed.join_timeout_s=4")
    alone1 = launch(nodes, 1, cfg, tmp_path / "b", next(PORTS), "distributed.join_timeout_s=4")
    port = next(PORTS)
    apart = [launch(nodes, i, cfg, tmp_path / f"c{i}", port) for i in (0, 1)]
    assert [alone0.wait(60), alone1.wait(60)] == [76, 76]
    assert alone0.ours() == ["dist-embed: node 1 never joined the rendezvous within 4 s; exit 76: run the job again "
                             "with every node"], alone0.text()
    assert alone1.ours() == [f"dist-embed: node 1 could not reach the rendezvous at node0:{port - 1} within 4 s; exit "
                             "76: run the job again with every node"], alone1.text()
    assert [c.wait(60) for c in apart] == [2, 2]
    line = (f"dist-embed: error: node 1 (node1) runs {str(tmp_path / 'c1')!r}, node 0 runs {str(tmp_path / 'c0')!r}: "
            "every node must name the same output_dir, on storage all see")
    assert apart[0].ours() == [line] and apart[1].ours() == [line], (apart[0].text(), apart[1].text())
    no_traceback(alone0, alone1, *apart)
