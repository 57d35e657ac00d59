#!/usr/bin/env python3
"""One rank's data work per epoch at each world size: the sharded plane against the global one.

    python benchmarks/data_plane.py [--worlds 1,8,64,1024] [--rows 557850]
                                    [--formats shards,jsonl,csv,parquet] [--batch 64] [--json]

A rank's work is its share of the start-up scan (cutting the data set into pieces and counting
and validating its own) plus planning one epoch over its pieces (reading, validating, shuffling,
proposing candidates and de-duplicating them, cutting its slice of every global batch). Large
worlds run in-process as one rank of that world: the hash exchange is replaced by the same owner
work on this rank's own hashes (``LocalExchange``: each rank handles about its own number of hashes
in the real exchange), the other ranks' piece counts by estimates (they only number the rows).
Tokenizing is not included: it is per-rank work under either plane (data_pipeline.py measures it);
nor are imports (done before the clock starts, as in a trainer).

The global plane is today's: every rank validates every row at start-up and plans the whole epoch,
at any world size, so it is measured once (world 1) and printed beside every world.

Each measurement runs in a fresh subprocess so its peak RSS is its own. The corpus comes from
``shared/tools/make_scale_corpus.py`` (``--rows`` of it), written as uncompressed jsonl, csv,
parquet and ``prepare-data`` shards (row groups and blocks small enough, at most 1,024 rows, that the
largest world gets at least four per rank: a parquet file splits no finer than its row groups).

Prints one line per format and world, or with ``--json`` one JSON object per line with ``format``,
``world``, ``rows`` (this rank's), ``per_rank_seconds``, ``scan_seconds``, ``plan_seconds``,
``resume_seconds`` (this rank's resume from a checkpoint at 90% of its share: the saved state read,
the first slice cut), ``per_rank_rows_s``, ``aggregate_rows_s`` (per-rank rate x world: the ranks
run side by side),
``peak_rss_mib``, and ``global_*`` for the global plane and ``target_seconds`` (1.25 x the
world-1 seconds / world + 0.05).
"""
from __future__ import annotations

import argparse
import csv
import gc
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO.parent / "shared" / "tools" / "make_scale_corpus.py"
COLUMNS = ("anchor", "positive", "negative")


def spec_for(path: str, world: int, batch: int, plane: str):
    from dist_embed.data.loader import PlanSpec
    from dist_embed.data.readers import Source
    from dist_embed.data.rows import Schema

    return PlanSpec(Source(path), Schema.for_loss("mnrl"), {}, "raise", 42, batch * world, True, 10_000, True, None,
                    plane=plane)


def measure_sharded(path: str, world: int, rank: int, batch: int) -> dict:
    from dist_embed.data.loader import _row_from_json
    from dist_embed.data.pieces import PieceSource, merge_counts
    from dist_embed.data.sharded import LocalExchange, Sharding, sharded_planner

    spec = spec_for(path, world, batch, "sharded")
    t0 = time.perf_counter()
    src = PieceSource(spec)
    cut = src.cut(world)
    mine = {i: src.count(p) for i, p in enumerate(cut) if i % world == rank}
    counted = [(cut[i], c) for i, c in mine.items()]
    per_byte = sum(c["records"] for _, c in counted) / max(sum(max(p.stop - p.start, 1) for p, _ in counted), 1)

    def estimate(p):  # another rank's count (only numbers rows here)
        if p.rows >= 0:
            n = p.rows
        elif p.kind == "group":
            n = p.stop - p.start
        else:
            n = int((p.stop - p.start) * per_byte)
        return {"records": n, "lines": n, "valid": n, "skips": {}, "error": None}

    counts = [mine.get(i) or estimate(p) for i, p in enumerate(cut)]
    table, _, _ = merge_counts(src, cut, counts, world, 1.0)
    scan = time.perf_counter() - t0
    sharding = Sharding([src], [table], [src.width()], LocalExchange(rank, world))
    planner = sharded_planner(spec, sharding, 0, 0, None, 0, _row_from_json)
    share = sum(table[p].rows for p, _ in planner.queue)
    t1 = time.perf_counter()
    rows, saved = 0, None
    while (b := planner.next_batch(spec.global_batch)) is not None:
        rows += len(b)
        if saved is None and rows >= 0.9 * share:  # a checkpoint at 90% of the epoch, as JSON
            saved = json.dumps(planner.state_dict())
    plan = time.perf_counter() - t1
    resume = None
    if saved is not None:  # what a resume there costs this rank: its state read, its first slice cut
        t2 = time.perf_counter()
        fresh = Sharding([PieceSource(spec)], [table], [src.width()], LocalExchange(rank, world))
        again = sharded_planner(spec, fresh, 0, 0, json.loads(saved), 0, _row_from_json)
        again.next_batch(spec.global_batch)
        resume = time.perf_counter() - t2
    return {"rows": rows, "scan_seconds": scan, "plan_seconds": plan, "pieces": len(table),
            "resume_seconds": resume, "peak_rss_mib": peak_rss_mib()}


