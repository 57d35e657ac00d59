"""The worker side of the command line: ``train`` and ``mine`` as one process runs them (alone, or
as one rank that torchrun, accelerate, srun, Ray or our launchers started: ``python -m dist_embed``).

The user's ``dist-embed`` command (``launch/cli.py``) adds what starts processes (``--nproc``,
``--nnodes``, ``submit``) on top of these same arguments; it sits above this library, which never
imports it. Exit codes: ``exit_codes``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .exit_codes import BAD_INPUT_MARKER, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED

log = logging.getLogger("dist_embed")


def inside_launched_job() -> bool:
    """A worker started by torchrun / accelerate / Ray / our launcher (they set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def error(message: str) -> int:
    """The one line a bad input gets, and its exit code."""
    print(f"dist-embed: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def os_error(e: OSError) -> str:
    """An OSError as one line: the file and what is wrong with it."""
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e).splitlines()[0]


def load_config_or_say(args):
    """The validated config, or None after printing the one-line error."""
    from .config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        error(str(e))
        return None


# ---------------------------------------------------------------------------------------------
# train


def add_train_arguments(tr: argparse.ArgumentParser) -> None:
    tr.add_argument("config", help="YAML config file (see configs/; every key and its default: "
                                   "dist_embed/config/schema.py)")
    tr.add_argument("overrides", nargs="*", help="optional key.sub=value overrides, e.g. training.max_steps=50")
    tr.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    tr.add_argument("--allow-data-change", action="store_true",
                    help="resume even though the data files or data settings differ from the checkpoint's")
    tr.add_argument("--resume-or-start-fresh", action="store_true",
                    help="with --resume latest: start from scratch when every checkpoint is unusable "
                         "(default: refuse, exit 2)")
    tr.add_argument("--overwrite", action="store_true",
                    help="delete the outputs of an earlier run in output_dir (checkpoints, final/, metrics) "
                         "and start over (default: refuse a directory that holds another run's checkpoints)")


def train_worker_args(args) -> list[str]:
    """The arguments a worker of this training gets (``python -m dist_embed train ...``)."""
    return (["train", args.config, *args.overrides] + (["--resume", args.resume] if args.resume else [])
            + (["--allow-data-change"] if args.allow_data_change else [])
            + (["--resume-or-start-fresh"] if args.resume_or_start_fresh else []))


def train_args_problem(args) -> str | None:
    """Options that mean nothing without the one they qualify (a silently ignored flag)."""
    if args.resume_or_start_fresh and args.resume != "latest":
        return "--resume-or-start-fresh qualifies --resume latest (pass both, or neither)"
    if args.allow_data_change and not args.resume:
        return "--allow-data-change qualifies --resume (a fresh run reads whatever data it is given)"
    return None


def run_train(args, cfg=None) -> int:
    """Train in this process (alone, or as one rank of a launched job)."""
    problem = train_args_problem(args)
    if problem:
        return error(problem)
    cfg = cfg if cfg is not None else load_config_or_say(args)
    if cfg is None:
        return EXIT_BAD_INPUT
    from .engine.worker import run_worker

    return run_worker(cfg, args.resume, allow_data_change=args.allow_data_change,
                      allow_fresh_start=args.resume_or_start_fresh, overwrite=args.overwrite)


# ---------------------------------------------------------------------------------------------
# mine


def add_mine_arguments(mn: argparse.ArgumentParser) -> None:
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
    mn.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never an input)")


