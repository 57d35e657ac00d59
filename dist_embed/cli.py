"""``dist-embed``: train, eval, prepare-data, submit (slurm, ray), status, report.

Exit codes: 0 done; 1 failure in training; 2 bad configuration or input (one line says what and
where); see also ``dist_embed.launch`` for the codes launchers act on.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .exit_codes import BAD_INPUT_MARKER, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK

log = logging.getLogger("dist_embed")


def _inside_launched_job() -> bool:
    """A worker started by torchrun / accelerate / Ray (they set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _load_config(args):
    """The validated config, or None after printing the one-line error."""
    from .config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"dist-embed: error: {e}", file=sys.stderr)
        return None


def cmd_train(args) -> int:
    from .engine.stops import STOPS

    launching = bool(args.nproc and (args.nproc > 1 or args.nnodes > 1) and not _inside_launched_job())
    signals = None
    if launching:  # stop signals (recorded since main) are forwarded to the workers once started
        from .launch.local import LauncherSignals

        signals = LauncherSignals(STOPS.signum).install()
    for flag, value in (("--nproc", args.nproc), ("--nnodes", args.nnodes)):
        if value is not None and value < 1:
            print(f"dist-embed: error: {flag} must be at least 1 (got {value})", file=sys.stderr)
            return EXIT_BAD_INPUT
    cfg = _load_config(args)
    if cfg is None:
        return EXIT_BAD_INPUT
    if not launching:
        from .engine.worker import run_worker

        return run_worker(cfg, args.resume, allow_data_change=args.allow_data_change,
                          allow_fresh_start=args.resume_or_start_fresh, overwrite=args.overwrite)
    from .config import ConfigError
    from .launch.local import launch_local
    from .outputs.run_dir import CLAIMED_ENV, claim

    node_rank = args.node_rank if args.node_rank is not None else int(os.environ.get("SLURM_NODEID", 0))
    if node_rank == 0:  # one launcher holds the output_dir for the whole job (its workers skip the claim)
        try:
            claim(cfg.output_dir, args.resume, args.overwrite)
        except ConfigError as e:
            print(f"dist-embed: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    os.environ[CLAIMED_ENV] = "1"
    return launch_local(args.nproc, ["train", args.config, *args.overrides]
                        + (["--resume", args.resume] if args.resume else [])
                        + (["--allow-data-change"] if args.allow_data_change else [])
                        + (["--resume-or-start-fresh"] if args.resume_or_start_fresh else []), cfg.output_dir,
                        nnodes=args.nnodes, node_rank=node_rank, master_addr=args.master_addr,
                        master_port=args.master_port, signals=signals)


def cmd_eval(args) -> int:
    from .data.readers import DataError
    from .evaluation.sts import evaluate_sts, load_sts
    from .model.encoder import Encoder, ModelError
    from .outputs.tracking import setup_logging

    setup_logging(0)
    results = {}
    try:
        enc = Encoder.from_pretrained(args.model)
        for spec in args.sts:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = Path(spec).name.split(".")[0], spec
            data = load_sts(path, name)
            results.update({f"eval/{name}/{k}": v for k, v in evaluate_sts(enc, data, args.batch_size).items()})
    except (DataError, ModelError, FileNotFoundError, OSError, ValueError) as e:
        print(f"dist-embed: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(results))
    return EXIT_OK


def cmd_merge(args) -> int:
    from .tools.merge import merge_adapter_dir
    from .model.encoder import ModelError
    from .outputs.tracking import setup_logging

    setup_logging(0)
    try:
        merge_adapter_dir(args.adapter, args.out, overwrite=args.overwrite)
    except (ModelError, FileNotFoundError, OSError, ValueError) as e:
        print(f"dist-embed: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(args.out)
    return EXIT_OK


def cmd_prepare(args) -> int:
    from .data.readers import DataError
    from .tools.prepare import prepare
    from .outputs.tracking import setup_logging

    setup_logging(0)
    for flag in ("shard_rows", "block_rows", "max_seq_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"dist-embed: error: --{flag.replace('_', '-')} must be at least 1 (got {value})", file=sys.stderr)
            return EXIT_BAD_INPUT
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


def cmd_mine(args) -> int:
    """Hard-negative mining; with --nproc N (or under torchrun/srun/Ray) across N ranks."""
    from .data.readers import DataError
    from .tools.mine import MineOptions

    for flag in ("nproc", "num_negatives", "range_max", "batch_size", "block_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"dist-embed: error: --{flag.replace('_', '-')} must be at least 1 (got {value})", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.range_min < 0 or args.range_min >= args.range_max:
        print(f"dist-embed: error: --range-min {args.range_min} --range-max {args.range_max}: the candidates "
              "ranked from range-min (>= 0) up to range-max must be a non-empty range", file=sys.stderr)
        return EXIT_BAD_INPUT
    import math

    for flag in ("max_score", "min_score", "absolute_margin", "relative_margin"):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            print(f"dist-embed: error: --{flag.replace('_', '-')} must be a finite number (got {value})",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    columns = {}
    for item in args.columns or []:
        ours, sep, theirs = item.partition("=")
        if not sep or ours not in ("anchor", "positive"):
            print(f"dist-embed: error: --columns {item!r}: expected anchor=NAME or positive=NAME", file=sys.stderr)
            return EXIT_BAD_INPUT
        columns[ours] = theirs
    opt = MineOptions(num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
                      max_score=args.max_score, min_score=args.min_score, absolute_margin=args.absolute_margin,
                      relative_margin=args.relative_margin, batch_size=args.batch_size, block=args.block_size)
    out = Path(args.out)
    if args.ray_address:
        from dataclasses import asdict

        from .launch.ray import submit_mine

        def absolute(p):
            return str(Path(p).resolve()) if p and Path(p).exists() else p

        out.parent.mkdir(parents=True, exist_ok=True)
        return submit_mine(args.ray_address, args.ray_workers, {
            "model": absolute(args.model), "data": absolute(args.data), "out": str(out.resolve()),
            "corpus_file": absolute(args.corpus), "opt": asdict(opt), "columns": columns, "on_error": args.on_error,
            "fmt": args.format, "max_seq_length": args.max_seq_length}, use_gpu=args.use_gpu)
    if args.nproc and args.nproc > 1 and not _inside_launched_job():
        from .launch.local import launch_local

        out.parent.mkdir(parents=True, exist_ok=True)
        return launch_local(args.nproc, sys.argv[1:], str(out.parent))  # the workers see RANK: they mine
    from .distributed import finish, init_distributed
    from .engine.worker import write_marker
    from .model.encoder import ModelError
    from .outputs.tracking import setup_logging

    state = init_distributed()
    setup_logging(state.rank)
    code = EXIT_OK
    try:
        from .tools.mine import mine

        summary = mine(state, model=args.model, data=args.data, out=out, corpus_file=args.corpus, opt=opt,
                       columns=columns, on_error=args.on_error, fmt=args.format, max_seq_length=args.max_seq_length)
        if state.is_main:
            print(json.dumps(summary))
    except (DataError, ModelError, OSError) as e:
        line = _os_error(e) if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) else \
            (str(e).splitlines()[0] if str(e) else type(e).__name__)
        log.error("%s", line)
        code = EXIT_BAD_INPUT
        if state.enabled:
            write_marker(out.parent, BAD_INPUT_MARKER, line, state.rank)
    except Exception:
        log.exception("mining failed")
        code = EXIT_FAILED
    if state.enabled:
        finish(state, code, sync=code == EXIT_OK)
    return code


def cmd_report(args) -> int:
    from .outputs.report import plot, summary

    try:
        print(summary(Path(args.output_dir)))
        print(f"plot: {plot(Path(args.output_dir))}")
    except (OSError, ValueError) as e:
        print(f"dist-embed: error: {e if isinstance(e, (FileNotFoundError, ValueError)) else _os_error(e)}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def cmd_submit(args) -> int:
    cfg = _load_config(args)
    if cfg is None:
        return EXIT_BAD_INPUT
    if args.launcher == "slurm":
        from .launch.slurm import submit

        return submit(args, cfg, args.config, args.overrides)
    from .launch.ray import submit as submit_ray

    return submit_ray(args, cfg, args.config, args.overrides)


def cmd_status(args) -> int:
    from .launch.slurm import status

    if not Path(args.output_dir).is_dir():
        print(f"dist-embed: error: {args.output_dir}: no such run directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        print(status(Path(args.output_dir)))
    except OSError as e:
        print(f"dist-embed: error: {_os_error(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def _os_error(e: OSError) -> str:
    """An OSError as one line: the file and what is wrong with it."""
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e).splitlines()[0]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dist-embed", description="Train sentence-embedding models, one GPU to many nodes.")
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train from a YAML config (+ key.sub=value overrides)")
    tr.add_argument("config", help="YAML config file (see configs/; every key is listed in dist_embed/config.py)")
    tr.add_argument("overrides", nargs="*", help="optional key.sub=value overrides, e.g. training.max_steps=50")
    tr.add_argument("--nproc", type=int, default=None, help="start N worker processes on this machine (N >= 1)")
    tr.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    tr.add_argument("--allow-data-change", action="store_true",
                    help="resume even though the data files or data settings differ from the checkpoint's")
    tr.add_argument("--resume-or-start-fresh", action="store_true",
                    help="with --resume latest: start from scratch when every checkpoint is unusable "
                         "(default: refuse, exit 2)")
    tr.add_argument("--overwrite", action="store_true",
                    help="delete the outputs of an earlier run in output_dir (checkpoints, final/, metrics) "
                         "and start over (default: refuse a directory that holds another run's checkpoints)")
    tr.add_argument("--nnodes", type=int, default=1, help="nodes in the job (one launcher per node)")
    tr.add_argument("--node-rank", type=int, default=None, help="this node's rank (default: $SLURM_NODEID or 0)")
    tr.add_argument("--master-addr", default=None, help="rendezvous host for --nnodes > 1")
    tr.add_argument("--master-port", type=int, default=None, help="rendezvous port for --nnodes > 1")
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
    from .launch.slurm import add_parser as add_slurm

    add_slurm(launchers)
    from .launch.ray import add_parser as add_ray

    add_ray(launchers)
    sb.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="Slurm job state and the latest metrics of an output_dir")
    st.add_argument("output_dir", help="a run's output_dir")
    st.set_defaults(func=cmd_status)

    mn = sub.add_parser("mine", help="mine hard negatives for (anchor, positive) data -> negative_1..k columns")
    mn.add_argument("data", help="(anchor, positive) rows: jsonl/csv/tsv/parquet file or directory, or HF dataset")
    mn.add_argument("--model", required=True, help="the model that scores candidates (directory or hub id)")
    mn.add_argument("--out", required=True, help="output: a .jsonl file, or a directory with --format shards")
    mn.add_argument("--corpus", default=None, help="more candidate texts (a 'text' column) beside the positives")
    mn.add_argument("--num-negatives", type=int, default=3, help="negatives per anchor (default 3)")
    mn.add_argument("--range-min", type=int, default=0, help="skip the closest N candidates (default 0)")
    mn.add_argument("--range-max", type=int, default=100, help="consider only the closest N (default 100)")
    mn.add_argument("--max-score", type=float, default=None, help="drop candidates scoring above this")
    mn.add_argument("--min-score", type=float, default=None, help="drop candidates scoring below this")
    mn.add_argument("--absolute-margin", type=float, default=None,
                    help="keep a candidate only if it scores <= positive score - margin")
    mn.add_argument("--relative-margin", type=float, default=None,
                    help="keep a candidate only if it scores <= positive score x (1 - margin); 0.05 drops "
                         "candidates above 0.95 x the positive (likely false negatives)")
    mn.add_argument("--columns", action="append", help="anchor=NAME / positive=NAME: the data's column names")
    mn.add_argument("--format", default="jsonl", choices=["jsonl", "shards"], help="jsonl file or prepared shards")
    mn.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")
    mn.add_argument("--max-seq-length", type=int, default=None, help="truncation (default: the model's)")
    mn.add_argument("--block-size", type=int, default=512, help="anchors per unit of work and of resume")
    mn.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="bad rows: stop or skip+count")
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
    from .engine.stops import STOP_SIGNALS, STOPS

    command = (sys.argv[1:] if argv is None else argv)[:1]
    if command == ["train"]:
        STOPS.install()  # stop signals are recorded from the first moment: a run acts on them, never dies of them
    elif _inside_launched_job():  # our launcher started this worker with stop signals blocked (pending)
        import signal

        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # other commands: the default action
    parser = build_parser()
    # overrides (key.sub=value) may come after options: collect the ones argparse left over
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in rest if "=" in a and not a.startswith("-")]
    if len(extra) != len(rest) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(a for a in rest if a not in extra) or ' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    code = args.func(args)
    if argv is None:  # the process's own command, about to exit
        # The outcome is decided: a stop signal from here on has nothing to stop. Ignored, not left
        # to a handler: interpreter shutdown puts the default action (death) back for handled
        # signals, and a run that ended well would report itself killed (SIG_IGN stays through it).
        import signal

        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