def measure_global(path: str, batch: int) -> dict:
    """Today's plan at world 1 (every rank's work at any world size): the validating scan, then the
    whole epoch planned (a rank keeps its slice of each global batch; the planning is the same)."""
    from dist_embed.data.rows import scan

    spec = spec_for(path, 1, batch, "global")
    t0 = time.perf_counter()
    scan(spec.source, spec.schema, dict(spec.columns), "raise", 1.0)
    t1 = time.perf_counter()
    rows = sum(len(b) for b in spec.batches(0))
    return {"rows": rows, "scan_seconds": t1 - t0, "plan_seconds": time.perf_counter() - t1,
            "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started (VmHWM: ``ru_maxrss`` would also count
    the parent's memory at the fork that started it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def warm_imports() -> None:
    """The libraries a trainer has imported long before its data plane starts (not data work)."""
    import pyarrow.parquet  # noqa: F401
    import xxhash  # noqa: F401

    import dist_embed.data.loader  # noqa: F401
    import dist_embed.data.pieces  # noqa: F401
    import dist_embed.data.sharded  # noqa: F401

    gc.collect()
    gc.freeze()  # as the trainer does with its long-lived objects: a collection walks only new ones


def child(args) -> None:
    warm_imports()
    if args.plane == "global":
        out = measure_global(args.path, args.batch)
    else:
        out = measure_sharded(args.path, args.world, args.rank, args.batch)
    out["per_rank_seconds"] = out["scan_seconds"] + out["plan_seconds"]
    print(json.dumps(out))


def write_formats(rows: int, formats: list[str], tmp: Path, max_world: int) -> dict[str, Path]:
    small = max(32, min(1024, rows // (4 * max_world)))  # blocks / row groups: four per rank at the largest world
    gz = tmp / "corpus.jsonl.gz"
    subprocess.run([sys.executable, str(TOOL), "--rows", str(rows), "--out", str(gz)], check=True, capture_output=True)
    out: dict[str, Path] = {}
    if "jsonl" in formats or "csv" in formats or "parquet" in formats:
        out["jsonl"] = tmp / "corpus.jsonl"
        with gzip.open(gz, "rb") as f, open(out["jsonl"], "wb") as g:
            shutil.copyfileobj(f, g)
    if "jsonl.gz" in formats:
        out["jsonl.gz"] = gz
    if "csv" in formats:
        out["csv"] = tmp / "corpus.csv"
        with open(out["jsonl"], encoding="utf-8") as f, open(out["csv"], "w", newline="", encoding="utf-8") as g:
            w = csv.writer(g)
            w.writerow(COLUMNS)
            for line in f:
                r = json.loads(line)
                w.writerow([r[c] for c in COLUMNS])
    if "parquet" in formats:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out["parquet"] = tmp / "corpus.parquet"
        with open(out["jsonl"], encoding="utf-8") as f:
            recs = [json.loads(line) for line in f]
        pq.write_table(pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in recs]), out["parquet"],
                       row_group_size=small)
        del recs
    if "shards" in formats:
        out["shards"] = tmp / "shards"
        subprocess.run([sys.executable, "-m", "launch.cli", "prepare-data", str(gz), "--out", str(out["shards"]),
                        "--block-rows", str(small)], check=True, capture_output=True, cwd=REPO)
    return {f: out[f] for f in formats}


def run_child(path: Path, plane: str, world: int, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--plane", plane, "--worlds", str(world),
           "--batch", str(batch)]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(r.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,8,64,1024")
    ap.add_argument("--rows", type=int, default=557_850)
    ap.add_argument("--formats", default="shards,jsonl,csv,parquet")
    ap.add_argument("--batch", type=int, default=64, help="rows per rank per global batch")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plane", default="sharded", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.path, args.world = args.child, int(args.worlds)
        child(args)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    formats = args.formats.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="data-plane-"))
    try:
        paths = write_formats(args.rows, formats, tmp, max(worlds))
        if not args.json:
            print(f"# {args.rows} rows, {args.batch} rows per rank per batch; seconds are one rank's "
                  "(start-up scan share + one epoch planned)")
            print(f"{'format':<8} {'world':>5} {'rank rows':>9} {'seconds':>8} {'target':>7} {'rows/s':>9} "
                  f"{'aggregate':>11} {'RSS MiB':>8} {'resume s':>8} {'global s':>9} {'global RSS':>10}")
        for fmt, path in paths.items():
            glob = run_child(path, "global", 1, args.batch)
            first = None
            for world in worlds:
                r = run_child(path, "sharded", world, args.batch)
                first = first if first is not None else (r["per_rank_seconds"] if world == 1 else None)
                rate = r["rows"] / max(r["per_rank_seconds"], 1e-9)
                rec = {"format": fmt, "world": world, "rows": r["rows"], "per_rank_seconds": r["per_rank_seconds"],
                       "scan_seconds": r["scan_seconds"], "plan_seconds": r["plan_seconds"], "pieces": r["pieces"],
                       "resume_seconds": r["resume_seconds"], "per_rank_rows_s": rate, "aggregate_rows_s": rate * world, "peak_rss_mib": r["peak_rss_mib"],
                       "target_seconds": None if first is None else 1.25 * first / world + 0.05,
                       "global_per_rank_seconds": glob["per_rank_seconds"],
                       "global_aggregate_rows_s": glob["rows"] / glob["per_rank_seconds"],
                       "global_peak_rss_mib": glob["peak_rss_mib"], "corpus_rows": args.rows}
                if args.json:
                    print(json.dumps(rec), flush=True)
                else:
                    target = "" if rec["target_seconds"] is None else f"{rec['target_seconds']:.3f}"
                    print(f"{fmt:<8} {world:>5} {r['rows']:>9} {r['per_rank_seconds']:>8.3f} {target:>7} "
                          f"{rate:>9.0f} {rate * world:>11.0f} {r['peak_rss_mib']:>8.0f} "
                          f"{r['resume_seconds'] if r['resume_seconds'] is not None else float('nan'):>8.3f} "
                          f"{glob['per_rank_seconds']:>9.2f} {glob['peak_rss_mib']:>10.0f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