def mine_options(args):
    """``(MineOptions, columns)`` from the arguments, or ``(None, message)`` for a bad value."""
    import math

    from .tools.mine import MineOptions

    for flag in ("num_negatives", "range_max", "batch_size", "block_size", "max_seq_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            return None, f"--{flag.replace('_', '-')} must be at least 1 (got {value})"
    if args.range_min < 0 or args.range_min >= args.range_max:
        return None, (f"--range-min {args.range_min} --range-max {args.range_max}: the candidates ranked from "
                      "range-min (>= 0) up to range-max must be a non-empty range")
    for flag in ("max_score", "min_score", "absolute_margin", "relative_margin"):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            return None, f"--{flag.replace('_', '-')} must be a finite number (got {value})"
    columns = {}
    for item in args.columns or []:
        ours, sep, theirs = item.partition("=")
        if not sep or ours not in ("anchor", "positive"):
            return None, f"--columns {item!r}: expected anchor=NAME or positive=NAME"
        columns[ours] = theirs
    problem = mine_out_problem(args)
    if problem:
        return None, problem
    opt = MineOptions(num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
                      max_score=args.max_score, min_score=args.min_score, absolute_margin=args.absolute_margin,
                      relative_margin=args.relative_margin, batch_size=args.batch_size, block=args.block_size)
    return opt, columns


def output_overlaps(out: str, inputs: list[tuple[str, str | None]]) -> str | None:
    """Why ``--out`` would write over an input (``inputs``: (what, path) pairs): it is one, lies
    inside an input directory, or holds one; None if it does none of these."""
    target = Path(out).resolve()
    for what, given in inputs:
        if not given or not Path(given).exists():
            continue
        inp = Path(given).resolve()
        if target == inp or (inp.is_dir() and inp in target.parents) or target in inp.parents:
            return f"--out {out}: it {'is' if target == inp else 'holds or lies inside'} {what} ({given})"
    return None


def mine_out_problem(args) -> str | None:
    """Why ``--out`` cannot take the mined rows (None if it can): never an input (the data, the
    corpus, the model) or a place inside one, never an existing file or directory unless
    ``--overwrite``; a jsonl output is a file."""
    out = Path(args.out).resolve()
    problem = output_overlaps(args.out, [("the data", args.data), ("--corpus", args.corpus), ("--model", args.model)])
    if problem:
        return f"{problem}; write the mined rows to a new path"
    if args.format == "jsonl" and out.is_dir():
        return f"--out {args.out}: a directory; --format jsonl writes a file (or use --format shards)"
    if out.exists() and not args.overwrite and (out.is_file() or any(out.iterdir())):
        return f"--out {args.out}: already exists; choose a new path, or pass --overwrite to replace it"
    return None


def run_mine(args) -> int:
    """Mine in this process: alone, or as one rank of a launched job (every rank a share)."""
    import signal

    from .data.readers import DataError
    from .distributed import finish, init_distributed
    from .engine.stops import STOPS
    from .engine.worker import write_marker
    from .tools.mine import MiningStopped
    from .model.encoder import ModelError
    from .outputs.tracking import setup_logging

    opt, columns = mine_options(args)
    if opt is None:
        return error(columns)
    out = Path(args.out)
    state = init_distributed()
    setup_logging(state.rank)
    code = EXIT_OK
    try:
        from .tools.mine import mine

        summary = mine(state, model=args.model, data=args.data, out=out, corpus_file=args.corpus, opt=opt,
                       columns=columns, on_error=args.on_error, fmt=args.format, max_seq_length=args.max_seq_length,
                       stop_requested=lambda: STOPS.signum is not None)
        if state.is_main:
            print(json.dumps(summary))
    except MiningStopped as e:
        if state.is_main:
            log.warning("mining stopped by %s: %s", signal.Signals(STOPS.signum or signal.SIGTERM).name, e)
        code = EXIT_PREEMPTED
    except (DataError, ModelError, OSError) as e:
        line = os_error(e) if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) else \
            (str(e).splitlines()[0] if str(e) else type(e).__name__)
        log.error("%s", line)
        code = EXIT_BAD_INPUT
        if state.enabled:
            write_marker(out.parent, BAD_INPUT_MARKER, line, state.rank)
    except Exception:
        log.exception("mining failed")
        code = EXIT_FAILED
    if state.enabled:
        finish(state, code, sync=code in (EXIT_OK, EXIT_PREEMPTED))
    return code


# ---------------------------------------------------------------------------------------------
# the process


def parse(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Arguments, with ``key.sub=value`` overrides allowed after options too."""
    args, rest = parser.parse_known_args(argv)
    extra = [a for a in rest if "=" in a and not a.startswith("-")]
    if len(extra) != len(rest) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(a for a in rest if a not in extra) or ' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def begin(argv: list[str] | None) -> None:
    """A process's first act: ``train`` and ``mine`` record stop signals from this moment (a run
    checkpoints, mining ends after whole blocks: both exit 75 and continue when run again, never
    die of them); other commands started by our launcher (signals held pending) get the default
    action back."""
    import signal

    from .engine.stops import STOP_SIGNALS, STOPS

    if (sys.argv[1:] if argv is None else argv)[:1] in (["train"], ["mine"]):
        STOPS.install()
    elif inside_launched_job():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def end(code: int, argv: list[str] | None) -> int:
    """The outcome is decided: a stop signal from here on has nothing to stop. Ignored, not left to
    a handler: interpreter shutdown puts the default action (death) back for handled signals, and a
    run that ended well would report itself killed (SIG_IGN stays through it)."""
    if argv is None:  # the process's own command, about to exit
        import signal

        from .engine.stops import STOP_SIGNALS, TERMINAL_SIGNALS

        for s in STOP_SIGNALS + tuple(TERMINAL_SIGNALS):
            signal.signal(s, signal.SIG_IGN)
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m dist_embed train|mine ...``: one process's part of a job."""
    begin(argv)
    ap = argparse.ArgumentParser(prog="python -m dist_embed",
                                 description="One worker of a dist_embed job (the launcher is `dist-embed`).")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train (this process alone, or one rank of a launched job)")
    add_train_arguments(tr)
    tr.set_defaults(func=run_train)
    mn = sub.add_parser("mine", help="mine hard negatives (this process alone, or one rank)")
    add_mine_arguments(mn)
    mn.set_defaults(func=run_mine)
    args = parse(ap, argv)
    return end(args.func(args), argv)
