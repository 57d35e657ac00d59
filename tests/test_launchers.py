"""Launchers against REAL clusters: a local Slurm (slurmctld + slurmd) and a local Ray cluster on this
machine (across network-namespace nodes: test_cluster_jobs.py, test_nodes.py)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusters import LocalRay, LocalSlurm, slurm_available
from conftest import REPO, quick_triplets, read_metrics, run_cli, tiny_config, train_losses, write_jsonl
from test_distributed import max_weight_diff

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not slurm_available():
        if os.environ.get("CI"):
            pytest.fail("Slurm daemons are missing; .ci/run installs slurmctld and slurmd")
        pytest.skip("Slurm is not installed (apt-get install slurmctld slurmd slurm-client)")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def submit(slurm, cfg, *args):
    r = run_cli("submit", "slurm", cfg, "--nproc-per-node", "2", "--cpus-per-task", "2", *args, env=slurm.env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("options,line", [
    (["--nodes", "0"], "--nodes must be at least 1 (got 0)"),
    (["--gpus-per-node", "-2"], "--gpus-per-node must be at least 0 (got -2)"),
    (["--time", "banana"], "--time 'banana': not a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                           "D-HH:MM:SS)"),
    (["--time", "1", "--signal-seconds", "300"],
     "--signal-seconds 300 is not shorter than --time 1 (60 s): the job would be signalled, checkpoint and requeue "
     "at once, again and again"),
    (["--time", "2-0", "--signal-seconds", "70000"],
     "--signal-seconds must be at most 65535, Slurm's limit (got 70000)"),
    (["--max-restarts", "-1"], "--max-restarts must be at least 0 (got -1)"),
])
def test_dry_run_refuses_what_slurm_would_reject_or_loop_on(tmp_path, tiny_model, triplets, options, line):
    cfg = tiny_config(tmp_path, tiny_model, triplets)
    r = run_cli("submit", "slurm", cfg, "--dry-run", *options)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.splitlines() == [f"dist-embed: error: {line}"]


def test_dry_run_renders_the_options(tmp_path, tiny_model, triplets):
    cfg = tiny_config(tmp_path, tiny_model, triplets)
    r = run_cli("submit", "slurm", cfg, "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                "--time", "4:00:00", "--account", "ml", "--qos", "high", "--constraint", "h100",
                "--signal-seconds", "300", "training.lr=1e-4")
    assert r.returncode == 0, r.stderr
    for line in ["#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=4:00:00",
                 "#SBATCH --account=ml", "#SBATCH --qos=high", "#SBATCH --constraint=h100", "#SBATCH --requeue",
                 "#SBATCH --signal=USR1@300", "#SBATCH --ntasks-per-node=1", "export NPROC_PER_NODE=8",
                 "export MAX_RESTARTS=3",
                 f"#SBATCH --output={tmp_path / 'run' / 'slurm-%j.out'}", "training.lr=1e-4"]:
        assert line in r.stdout, line
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted


def test_slurm_job_trains_with_two_workers(slurm, tmp_path, tiny_model, triplets):
    cfg = tiny_config(tmp_path, tiny_model, triplets, training={"max_steps": 4}, checkpoint={"steps": 2})
    job = submit(slurm, cfg)
    assert slurm.wait(job) == "COMPLETED", (tmp_path / "run" / f"slurm-{job}.out").read_text()[-3000:]
    out = tmp_path / "run"
    log = (out / f"slurm-{job}.out").read_text()
    assert "1 node(s) x 2 worker(s)" in log and "world size 2" in log
    assert sorted(train_losses(out)) == [1, 2, 3, 4]
    assert (out / "checkpoints" / "step-2" / "manifest.json").exists()
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(out / "final"), device="cpu").encode(["x"]).shape == (1, 32)
    r = run_cli("status", out, env=slurm.env)
    assert f"slurm job {job}:" in r.stdout and "steps        4" in r.stdout


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One node, its auth mode stated for the head and every client alike: a stray token (what
    ~/.ray/auth_token is after any local ray.init()) changes nothing."""
    cluster = LocalRay(Path("/tmp") / f"ray-{os.getpid()}")  # Ray's sockets need a short path
    stray = tmp_path_factory.mktemp("home") / "auth_token"
    stray.write_text("c" * 32)
    cluster.env["RAY_AUTH_TOKEN_PATH"] = str(stray)
    yield cluster.start()
    cluster.stop()


