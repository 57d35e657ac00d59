"""webdataset shards: prepare-data round trip, bad input, interrupted jobs, positions, URLs, and
training over shards with 2 processes x 2 workers, resumed at another world size.

Shapes (rows, shard and block sizes, stop points) come from a printed seed (DIST_EMBED_FUZZ_SEED)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dist_embed.data.loader import collate
from dist_embed.data.readers import Source
from dist_embed.data.rows import Schema, validate_rows
from dist_embed.data.shards import MANIFEST, file_sha256

from conftest import REPO, minilm_dir, quick_triplets, run_cli, tiny_config, write_jsonl
from test_distributed import read_row_log

SEED = int(os.environ.get("DIST_EMBED_FUZZ_SEED", random.randrange(1 << 30)))


def corpus(n: int, rng: random.Random, dups: bool = False) -> list[dict]:
    """Real SNLI triplets (cycled, numbered so every text is unique unless ``dups``), with some
    non-ASCII and long texts."""
    base = quick_triplets()
    rows = []
    for i in range(n):
        r = dict(base[i % 40 if dups else i % len(base)])
        if not dups or rng.random() < 0.7:
            r = {k: f"{v} #{i}" for k, v in r.items()}
        if rng.random() < 0.05:
            r["positive"] += " — ünïcödé ✓ 中文"
        if rng.random() < 0.02:
            r["anchor"] = " ".join([r["anchor"]] * 20)
        rows.append(r)
    return rows


def prepare(*args, expect=0, timeout=600):
    r = run_cli("prepare-data", *args, timeout=timeout)
    assert r.returncode == expect, r.stderr[-3000:]
    return r


def records(path, **kw):
    return [(r.row_id, r.fields, r.ids) for r in Source(str(path), **kw).records()]


def test_prepare_round_trip_rows_order_checksums_determinism(tmp_path):
    rng = random.Random(SEED)
    n = rng.randrange(700, 2500)
    block = rng.choice([16, 64, 100])
    shard = block * rng.randrange(2, 9) + rng.choice([0, 0, 7])  # a short last block per shard too
    rows = corpus(n, rng)
    split = rng.randrange(1, n)
    a = write_jsonl(tmp_path / "a.jsonl.gz", rows[:split])
    import pyarrow as pa
    import pyarrow.parquet as pq

    b = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(rows[split:]), b, row_group_size=97)
    note = f"seed {SEED}: {n} rows ({split} jsonl + parquet), shards of {shard}, blocks of {block}"
    out1, out2 = tmp_path / "s1", tmp_path / "s2"
    for out in (out1, out2):
        prepare(a, b, "--out", out, "--shard-rows", shard, "--block-rows", block)
    man = json.loads((out1 / MANIFEST).read_text())
    assert man["rows"] == n and sum(s["rows"] for s in man["shards"]) == n, note
    assert len(man["shards"]) == -(-n // shard), note
    for s in man["shards"]:
        assert file_sha256(out1 / s["name"]) == (s["sha256"], s["bytes"]), note
        assert (out1 / s["name"]).read_bytes() == (out2 / s["name"]).read_bytes(), note  # deterministic
    got = records(out1)
    assert [r[0] for r in got] == list(range(n)), note
    assert [r[1] for r in got] == rows, note
    # the standard tools read it: tar lists the members webdataset groups into samples
    listing = subprocess.run(["tar", "tf", out1 / man["shards"][0]["name"]], capture_output=True, text=True).stdout
    assert listing.split()[:1] == ["000000000000.rows.json"], note
    # a second prepare-data into a finished directory is a no-op; other sources there are refused
    assert "already prepared" in prepare(a, b, "--out", out1, "--shard-rows", shard, "--block-rows", block).stderr
    r = prepare(a, "--out", out1, expect=2)
    assert "other sources or options" in r.stderr and "Traceback" not in r.stderr


def test_pretokenized_shards_give_the_tokenizers_batches(tmp_path):
    from transformers import AutoTokenizer

    rng = random.Random(SEED + 1)
    rows = corpus(300, rng)
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    length = rng.choice([16, 32, 128])
    prepare(src, "--out", tmp_path / "s", "--shard-rows", 128, "--block-rows", 32,
            "--tokenizer", minilm_dir(), "--max-seq-length", length)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    schema = Schema.for_loss("mnrl")
    with_ids = list(validate_rows(Source(str(tmp_path / "s"), token_ids=True).records(), schema, {}))
    plain = list(validate_rows(Source(str(src)).records(), schema, {}))
    assert all(r.ids is not None for r in with_ids)
    for i in rng.sample(range(300), 20):
        got = np.frombuffer(with_ids[i].ids[0], dtype="<i4").tolist()
        assert got == tok(rows[i]["anchor"], truncation=True, max_length=length)["input_ids"]
    for start in range(0, 300, 37):
        a = collate(with_ids[start:start + 37], tok, length)
        b = collate(plain[start:start + 37], tok, length)
        for fa, fb in zip(a.features, b.features):
            assert fa.keys() == fb.keys()
            for k in fa:
                assert fa[k].equal(fb[k]), (start, k)


def test_prepare_bad_input_names_file_line_and_column(tmp_path):
    rng = random.Random(SEED + 2)
    rows = corpus(200, rng)
    bad_at = sorted(rng.sample(range(1, 200), 3))
    kinds = ["empty", "null", "number", "missing"]
    lines = []
    for i, r in enumerate(rows):
        if i in bad_at:
            kind = kinds[bad_at.index(i) % len(kinds)]
            r = dict(r)
            if kind == "empty":
                r["positive"] = "   "
            elif kind == "null":
                r["positive"] = None
            elif kind == "number":
                r["positive"] = 5
            else:
                del r["positive"]
        lines.append(json.dumps(r))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    r = prepare(path, "--out", tmp_path / "s", expect=2)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{path}:{bad_at[0] + 1}:" in err[0] and "'positive'" in err[0], (bad_at, err)
    assert not (tmp_path / "s" / MANIFEST).exists()
    prepare(path, "--out", tmp_path / "k", "--on-error", "skip", "--shard-rows", 64, "--block-rows", 16)
    man = json.loads((tmp_path / "k" / MANIFEST).read_text())
    assert man["rows"] == 197 and man["skipped"]["total"] == 3
    kept = [f for _, f, _ in records(tmp_path / "k")]
    assert kept == [r for i, r in enumerate(rows) if i not in bad_at]
    r = prepare(tmp_path / "nope.jsonl", "--out", tmp_path / "x", expect=2)
    assert "nope.jsonl: file not found" in r.stderr
    r = prepare(path, "--out", tmp_path / "y", "--shard-rows", 0, expect=2)
    assert "--shard-rows must be at least 1" in r.stderr


def test_prepare_continues_after_being_killed(tmp_path):
    """SIGKILL after the first shards: the rerun keeps them (checked by sha256) and the result is
    byte-identical to an uninterrupted run."""
    rng = random.Random(SEED + 3)
    src = write_jsonl(tmp_path / "big.jsonl", corpus(24_000, rng))
    args = [src, "--shard-rows", 2048, "--block-rows", 256, "--tokenizer", minilm_dir(), "--max-seq-length", 64]
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "prepare-data", *map(str, args), "--out",
                             str(out)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    state = out / ".prepare-state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and len(json.loads(state.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "prepare-data finished before it could be interrupted: make the corpus larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(json.loads(state.read_text())["shards"])
    assert not (out / MANIFEST).exists() and 2 <= written < 12
    r = prepare(*args, "--out", out)
    assert f"continuing after {written} shards" in r.stderr
    prepare(*args, "--out", tmp_path / "whole")
    a, b = (json.loads((d / MANIFEST).read_text()) for d in (out, tmp_path / "whole"))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]] and a["rows"] == 24_000
    assert not state.exists()


def test_positions_resume_anywhere_and_urls_read_the_same_rows(tmp_path):
    rng = random.Random(SEED + 4)
    n = rng.randrange(300, 900)
    src = write_jsonl(tmp_path / "t.jsonl", corpus(n, rng))
    out = tmp_path / "s"
    prepare(src, "--out", out, "--shard-rows", 96, "--block-rows", 32)
    want = records(out)
    names = sorted(p.name for p in out.glob("shard-*.tar"))
    last = len(names) - 1
    for spec in (f"{out}/shard-{{000000..{last:06d}}}.tar", f"file://{out}/shard-{{000000..{last:06d}}}.tar",
                 f"pipe:cat {out}/shard-{{000000..{last:06d}}}.tar", str(out / MANIFEST)):
        assert records(spec, fmt="wds") == want, spec
    for stop in sorted(rng.sample(range(1, n), 6)):
        cursor = Source(str(out)).records()
        it = iter(cursor)
        for _ in range(stop):
            next(it)
        rest = [(r.row_id, r.fields) for r in Source(str(out)).records(cursor.position)]
        assert rest == [(i, f) for i, f, _ in want[stop:]], (SEED, stop)
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in names:
        fs.pipe(f"/shards/{name}", (out / name).read_bytes())
    fs.pipe("/shards/manifest.json", (out / MANIFEST).read_bytes())
    assert records(f"memory://shards/shard-{{000000..{last:06d}}}.tar", fmt="wds") == want




@pytest.mark.slow
@pytest.mark.parametrize("plane", ["global", "sharded"])
def test_two_processes_two_workers_over_shards_resume_at_one_process(tmp_path, tiny_model, plane):
    """Every row once per epoch, no repeated text in a global batch (duplicates in the data), and
    a mid-epoch checkpoint of the 2-process run resumed by ONE process: on the global plane it
    continues the very batch sequence the planner defines (global batch 16 up to the stop, 8 after
    it); on the sharded plane (each rank reads its blocks) the rest of the epoch, each row once."""
    from dist_embed.data.loader import MixSpec, PlanSpec

    rng = random.Random(SEED + 5)
    n = rng.randrange(180, 260)
    rows = corpus(n, rng, dups=True)
    all_texts = [v for r in rows for v in r.values()]
    assert len(set(all_texts)) < len(all_texts)  # the data repeats texts: de-duplication has work to do
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    shards = tmp_path / "shards"
    prepare(src, "--out", shards, "--shard-rows", 64, "--block-rows", 16, "--tokenizer", minilm_dir(),
            "--max-seq-length", 48)
    cfg = tiny_config(tmp_path, tiny_model, shards, data={"no_duplicates": True, "num_workers": 2, "plane": plane},
                      training={"max_steps": -1, "batch_size": 8}, checkpoint={"steps": 1, "keep_last": 100},
                      model={"dropout": None})
    env = {"DIST_EMBED_LOG_ROW_IDS": "1"}
    straight = tmp_path / "straight"
    r = run_cli("train", cfg, f"output_dir={straight}", "--nproc", 2, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("from its manifest" if plane == "global" else "sharded data plane") in r.stderr
    logs = read_row_log(straight)
    steps = [sorted(logs[0][s]["rows"] + logs[1][s]["rows"]) for s in range(len(logs[0]))]
    assert sorted(i for s in steps for i in s) == list(range(n)), SEED
    for ids in steps:
        texts = [v for i in ids for v in rows[i].values()]
        assert len(texts) == len(set(texts)), SEED
    stop = rng.randrange(1, len(steps) - 1)
    resumed = tmp_path / "resumed"
    r = run_cli("train", cfg, f"output_dir={resumed}", "--resume", straight / "checkpoints" / f"step-{stop}",
                env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    after = [sorted(rec["rows"]) for rec in read_row_log(resumed)[0]]
    if plane == "sharded":
        assert sorted(i for s in steps[:stop] + after for i in s) == list(range(n)), (SEED, stop)
        for ids in after:
            texts = [v for i in ids for v in rows[i].values()]
            assert len(texts) == len(set(texts)), SEED
        return
    # the reference: the planner itself, cut at G=16 for `stop` batches and at G=8 after
    spec = PlanSpec(Source(str(shards)), Schema.for_loss("mnrl"), {}, "raise", 7, 16, True, 64, True, None)
    planner = MixSpec(("train",), (spec,), seed=7).planner(0, sizes=[n])
    ref = [sorted(r.row_id for r in planner.next_batch(16)) for _ in range(stop)]
    while (b := planner.next_batch(8)) is not None:
        ref.append(sorted(r.row_id for r in b))
    assert steps[:stop] == ref[:stop], SEED
    assert after == ref[stop:], (SEED, stop)
    print(f"seed {SEED}: {n} rows, {len(steps)} steps at world 2, stop {stop}, {len(after)} steps at world 1")


def test_bad_shards_are_one_line_errors(tmp_path, tiny_model):
    """A truncated shard (found mid-run: the manifest spares the scan), a missing shard, a loss
    whose columns the shards lack, a broken manifest: exit 2, one line naming the place."""
    from test_bad_input import assert_one_line_exit_2

    src = write_jsonl(tmp_path / "t.jsonl", corpus(200, random.Random(SEED + 6)))
    good = tmp_path / "good"
    prepare(src, "--out", good, "--shard-rows", 64, "--block-rows", 16)

    def copy(name):
        import shutil

        return Path(shutil.copytree(good, tmp_path / name))

    cut = copy("cut")
    data = (cut / "shard-000002.tar").read_bytes()
    (cut / "shard-000002.tar").write_bytes(data[: len(data) // 3])
    cfg = tiny_config(tmp_path, tiny_model, cut, training={"max_steps": -1}, data={"shuffle_buffer": 8})
    assert_one_line_exit_2(run_cli("train", cfg), f"{cut}/shard-000002.tar: ", "truncated")
    missing = copy("missing")
    (missing / "shard-000001.tar").unlink()
    cfg = tiny_config(tmp_path, tiny_model, missing)
    assert_one_line_exit_2(run_cli("train", cfg), f"{missing}/shard-000001.tar: shard not found")
    cfg = tiny_config(tmp_path, tiny_model, good, loss={"name": "cosine"})
    assert_one_line_exit_2(run_cli("train", cfg), f"{good}: missing column 'sentence1'")
    broken = copy("broken")
    (broken / MANIFEST).write_text('{"format": "dist_embed-webdataset", "shards": [')
    cfg = tiny_config(tmp_path, tiny_model, broken)
    assert_one_line_exit_2(run_cli("train", cfg), f"{broken}/manifest.json: not a valid manifest")


def test_shards_are_checked_against_their_manifest_as_they_stream(tmp_path, tiny_model):
    """A shard swapped for another (fewer rows) is refused by its size at open or its sha256; one
    flipped byte inside a text (same size) by its sha256 once read: exit 2, one line naming the
    shard, never a run that silently trains other rows."""
    import shutil

    from test_bad_input import assert_one_line_exit_2

    rng = random.Random(SEED + 7)
    good = tmp_path / "good"
    prepare(write_jsonl(tmp_path / "t.jsonl", corpus(150, rng)), "--out", good, "--shard-rows", 40, "--block-rows", 8)
    other = tmp_path / "other"
    prepare(write_jsonl(tmp_path / "o.jsonl", corpus(30, rng)), "--out", other, "--shard-rows", 40, "--block-rows", 8)
    swapped = Path(shutil.copytree(good, tmp_path / "swapped"))
    shutil.copyfile(other / "shard-000000.tar", swapped / "shard-000001.tar")
    cfg = tiny_config(tmp_path, tiny_model, swapped, training={"max_steps": -1})
    # tar pads to 10 KiB records: the other shard may have the same size, and then its sha256 tells
    assert_one_line_exit_2(run_cli("train", cfg), f"{swapped}/shard-000001.tar: ", "manifest.json",
                           "write the shards again")
    flipped = Path(shutil.copytree(good, tmp_path / "flipped"))
    shard = flipped / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    text = quick_triplets()[rng.randrange(80, 120)]["anchor"].encode()[:12]
    at = data.find(text)
    at = at if at >= 0 else data.find(b'"rows":[[') + 12
    data[at] = data[at] ^ 0x01  # still a valid tar (member contents only), another text
    shard.write_bytes(bytes(data))
    cfg = tiny_config(tmp_path, tiny_model, flipped, training={"max_steps": -1})
    assert_one_line_exit_2(run_cli("train", cfg, f"output_dir={tmp_path / 'f'}"), f"{shard}: its sha256 differs")
