"""``dist-embed submit ray``: the same worker entry point under Ray Train's TorchTrainer.

Ray starts the workers and their torch process group; each worker then runs the same training as
``--nproc`` and Slurm, always with ``--resume latest``: when Ray restarts the worker group after a
lost worker (FailureConfig), or the job is submitted again, training continues from the newest good
checkpoint in output_dir (which must be storage every node sees).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from ..config import Config
    from ..distributed import init_distributed
    from ..tracking import setup_logging
    from ..train import train

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    cfg = Config.model_validate(config["config"])  # resolved on the driver: no working directory needed
    state = init_distributed(cfg.distributed.timeout_s, group_of_one=cfg.distributed.backend == "deepspeed")
    setup_logging(state.rank)
    train(cfg, state, "latest")


def mine_loop_per_worker(config: dict) -> None:
    """``dist-embed mine --ray-address``: each Ray worker is one rank of the mining job."""
    import ray.train

    from ..distributed import init_distributed
    from ..mine import MineOptions, mine
    from ..tracking import setup_logging

    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())
    state = init_distributed()
    setup_logging(state.rank)
    kwargs = dict(config)
    kwargs["opt"] = MineOptions(**kwargs["opt"])
    kwargs["out"] = Path(kwargs["out"])
    mine(state, progress=False, **kwargs)


def submit_mine(address: str, num_workers: int, kwargs: dict, use_gpu: bool = False) -> int:
    """Run ``mine`` on ``num_workers`` Ray workers; every path in ``kwargs`` is already absolute."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(kwargs["out"])
    ray.init(address=address, logging_level=logging.WARNING)
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


def resolved_paths(cfg) -> dict:
    """The config with every local path made absolute here, on the driver: a worker on another node
    has no notion of the submitter's working directory (hub ids and missing paths stay as written)."""
    tree = cfg.to_dict()

    def absolute(value):
        if isinstance(value, str) and not value.startswith(("package:", "/")) and Path(value).exists():
            return str(Path(value).resolve())
        return value

    tree["output_dir"] = str(Path(tree["output_dir"]).resolve())
    if isinstance(tree["data"]["train"], list):
        for d in tree["data"]["train"]:
            d["path"] = absolute(d["path"])
    else:
        tree["data"]["train"] = absolute(tree["data"]["train"])
    tree["model"]["name_or_path"] = absolute(tree["model"]["name_or_path"])
    tree["distributed"]["deepspeed_config"] = absolute(tree["distributed"]["deepspeed_config"])
    for s in tree["eval"]["sts"]:
        s["path"] = absolute(s["path"])
    return tree


def submit(args, cfg, config_path: str, overrides: list[str]) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out_dir = Path(cfg.output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    ray.init(address=args.address, logging_level=logging.WARNING)
    resources = {"CPU": args.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": resolved_paths(cfg)},
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo",
                                 timeout_s=cfg.distributed.timeout_s),
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"dist-embed-{out_dir.name}", storage_path=str(out_dir / "ray"),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps worker errors; the workers' logs above have the details
        log.error("Ray training failed: %s", e)
        print(f"dist-embed: error: Ray training failed: {type(e).__name__}: {str(e).splitlines()[0]}")
        return 1
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
