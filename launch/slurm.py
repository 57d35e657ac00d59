"""``dist-embed submit slurm``: render train.sbatch (beside this file; also at slurm/train.sbatch)
with the job's options, check that Slurm could ever start it, and submit it."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from dist_embed.exit_codes import EXIT_BAD_INPUT

JOB_ID_FILE = "slurm_job_id"


TEMPLATE = Path(__file__).resolve().parent / "train.sbatch"


def template_text() -> str:
    return TEMPLATE.read_text(encoding="utf-8")


def _directive(key: str, value: str) -> str:
    return f"#SBATCH --{key}" + (f"={value}" if value != "" else "")


def render(options: dict[str, str | None], env: dict[str, str] | None = None) -> str:
    """Set ``#SBATCH --key=value`` lines: replace the template's, append the rest; None removes one."""
    lines = template_text().splitlines()
    out, seen = [], set()
    last_directive = 0
    for line in lines:
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:[= ](.*))?$", line)
        if m:
            key = m.group(1)
            seen.add(key)
            if key in options:
                if options[key] is not None:
                    out.append(_directive(key, options[key]))
            else:
                out.append(line)
            last_directive = len(out)
            continue
        out.append(line)
    extra = [_directive(k, v) for k, v in options.items() if k not in seen and v is not None]
    exports = [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    out[last_directive:last_directive] = extra + ([""] + exports if exports else [])
    return "\n".join(out) + "\n"


def time_limit_seconds(text: str) -> int | None:
    """Slurm's --time forms in seconds (None: unlimited, also 0): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    if text.strip().upper() in ("INFINITE", "UNLIMITED"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(text)
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return (a * 60 + b) * 60 + c
    return a * 60 + (b or 0)  # M or M:S


def bad_options(args) -> str | None:
    """The one line for options Slurm would reject late, or take and then misbehave on."""
    for flag, value, least in (("--nodes", args.nodes, 1), ("--gpus-per-node", args.gpus_per_node, 0),
                               ("--nproc-per-node", args.nproc_per_node, 0), ("--cpus-per-task", args.cpus_per_task, 0),
                               ("--signal-seconds", args.signal_seconds, 0), ("--max-restarts", args.max_restarts, 0)):
        if value < least:
            return f"{flag} must be at least {least} (got {value})"
    if args.signal_seconds > 65535:
        return f"--signal-seconds must be at most 65535, Slurm's limit (got {args.signal_seconds})"
    default = re.search(r"^#SBATCH --time=(\S+)", template_text(), re.M)
    text = args.time or (default.group(1) if default else None)
    if text:
        try:
            limit = time_limit_seconds(text) or None  # 0: no limit, as Slurm reads it
        except ValueError:
            return (f"--time {text!r}: not a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
                    "D-HH:MM:SS)")
        if limit is not None and args.signal_seconds >= limit:
            return (f"--signal-seconds {args.signal_seconds} is not shorter than --time {text} ({limit} s): "
                    "the job would be signalled, checkpoint and requeue at once, again and again")
    return None


def submit(args, cfg, config_path: str, overrides: list[str]) -> int:
    problem = bad_options(args)
    if problem:
        print(f"dist-embed: error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out_dir = Path(cfg.output_dir).resolve()
    gpus = args.gpus_per_node
    nproc = args.nproc_per_node or gpus or 1
    options: dict[str, str | None] = {
        "job-name": args.job_name or f"dist-embed-{out_dir.name}",
        "nodes": str(args.nodes),
        "ntasks-per-node": "1",
        "cpus-per-task": str(args.cpus_per_task) if args.cpus_per_task else None,
        "output": str(out_dir / "slurm-%j.out"),
        "signal": f"USR1@{args.signal_seconds}",
        "requeue": "",
    }
    for key, value in (("gpus-per-node", gpus), ("partition", args.partition), ("time", args.time),
                       ("account", args.account), ("qos", args.qos), ("constraint", args.constraint)):
        if value:
            options[key] = str(value)
    if not args.cpus_per_task:
        options.pop("cpus-per-task")
    script = render(options, env={"NPROC_PER_NODE": str(nproc), "MAX_RESTARTS": str(args.max_restarts),
                                  "DIST_EMBED": f"{sys.executable} -m launch.cli"})
    cmd_args = [str(Path(config_path).resolve()), *overrides]
    if args.dry_run:
        print(script)
        print(f"# submit with: sbatch {out_dir / 'train.sbatch'} {shlex.join(cmd_args)}")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "train.sbatch"
    path.write_text(script, encoding="utf-8")
    asked = re.search(r"^#SBATCH --cpus-per-task=(\d+)", script, re.M)
    problem = cannot_start(path, cmd_args, args.partition, int(asked.group(1)) if asked else 0)
    if problem:
        print(f"dist-embed: error: this job could never start: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    r = subprocess.run(["sbatch", "--parsable", str(path), *cmd_args], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"dist-embed: error: sbatch failed: {r.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = r.stdout.strip().split(";")[0]
    (out_dir / JOB_ID_FILE).write_text(job_id + "\n")
    print(job_id)
    return 0


def cannot_start(script: Path, cmd_args: list[str], partition: str | None, cpus_per_task: int) -> str | None:
    """Why Slurm could never run this job (None if it could): a job that asks for more than any node
    of the partition has is accepted by sbatch and then pends forever (reason PartitionConfig)."""
    if cpus_per_task:
        q = _run(["sinfo", "-h", "-o", "%c"] + (["-p", partition] if partition else []))
        counts = [int(c) for c in re.findall(r"\d+", q.stdout)] if q is not None and q.returncode == 0 else []
        if counts and cpus_per_task > max(counts):
            where = f"partition {partition}" if partition else "the cluster"
            return (f"--cpus-per-task {cpus_per_task}, but the largest node in {where} has {max(counts)} CPUs "
                    f"(Slurm would leave it pending with reason PartitionConfig); ask for at most {max(counts)}")
    r = _run(["sbatch", "--test-only", str(script), *cmd_args])
    if r is None:
        return None  # no sbatch here: the real submission reports it
    if r.returncode != 0:
        return f"sbatch --test-only: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'refused'}"
    return None


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None


PENDING_REASONS = {
    "PartitionConfig": "the job asks for more than the partition's nodes have (CPUs, GPUs, memory, nodes or time); "
                       "it will never start: scancel it and submit with less",
    "Resources": "waiting for resources to free up",
    "Priority": "waiting behind higher-priority jobs",
    "BeginTime": "held until its begin time (e.g. a requeued job waits a little before it may start)",
    "ReqNodeNotAvail": "a requested node is down or reserved",
}


def job_state(job_id: str) -> str:
    """RUNNING / PENDING / ... from squeue, or the final state from sacct, or 'not in queue'."""
    try:
        r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %M %R"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unknown (no squeue here)"
    if r.returncode == 0 and r.stdout.strip():
        line = r.stdout.strip()
        reason = re.search(r"\((\w+)", line) if line.startswith("PENDING") else None
        if reason and reason.group(1) in PENDING_REASONS:
            line += f": {PENDING_REASONS[reason.group(1)]}"
        return line
    try:
        r = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True,
                           timeout=30)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.split()[0]
    except FileNotFoundError:
        pass
    return "not in queue (finished or never started)"


def status(out_dir: Path) -> str:
    from dist_embed.outputs.report import summary

    lines = []
    id_file = out_dir / JOB_ID_FILE
    if id_file.exists():
        job = id_file.read_text().strip()
        lines.append(f"slurm job {job}: {job_state(job)}")
    try:
        lines.append(summary(out_dir))
    except FileNotFoundError:
        lines.append(f"{out_dir}: no metrics yet")
    return "\n".join(lines)


def add_parser(sub) -> None:
    sp = sub.add_parser("slurm", help="render slurm/train.sbatch for this config and sbatch it")
    sp.add_argument("config", help="YAML config file")
    sp.add_argument("overrides", nargs="*", help="optional key.sub=value overrides")
    sp.add_argument("--nodes", type=int, default=1, help="nodes (one launcher task each)")
    sp.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: a CPU job)")
    sp.add_argument("--nproc-per-node", type=int, default=0, help="workers per node (default: GPUs, else 1)")
    sp.add_argument("--cpus-per-task", type=int, default=0,
                    help="CPUs for each node's launcher task (default: the template's)")
    sp.add_argument("--partition", help="Slurm partition")
    sp.add_argument("--time", help="time limit, e.g. 12:00:00")
    sp.add_argument("--account", help="Slurm account")
    sp.add_argument("--qos", help="quality of service")
    sp.add_argument("--constraint", help="node features, e.g. a100")
    sp.add_argument("--job-name", help="default: dist-embed-<output_dir name>")
    sp.add_argument("--signal-seconds", type=int, default=180, help="SIGUSR1 this long before the time limit")
    sp.add_argument("--max-restarts", type=int, default=3,
                    help="start the job step again after a lost node, up to N times per allocation (default 3)")
    sp.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    sp.set_defaults(launcher="slurm")

