"""Slurm and Ray across nodes: one slurmd and one Ray raylet per network-namespace node
(tests/netns.py), ``dist-embed submit slurm --nodes 2`` and ``dist-embed submit ray`` with one
worker per node. The Slurm job loses a node mid-run (the batch script starts its step again), then
gets the time-limit warning (checkpoint, requeue, resume): every row once, and the losses and the
weights of ``--nproc 2`` on one machine."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from clusters import LocalRay, LocalSlurm, slurm_available
from conftest import REPO
from test_nodes import JOIN, WINDOW, assert_same_as_reference, namespace_cluster, wait_for_step
from test_nodes import job  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    cluster = namespace_cluster(tmp_path_factory)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def slurm(nodes, tmp_path_factory):
    if not slurm_available():
        if os.environ.get("CI"):
            pytest.fail("Slurm daemons are missing; .ci/run installs slurmctld and slurmd")
        pytest.skip("Slurm is not installed (apt-get install slurmctld slurmd slurm-client)")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes).start()
    yield cluster
    cluster.stop()


def test_slurm_two_nodes_survive_a_lost_node_and_a_requeue(slurm, nodes, job, tmp_path):
    cfg, reference = job
    out = tmp_path / "run"
    env = dict(slurm.env, DIST_EMBED_LOG_ROW_IDS="1", OMP_NUM_THREADS="1")  # the job inherits it (--export=ALL)
    r = subprocess.run(slurm.command([sys.executable, "-m", "launch.cli", "submit", "slurm", cfg, f"output_dir={out}",
                                      "--nodes", "2", "--nproc-per-node", "1", "--cpus-per-task", "1",
                                      "--max-restarts", "1", f"distributed.peer_timeout_s={WINDOW}",
                                      f"distributed.join_timeout_s={JOIN}"]),
                       env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = r.stdout.strip().splitlines()[-1]
    log = out / f"slurm-{job_id}.out"
    wait_for_step(out, 6, timeout=240)
    # node 1 lost: its launcher and workers killed (slurmd stays: the node itself comes back at once)
    killed = nodes.signal_node(nodes.nodes[1], signal.SIGKILL, only=nodes.matching(nodes.nodes[1], "launch.cli",
                                                                                   "-m dist_embed"))
    assert killed, "no job processes on node1"
    t_kill, deadline = time.monotonic(), time.time() + 120
    said = None
    while "starting the job step again" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and slurm.state(job_id) == "RUNNING", log.read_text()[-3000:]
        if said is None and "dist-embed: lost node 1 (node1, rank 1) after step" in log.read_text():
            said = time.monotonic()
        time.sleep(0.1)
    restarted = time.monotonic()
    text = log.read_text()
    assert "dist-embed: lost node 1 (node1, rank 1) after step" in text, text[-3000:]
    first = len(text)
    while "resumed from" not in log.read_text()[first:]:  # the step again, from the checkpoint
        assert time.time() < deadline + 120, log.read_text()[-3000:]
        time.sleep(0.1)
    resumed_at = int(log.read_text()[first:].split("resumed from")[1].split("at step ")[1].split()[0])
    wait_for_step(out, resumed_at + 1, timeout=120)
    print(f"\nslurm: lost node said {(said or restarted) - t_kill:.2f} s after the kill; first step "
          f"{time.monotonic() - restarted:.1f} s after the script started the step again")
    wait_for_step(out, resumed_at + 3, timeout=120)
    slurm.run("scancel", "--signal=USR1", job_id)  # what --signal=USR1@N sends before the time limit
    # a requeued job waits ~2 minutes (BeginTime): shorten that to a few seconds (not to zero: slurmd
    # refuses a restart in the same second as the revoked credential)
    deadline = time.time() + 120
    while time.time() < deadline:
        info = slurm.run("scontrol", "show", "job", job_id, "-o").stdout
        if "Restarts=1" in info and "JobState=PENDING" in info:
            slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+5")
            break
        assert "JobState=COMPLETED" not in info and "JobState=FAILED" not in info, info
        time.sleep(0.3)
    state = slurm.wait(job_id, timeout=400)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "2 node(s) x 1 worker(s)" in text and "world size 2" in text
    assert "restart 0" in text and "restart 1" in text and "requeueing job" in text
    assert "Traceback" not in text, text[-4000:]
    assert_same_as_reference(out, reference)


@pytest.fixture(scope="module")
def ray_nodes(nodes, tmp_path_factory):
    """The head on node0 and a worker raylet on node1, 1 CPU each, started in token mode the way a
    stray token file makes Ray 2.60 do it (mode unset, a token at hand): the driver must cope."""
    root = tmp_path_factory.mktemp("ray")
    token = root / "auth_token"
    token.write_text("b" * 32)
    cluster = LocalRay(root, cpus=1, cluster=nodes, stray_token=token)
    cluster.env["DIST_EMBED_LOG_ROW_IDS"] = "1"  # Ray's workers get the raylets' environment
    yield cluster.start()
    cluster.stop()


def test_ray_places_one_worker_per_node_and_trains_as_nproc_two(ray_nodes, nodes, job, tmp_path):
    cfg, reference = job
    out = tmp_path / "run"
    placed = {n.host: 0 for n in nodes.nodes}
    done = threading.Event()

    def watch():  # the Ray Train workers each node runs, at most at once
        while not done.is_set():
            for n in nodes.nodes:
                placed[n.host] = max(placed[n.host], len(nodes.matching(n, "ray::RayTrainWorker")))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    env = dict(ray_nodes.env, DIST_EMBED_LOG_ROW_IDS="1", OMP_NUM_THREADS="1")
    try:
        r = subprocess.run(ray_nodes.command([sys.executable, "-m", "launch.cli", "submit", "ray", cfg,
                                              f"output_dir={out}", "--address", ray_nodes.address,
                                              "--num-workers", "2", "--cpus-per-worker", "1"]),
                           env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    finally:
        done.set()
        watcher.join()
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert placed == {"node0": 1, "node1": 1}, placed
    # Ray's own chatter stays off the console (the placement-group cleaner once a second, the
    # controller's notes); our workers' lines come through
    for noise in ("Failed to query Ray Train Controller", "Started training worker group", "Requesting resources"):
        assert noise not in r.stdout + r.stderr, noise
    assert "world size 2" in r.stderr
    assert_same_as_reference(out, reference)
