"""``dist-embed submit ray``: the same worker entry point under Ray Train's TorchTrainer.

Ray starts the workers and their torch process group; each worker then runs the same training as
``--nproc`` and Slurm, always with ``--resume latest``: when Ray restarts the worker group after a
lost worker (FailureConfig), or the job is submitted again, training continues from the newest good
checkpoint in output_dir (which must be storage every node sees).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


def auth_mode() -> str | None:
    """The token-authentication mode this driver states to the cluster. Ray 2.60 turns token mode on
    for ``ray start --head`` whenever a token exists on that machine (~/.ray/auth_token, which a
    local ``ray.init()`` writes) but never for a client given an address, so a stray token file made
    such a cluster refuse us. A driver in token mode is let in by clusters of either mode: when the
    user states no mode and a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, the file), we
    present it; an explicit RAY_AUTH_MODE is the user's and is kept."""
    if os.environ.get(AUTH_MODE):
        return None
    path = Path(os.environ.get(AUTH_TOKEN_PATH) or Path.home() / ".ray" / "auth_token")
    return "token" if os.environ.get(AUTH_TOKEN, "").strip() or path.is_file() else None


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` with its authentication stated and Ray's own chatter off
    the console (its loggers at ERROR in the driver and in every worker and actor of the job, e.g.
    the placement-group cleaner's once-a-second notes when the cluster runs without the state API).
    Our workers' log lines still come through: they configure their own logging."""
    mode = auth_mode()
    if mode:  # before Ray is imported: its configuration reads the mode once
        os.environ[AUTH_MODE] = mode
    import ray

    ray.init(address=address, logging_level=logging.ERROR, logging_config=ray.LoggingConfig(log_level="ERROR"))


def train_loop_per_worker(config: dict) -> None:
    """Each Ray worker runs the one worker entry (``engine.worker.run_worker``) with ``--resume latest``.
    Bad input (2) and a stop signal (75) end the worker normally, leaving their marker in
    output_dir for the driver (a retry would only fail again); a failure (1) or a process group that
    broke under the worker (76: a peer lost) raises, so Ray restarts the group from the latest
    checkpoint as FailureConfig allows."""
    import ray.train

    from dist_embed.engine.worker import run_worker
    from dist_embed.config import Config
    from dist_embed.exit_codes import EXIT_FAILED, EXIT_PEER_LOST
    from dist_embed.outputs.run_dir import CLAIMED_ENV

    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())
    os.environ[CLAIMED_ENV] = "1"  # the driver holds the output_dir
    cfg = Config.model_validate(config["config"])  # paths made absolute on the driver
    code = run_worker(cfg, "latest", hard_exit=False)
    if code == EXIT_PEER_LOST:  # Ray restarts the group (FailureConfig), which resumes from the checkpoint
        raise RuntimeError("this worker's process group broke: a peer was lost")
    if code == EXIT_FAILED:
        raise RuntimeError("dist_embed training failed on this worker (its log above says why)")


def mine_loop_per_worker(config: dict) -> None:
    """``dist-embed mine --ray-address``: each Ray worker is one rank of the mining job."""
    import ray.train

    from dist_embed.distributed import init_distributed
    from dist_embed.tools.mine import MineOptions, mine
    from dist_embed.outputs.tracking import setup_logging

    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())
    state = init_distributed()
    setup_logging(state.rank)
    kwargs = dict(config)
    kwargs["opt"] = MineOptions(**kwargs["opt"])
    kwargs["out"] = Path(kwargs["out"])
    mine(state, progress=False, **kwargs)


def submit_mine(address: str, num_workers: int, kwargs: dict, use_gpu: bool = False) -> int:
    """Run ``mine`` on ``num_workers`` Ray workers; every path in ``kwargs`` is already absolute."""
    connect(address)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(kwargs["out"])
    trainer = TorchTrainer(mine_loop_per_worker, train_loop_config=kwargs,
                           torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                           scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
                           run_config=RunConfig(name=f"dist-embed-mine-{out.stem}",
                                                storage_path=str(out.parent / f".{out.name}.ray")))
    try:
        trainer.fit()
    except Exception as e:
        log.error("Ray mining failed: %s", e)
        print(f"dist-embed: error: Ray mining failed: {type(e).__name__}: {str(e).splitlines()[0]}")
        return 1
    print(f"done: {out}")
    return 0


def submit(args, cfg, config_path: str, overrides: list[str]) -> int:
    from dist_embed.config import ConfigError
    from dist_embed.exit_codes import BAD_INPUT_MARKER, EXIT_BAD_INPUT, EXIT_PREEMPTED, PREEMPTED_MARKER
    from dist_embed.outputs.run_dir import claim

    # every path the schema marks as local, made absolute here: a worker on another node has no
    # notion of the submitter's working directory (hub ids and missing paths stay as written)
    cfg = cfg.with_absolute_paths(Path.cwd())
    out_dir = Path(cfg.output_dir)
    try:
        claim(cfg.output_dir, "latest", False)  # held by this driver while the workers run
    except ConfigError as e:
        print(f"dist-embed: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    markers = {name: out_dir / name for name in (BAD_INPUT_MARKER, PREEMPTED_MARKER)}
    for marker in markers.values():
        marker.unlink(missing_ok=True)
    connect(args.address)
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": args.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo",
                                 timeout_s=cfg.distributed.timeout_s),
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"dist-embed-{out_dir.name}", storage_path=str(out_dir / "ray"),
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING")),  # restarts and errors only
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors; the workers' logs above have the details
        log.error("Ray training failed: %s", e)
        ray.shutdown()  # the workers' last log lines arrive before our summary line
        print(f"dist-embed: error: Ray training failed: {type(e).__name__}: {str(e).splitlines()[0]}",
              file=sys.stderr)
        return 1
    ray.shutdown()
    if markers[BAD_INPUT_MARKER].exists():
        print(f"dist-embed: error: {markers[BAD_INPUT_MARKER].read_text().strip()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if markers[PREEMPTED_MARKER].exists():
        where = markers[PREEMPTED_MARKER].read_text().strip() or "none (before the first step)"
        print(f"dist-embed: stopped by a signal; checkpoint: {where}; resume by submitting again", file=sys.stderr)
        return EXIT_PREEMPTED
    print(f"done: {out_dir / 'final'}")
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser("ray", help="run on an existing Ray cluster with Ray Train (TorchTrainer)")
    sp.add_argument("config", help="YAML config file")
    sp.add_argument("overrides", nargs="*", help="optional key.sub=value overrides")
    sp.add_argument("--address", required=True, help="Ray cluster address, e.g. 10.0.0.1:6379 or auto")
    sp.add_argument("--num-workers", type=int, required=True, help="training processes (one per GPU)")
    sp.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    sp.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves per worker")
    sp.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the latest checkpoint")
    sp.set_defaults(launcher="ray")
