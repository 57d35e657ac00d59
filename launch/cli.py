"""``dist-embed``: train, eval, prepare-data, mine, merge, submit (slurm, ray), status, report.

The user's command line, above the worker library: it may start processes (``--nproc``,
``--nnodes``, ``submit``); every worker it starts runs ``python -m dist_embed train|mine`` (the
library's own worker side, ``dist_embed.commands``). Exit codes: ``dist_embed.exit_codes``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dist_embed.commands import (add_mine_arguments, add_train_arguments, begin, end, error, inside_launched_job,
                                 load_config_or_say, mine_options, os_error, output_overlaps, parse, run_mine,
                                 run_train, train_args_problem, train_worker_args)
from dist_embed.exit_codes import EXIT_BAD_INPUT, EXIT_OK

log = logging.getLogger("dist_embed")


def cmd_train(args) -> int:
    """Train here (one process, or one rank inside a launched job), or start this node's workers."""
    from dist_embed.engine.stops import STOPS

    # our launcher starts the workers for several processes or nodes, or to restart them after a failure
    launching = bool((args.nproc or 0) > 1 or args.nnodes > 1 or args.max_restarts) and not inside_launched_job()
    signals = None
    if launching:  # stop signals (recorded since main) are forwarded to the workers once started
        from .local import LauncherSignals

        signals = LauncherSignals(STOPS.signum).install()
    for flag, value, least in (("--nproc", args.nproc, 1), ("--nnodes", args.nnodes, 1),
                               ("--max-restarts", args.max_restarts, 0)):
        if value is not None and value < least:
            return error(f"{flag} must be at least {least} (got {value})")
    if args.nnodes > 1 and not (args.master_addr and args.master_port):
        return error("--nnodes > 1 needs --master-addr and --master-port (the same on every node)")
    if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
        return error(f"--node-rank must be from 0 to {args.nnodes - 1} (got {args.node_rank})")
    if train_args_problem(args):
        return error(train_args_problem(args))
    cfg = load_config_or_say(args)
    if cfg is None:
        return EXIT_BAD_INPUT
    if not launching:
        return run_train(args, cfg)
    from dist_embed.config import ConfigError
    from dist_embed.outputs.run_dir import CLAIMED_ENV, RunComplete, already_complete, claim

    from .local import launch_local

    node_rank = args.node_rank if args.node_rank is not None else int(os.environ.get("SLURM_NODEID", 0))
    done = already_complete(cfg.output_dir, args.resume)  # every node's launcher: none starts workers then
    if done:
        print(f"dist-embed: {done}", file=sys.stderr)
        return EXIT_OK
    if node_rank == 0:  # one launcher holds the output_dir for the whole job (its workers skip the claim)
        try:
            claim(cfg.output_dir, args.resume, args.overwrite)
        except ConfigError as e:
            return error(str(e))
        except RunComplete as e:  # finished between the look above and the lock
            print(f"dist-embed: {e}", file=sys.stderr)
            return EXIT_OK
    os.environ[CLAIMED_ENV] = "1"
    return launch_local(args.nproc or 1, train_worker_args(args), cfg.output_dir, nnodes=args.nnodes,
                        node_rank=node_rank, master_addr=args.master_addr, master_port=args.master_port,
                        signals=signals, max_restarts=args.max_restarts, peer_timeout_s=cfg.distributed.peer_timeout_s,
                        join_timeout_s=cfg.distributed.join_timeout_s, ckpt_root=Path(cfg.output_dir) / "checkpoints")


LAUNCH_OPTIONS = {"--nproc": 1, "--ray-address": 1, "--ray-workers": 1, "--use-gpu": 0}  # name: values