def test_ray_two_workers_equal_nproc_two(ray_cluster, tmp_path, tiny_model, triplets):
    """Relative paths in every path field of the schema (a list of training datasets, STS and
    retrieval sets, the guide model), meaningful only in the submitter's directory: made absolute
    on the driver, since the workers (whose working directory is Ray's own, as on another node)
    have none of it. Same losses and weights as --nproc 2."""
    import shutil

    shutil.copytree(REPO / "data" / "quickstart" / "snli-dev-retrieval", tmp_path / "retrieval")
    shutil.copyfile(REPO / "data" / "quickstart" / "snli-dev-pairs-1k.tsv", tmp_path / "sts.tsv")
    shutil.copytree(tiny_model, tmp_path / "guide")
    half = write_jsonl(tmp_path / "more.jsonl", quick_triplets(300)[200:])
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    cfg = tiny_config(tmp_path, tiny_model, triplets, training={"max_steps": 4, "lr": 1e-4},
                      loss={"name": "mnrl", "guide_model": "guide"},
                      eval={"before_training": False, "sts": [{"name": "sts", "path": "sts.tsv"}],
                            "retrieval": [{"name": "ret", "queries": "retrieval/queries.jsonl",
                                           "corpus": "retrieval/corpus.jsonl", "qrels": "retrieval/qrels.tsv"}]},
                      data={"train": [{"name": "a", "path": rel(triplets)}, {"name": "b", "path": rel(half)}]},
                      model={"name_or_path": rel(tiny_model)})
    local = tmp_path / "local"
    r = run_cli("train", cfg, f"output_dir={local}", "--nproc", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("submit", "ray", cfg.name, "output_dir=ray", "--address", ray_cluster.address, "--num-workers", "2",
                env=ray_cluster.env, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    on_ray = tmp_path / "ray"
    assert train_losses(local) == pytest.approx(train_losses(on_ray), rel=1e-6)
    assert max_weight_diff(local, on_ray) < 1e-6
    final_eval = [m for m in read_metrics(on_ray) if "eval/ret/ndcg@10" in m]
    assert final_eval and "eval/sts/spearman_cosine" in final_eval[-1]


def test_ray_runs_the_quickstart_config_as_shipped_and_bad_input_is_one_line(ray_cluster, tmp_path):
    out = tmp_path / "qs"
    r = run_cli("submit", "ray", "configs/quickstart.yaml", f"output_dir={out}", "training.max_steps=2",
                "eval.before_training=false", "--address", ray_cluster.address, "--num-workers", "2",
                env=ray_cluster.env, cwd=REPO)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert (out / "final" / "model.safetensors").is_file()
    assert any("eval/snli-dev-retrieval/ndcg@10" in m for m in read_metrics(out))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(t) + "\n" for t in quick_triplets(30)) + '{"anchor": "a", "positive": null}\n')
    r = run_cli("submit", "ray", "configs/quickstart.yaml", f"output_dir={tmp_path / 'bad'}", f"data.train={bad}",
                "--address", ray_cluster.address, "--num-workers", "2", env=ray_cluster.env, cwd=REPO)
    assert r.returncode == 2, (r.stdout + r.stderr)[-4000:]
    assert r.stderr.strip().splitlines()[-1] == f"dist-embed: error: {bad}:31: column 'positive': null text"


def test_slurm_job_that_can_never_start_is_refused_and_status_says_why(slurm, tmp_path, tiny_model, triplets):
    cfg = tiny_config(tmp_path, tiny_model, triplets)
    # the template's default --cpus-per-task=8 on 2-CPU nodes: Slurm would keep it pending forever
    r = run_cli("submit", "slurm", cfg, "--nproc-per-node", "2", env=slurm.env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("dist-embed: error: this job could never start: ")
    assert "8" in r.stderr and "PartitionConfig" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "slurm_job_id").exists()
    # a job submitted by hand that pends for that reason: status says so
    out = tmp_path / "run"
    job = slurm.run("sbatch", "--parsable", "--cpus-per-task=8", f"--output={out}/x.out", "--wrap", "true").stdout
    job = job.strip().split(";")[0]
    (out / "slurm_job_id").write_text(job + "\n")
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            s = run_cli("status", out, env=slurm.env)
            if "PartitionConfig" in s.stdout:
                break
            time.sleep(1)
        assert "PENDING" in s.stdout and "it will never start" in s.stdout, s.stdout
    finally:
        slurm.run("scancel", job, check=False)


def test_installed_wheel_renders_the_sbatch_template_outside_the_checkout(tmp_path, tiny_model, triplets):
    """`pip install .` (not editable): the template ships in the package."""
    import shutil

    wheels, site, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    # a clean copy: no build/ left over from an earlier build, no virtual environment
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "runs", "*.egg-info", "__pycache__", ".pytest_cache", "wandb"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    cfg = tiny_config(tmp_path, tiny_model, triplets)
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONSAFEPATH="1")
    r = subprocess.run([sys.executable, "-m", "launch.cli", "submit", "slurm", str(cfg), "--dry-run"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "#SBATCH --requeue" in r.stdout
    probe = subprocess.run([sys.executable, "-c", "import dist_embed; print(dist_embed.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.stdout.startswith(str(site)), probe.stdout  # the installed copy, not the checkout
    r = subprocess.run([sys.executable, "-m", "launch.cli", "submit", "ray", "--help"], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "--num-workers" in r.stdout, r.stderr[-2000:]


def test_accelerate_launch_equals_nproc_two(tmp_path, tiny_model, triplets):
    """`accelerate launch --config_file configs/accelerate/cpu.yaml -m dist_embed train ...` starts
    workers that join the same process-group logic: the same losses and weights as --nproc 2
    (dropout on: every rank seeds itself the same way under either launcher)."""
    from dist_embed.distributed import free_port

    cfg = tiny_config(tmp_path, tiny_model, triplets, model={"dropout": None}, training={"max_steps": 4})
    local = tmp_path / "local"
    r = run_cli("train", cfg, f"output_dir={local}", "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    acc = tmp_path / "acc"
    exe = Path(sys.executable).parent / "accelerate"
    r = subprocess.run([str(exe), "launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu.yaml"),
                        "--main_process_port", str(free_port()), "-m", "dist_embed", "train", str(cfg),
                        f"output_dir={acc}"], capture_output=True, text=True, cwd=REPO, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stderr
    assert train_losses(acc) == pytest.approx(train_losses(local), rel=1e-6)
    assert max_weight_diff(local, acc) < 1e-6


def test_mining_under_slurm_and_ray_gives_the_bytes_of_one_process(slurm, ray_cluster, tmp_path, minilm):
    """dist-embed mine as 2 srun tasks (each task a rank, the rendezvous from the job) and as 2 Ray
    workers: the same file as one local process."""
    rows = quick_triplets(120)
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": r["anchor"], "positive": r["positive"]} for r in rows])
    args = ["--num-negatives", "2", "--block-size", "16", "--batch-size", "8", "--relative-margin", "0.05"]
    local = tmp_path / "local.jsonl"
    r = run_cli("mine", data, "--model", minilm, "--out", local, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    on_slurm = tmp_path / "slurm.jsonl"
    script = tmp_path / "mine.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --cpus-per-task=1\n"
                      f"#SBATCH --output={tmp_path}/slurm-%j.out\n"
                      "export MASTER_ADDR=127.0.0.1 MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n"
                      f"srun {sys.executable} -m launch.cli mine {data} --model {minilm} --out {on_slurm} "
                      + " ".join(args) + "\n")
    job = slurm.run("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]
    assert slurm.wait(job) == "COMPLETED", (tmp_path / f"slurm-{job}.out").read_text()[-3000:]
    assert on_slurm.read_bytes() == local.read_bytes()
    on_ray = tmp_path / "ray.jsonl"
    r = run_cli("mine", data, "--model", minilm, "--out", on_ray, *args, "--ray-address", ray_cluster.address,
                "--ray-workers", "2", env=ray_cluster.env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert on_ray.read_bytes() == local.read_bytes()


@pytest.mark.parametrize("options,line", [
    (["--nnodes", "2"], "--nnodes > 1 needs --master-addr and --master-port (the same on every node)"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--master-port", "29400"],
     "--node-rank must be from 0 to 1 (got 2)"),
    (["--nproc", "2", "--max-restarts", "-1"], "--max-restarts must be at least 0 (got -1)"),
])
def test_multi_node_options_that_cannot_work_are_one_line(tmp_path, tiny_model, triplets, options, line):
    cfg = tiny_config(tmp_path, tiny_model, triplets)
    r = run_cli("train", cfg, *options)
    assert r.returncode == 2 and r.stderr.splitlines() == [f"dist-embed: error: {line}"], r.stderr[-2000:]