def without_launch_options(argv: list[str]) -> list[str]:
    """A command's arguments as its workers get them: the options that start processes left out."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
        elif a in LAUNCH_OPTIONS:
            skip = LAUNCH_OPTIONS[a]
        elif a.split("=", 1)[0] not in LAUNCH_OPTIONS:
            out.append(a)
    return out


def cmd_mine(args) -> int:
    """Hard-negative mining: here, across --nproc N processes, or on a Ray cluster."""
    if args.nproc is not None and args.nproc < 1:
        return error(f"--nproc must be at least 1 (got {args.nproc})")
    opt, columns = mine_options(args)
    if opt is None:
        return error(columns)
    out = Path(args.out)
    if args.ray_address:
        from dataclasses import asdict

        from dist_embed.engine.stops import STOPS

        STOPS.uninstall()  # Ctrl-C ends the submission here as usual; Ray stops its workers

        from .ray import submit_mine

        def absolute(p):
            return str(Path(p).resolve()) if p and Path(p).exists() else p

        out.parent.mkdir(parents=True, exist_ok=True)
        return submit_mine(args.ray_address, args.ray_workers, {
            "model": absolute(args.model), "data": absolute(args.data), "out": str(out.resolve()),
            "corpus_file": absolute(args.corpus), "opt": asdict(opt), "columns": columns, "on_error": args.on_error,
            "fmt": args.format, "max_seq_length": args.max_seq_length}, use_gpu=args.use_gpu)
    if args.nproc and args.nproc > 1 and not inside_launched_job():
        from dist_embed.engine.stops import STOPS

        from .local import LauncherSignals, launch_local

        out.parent.mkdir(parents=True, exist_ok=True)
        # stop signals (recorded since main) go to the workers: they stop after a block, exit 75
        return launch_local(args.nproc, without_launch_options(args.argv), str(out.parent),
                            signals=LauncherSignals(STOPS.signum).install())
    return run_mine(args)


def cmd_eval(args) -> int:
    from dist_embed.data.readers import DataError
    from dist_embed.evaluation.sts import evaluate_sts, load_sts
    from dist_embed.model.encoder import Encoder, ModelError
    from dist_embed.outputs.tracking import setup_logging

    setup_logging(0)
    if args.batch_size < 1:
        return error(f"--batch-size must be at least 1 (got {args.batch_size})")
    results = {}
    try:
        enc = Encoder.from_pretrained(args.model)
        for spec in args.sts:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = Path(spec).name.split(".")[0], spec
            if not name or not path:
                return error(f"--sts {spec!r}: expected [NAME=]PATH of an STS file or dataset")
            data = load_sts(path, name)
            results.update({f"eval/{name}/{k}": v for k, v in evaluate_sts(enc, data, args.batch_size).items()})
    except (DataError, ModelError, FileNotFoundError, OSError, ValueError) as e:
        print(f"dist-embed: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(results))
    return EXIT_OK


def cmd_merge(args) -> int:
    from dist_embed.tools.merge import merge_adapter_dir
    from dist_embed.model.encoder import ModelError
    from dist_embed.outputs.tracking import setup_logging

    setup_logging(0)
    try:
        merge_adapter_dir(args.adapter, args.out, overwrite=args.overwrite)
    except (ModelError, FileNotFoundError, OSError, ValueError) as e:
        print(f"dist-embed: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(args.out)
    return EXIT_OK


def cmd_prepare(args) -> int:
    from dist_embed.data.readers import DataError
    from dist_embed.tools.prepare import prepare
    from dist_embed.outputs.tracking import setup_logging

    setup_logging(0)
    for flag in ("shard_rows", "block_rows", "max_seq_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"dist-embed: error: --{flag.replace('_', '-')} must be at least 1 (got {value})", file=sys.stderr)
            return EXIT_BAD_INPUT
    problem = output_overlaps(args.out, [("a source", src) for src in args.sources])
    if problem:  # shards written among the sources would change what the sources' directory reads as
        return error(f"{problem}; write the shards to a directory of their own")
    try:
        prepare(args.sources, Path(args.out), fmt=args.format, subset=args.subset, split=args.split,
                shard_rows=args.shard_rows, block_rows=args.block_rows, tokenizer_name=args.tokenizer,
                max_seq_length=args.max_seq_length, on_error=args.on_error)
    except DataError as e:
        print(f"dist-embed: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"dist-embed: error: {args.out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def cmd_report(args) -> int:
    from dist_embed.outputs.report import plot, summary

    try:
        print(summary(Path(args.output_dir)))
        print(f"plot: {plot(Path(args.output_dir))}")
    except (OSError, ValueError) as e:
        print(f"dist-embed: error: {e if isinstance(e, (FileNotFoundError, ValueError)) else os_error(e)}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def cmd_submit(args) -> int:
    cfg = load_config_or_say(args)
    if cfg is None:
        return EXIT_BAD_INPUT
    if args.launcher == "slurm":
        from .slurm import submit

        return submit(args, cfg, args.config, args.overrides)
    from .ray import submit as submit_ray

    return submit_ray(args, cfg, args.config, args.overrides)


def cmd_status(args) -> int:
    from .slurm import status

    if not Path(args.output_dir).is_dir():
        print(f"dist-embed: error: {args.output_dir}: no such run directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        print(status(Path(args.output_dir)))
    except OSError as e:
        print(f"dist-embed: error: {os_error(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dist-embed",
                                 description="Train sentence-embedding models, one GPU to many nodes.")
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train from a YAML config (+ key.sub=value overrides)")
    add_train_arguments(tr)
    tr.add_argument("--nproc", type=int, default=None, help="start N worker processes on this machine (N >= 1)")
    tr.add_argument("--nnodes", type=int, default=1, help="nodes in the job (one launcher per node)")
    tr.add_argument("--node-rank", type=int, default=None, help="this node's rank (default: $SLURM_NODEID or 0)")
    tr.add_argument("--master-addr", default=None, help="rendezvous host for --nnodes > 1")
    tr.add_argument("--master-port", type=int, default=None, help="rendezvous port for --nnodes > 1")
    tr.add_argument("--max-restarts", type=int, default=0,
                    help="start the workers of every node again after a failure or a lost node, up to N times, "
                         "from the latest checkpoint (torchrun's meaning; default 0)")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="STS evaluation of a saved model; prints one JSON object")
    ev.add_argument("model", help="model directory (ours or any sentence-transformers model) or hub id")
    ev.add_argument("--sts", action="append", required=True, help="[name=]path of a tsv/csv/jsonl STS file")
    ev.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")
    ev.set_defaults(func=cmd_eval)

    pd = sub.add_parser("prepare-data", help="validate sources once and write webdataset shards + manifest")
    pd.add_argument("sources", nargs="+", help="jsonl/csv/tsv/parquet files or directories, or HF datasets "
                                               "(hub id or a save_to_disk directory); rows in this order")
    pd.add_argument("--out", required=True, help="output directory for shard-NNNNNN.tar and manifest.json")
    pd.add_argument("--shard-rows", type=int, default=100_000, help="rows per shard (default 100000)")
    pd.add_argument("--block-rows", type=int, default=1024,
                    help="rows per webdataset sample (default 1024)")
    pd.add_argument("--tokenizer", default=None, help="also store token ids for this tokenizer (model dir or id)")
    pd.add_argument("--max-seq-length", type=int, default=None, help="truncation length of those ids")
    pd.add_argument("--format", default="auto", choices=["auto", "jsonl", "csv", "tsv", "parquet", "hf"],
                    help="source format (default: from the name)")
    pd.add_argument("--subset", default=None, help="HF dataset subset (config name)")
    pd.add_argument("--split", default="train", help="HF dataset split (default train)")
    pd.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                    help="bad rows: stop with file:line (default), or skip and count them")
    pd.set_defaults(func=cmd_prepare)

    sb = sub.add_parser("submit", help="run a config on a cluster: slurm or ray")
    launchers = sb.add_subparsers(dest="launcher", required=True)
    from .slurm import add_parser as add_slurm

    add_slurm(launchers)
    from .ray import add_parser as add_ray

    add_ray(launchers)
    sb.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="Slurm job state and the latest metrics of an output_dir")
    st.add_argument("output_dir", help="a run's output_dir")
    st.set_defaults(func=cmd_status)

    mn = sub.add_parser("mine", help="mine hard negatives for (anchor, positive) data -> negative_1..k columns")
    add_mine_arguments(mn)
    mn.add_argument("--nproc", type=int, default=None, help="start N worker processes on this machine "
                                                            "(under srun/torchrun: leave out, each task is a rank)")
    mn.add_argument("--ray-address", default=None, help="run on a Ray cluster (e.g. 10.0.0.1:6379) ...")
    mn.add_argument("--ray-workers", type=int, default=2, help="... with this many workers (default 2)")
    mn.add_argument("--use-gpu", action="store_true", help="Ray: one GPU per worker")
    mn.set_defaults(func=cmd_mine)

    mg = sub.add_parser("merge", help="an adapter export (model.lora.export: adapter) -> a merged model")
    mg.add_argument("adapter", help="the adapter export's directory (e.g. OUTPUT_DIR/final)")
    mg.add_argument("out", help="where to write the merged sentence-transformers model (a new directory)")
    mg.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    mg.set_defaults(func=cmd_merge)

    rp = sub.add_parser("report", help="summary of a run from metrics.jsonl, and OUTPUT_DIR/report.png")
    rp.add_argument("output_dir", help="a run's output_dir (reads its metrics.jsonl)")
    rp.set_defaults(func=cmd_report)
    return ap


def main(argv: list[str] | None = None) -> int:
    begin(argv)
    args = parse(build_parser(), argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return end(args.func(args), argv)


if __name__ == "__main__":
    sys.exit(main())
