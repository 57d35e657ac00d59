"""Every bad input and every stop gets a clear answer: exit 2 with one line, never a traceback.

Real processes, real files, real signals. The fuzz test draws damaged files from a seed (printed;
DIST_EMBED_FUZZ_SEED replays one) and checks that every outcome is a trained row, a counted skip or
one line naming the place.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_embed.data.readers import DataError, Source
from dist_embed.data.rows import Schema, scan, validate_rows

from conftest import REPO, QUICK, quick_triplets, run_cli, tiny_config, write_jsonl

QS = REPO / "configs" / "quickstart.yaml"


def last_line(r: subprocess.CompletedProcess) -> str:
    return r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def assert_one_line_exit_2(r, *fragments):
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = last_line(r)
    for f in fragments:
        assert f in line, (f, line)


def truncated_gz(tmp_path: Path, rows: int = 300) -> Path:
    full = write_jsonl(tmp_path / "full.jsonl.gz", quick_triplets(rows))
    data = full.read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    return cut


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_truncated_gzip_is_one_line_in_both_modes(tmp_path, tiny_model, on_error):
    cut = truncated_gz(tmp_path)
    cfg = tiny_config(tmp_path, tiny_model, cut, data={"on_error": on_error})
    r = run_cli("train", cfg)
    assert_one_line_exit_2(r, f"{cut}: truncated or corrupt gzip after line ", "cannot skip it")


@pytest.mark.slow
def test_a_directory_is_read_as_a_set_of_files(tmp_path, tiny_model):
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = quick_triplets(60)
    for i in range(3):
        write_jsonl(shards / f"part-{i:03d}.jsonl", rows[i * 20:(i + 1) * 20])
    (shards / "README.txt").write_text("not data")  # ignored: not a data file suffix
    for fmt in ("auto", "jsonl"):
        cfg = tiny_config(tmp_path, tiny_model, shards, data={"format": fmt},
                          training={"max_steps": -1, "batch_size": 8})
        out = tmp_path / f"run-{fmt}"
        r = run_cli("train", cfg, f"output_dir={out}", env={"DIST_EMBED_LOG_ROW_IDS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert "60 rows checked" in r.stderr
        ids = [i for line in (out / "row_ids" / "rank0.jsonl").read_text().splitlines()
               for i in json.loads(line)["rows"]]
        assert sorted(ids) == list(range(60))
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("train", tiny_config(tmp_path, tiny_model, empty))
    assert_one_line_exit_2(r, f"{empty}: a directory with no data files")


def test_output_dir_that_is_a_file_fails_before_any_work(tmp_path, tiny_model, triplets):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        t0 = time.time()
        r = run_cli("train", tiny_config(tmp_path, tiny_model, triplets), f"output_dir={out}")
        assert_one_line_exit_2(r, f"output_dir {out}: {blocker} is a file, not a directory")
        assert "rows checked" not in r.stderr and time.time() - t0 < 30


def test_max_seq_length_beyond_the_model_is_refused_at_start(tmp_path, tiny_model, triplets):
    # the tiny BERT has 128 position embeddings
    r = run_cli("train", tiny_config(tmp_path, tiny_model, triplets), "model.max_seq_length=1024")
    assert_one_line_exit_2(r, "model.max_seq_length=1024 is more than", "covers 128 tokens" if False else "128 tokens")


@pytest.mark.parametrize("n", ["0", "-1"])
def test_nproc_must_be_positive(tmp_path, tiny_model, triplets, n):
    r = run_cli("train", tiny_config(tmp_path, tiny_model, triplets), "--nproc", n)
    assert_one_line_exit_2(r, f"--nproc must be at least 1 (got {n})")


@pytest.mark.slow
def test_sigterm_to_nproc_gives_one_line_and_a_checkpoint(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "t.jsonl", quick_triplets(1200))
    cfg = tiny_config(tmp_path, tiny_model, data, training={"max_steps": -1, "batch_size": 4})
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(cfg), f"output_dir={out}",
                             "--nproc", "2"], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or '"loss"' not in (out / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"dist-embed: stopped by SIGTERM; checkpoint at {out / 'checkpoints'}/step-")
    assert line.endswith("; resume with --resume latest")


def test_eval_on_bad_model_paths(tmp_path, tiny_model):
    sts = QUICK / "snli-dev-pairs-1k.tsv"
    missing = tmp_path / "nope"
    r = run_cli("eval", missing, "--sts", sts)
    assert_one_line_exit_2(r, f"not a model directory: {missing} (no such file or directory)")
    plain = tmp_path / "plain"
    plain.mkdir()
    r = run_cli("eval", plain, "--sts", sts)
    assert_one_line_exit_2(r, f"not a model directory: {plain} (no config.json)")
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    r = run_cli("eval", broken, "--sts", sts)
    assert_one_line_exit_2(r, f"{weights}: truncated (size {size // 2} bytes, expected {size})")


def test_status_of_a_missing_run(tmp_path):
    r = run_cli("status", tmp_path / "nothing")
    assert_one_line_exit_2(r, f"{tmp_path / 'nothing'}: no such run directory")


@pytest.mark.slow
def test_identical_rows_under_no_duplicates_warn_with_a_count(tmp_path, tiny_model):
    row = quick_triplets(1)[0]
    data = write_jsonl(tmp_path / "same.jsonl", [row] * 12)
    cfg = tiny_config(tmp_path, tiny_model, data, data={"no_duplicates": True},
                      training={"max_steps": -1, "batch_size": 4})
    r = run_cli("train", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rows could not be batched with any other row" in r.stderr
    # every row trained alone: 11 batches closed short because the next row repeats a text, then the tail
    assert "11 global batches closed short of 4 rows" in r.stderr and "11 rows could not be batched" in r.stderr
    # the summary counts the rows really trained, not steps x nominal batch
    assert "rows trained   12 in this run" in r.stderr


def test_help_describes_every_argument():
    from launch.cli import build_parser

    parser = build_parser()
    pending = [parser]
    seen = 0
    while pending:
        p = pending.pop()
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                pending.extend(action.choices.values())
            elif action.dest != "help":
                assert action.help, f"{p.prog}: {action.option_strings or action.dest} has no help text"
                seen += 1
    assert seen > 30


def test_transformers_floor_is_the_major_version_the_tests_run():
    import re
    import tomllib

    import transformers

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.search(r">=([\d.]+)", d).group(1) for d in deps if d.startswith("transformers"))
    assert int(floor.split(".")[0]) == int(transformers.__version__.split(".")[0])


# ---------------------------------------------------------------------------------------------
# fuzzing the readers

FUZZ_SEED = int(os.environ.get("DIST_EMBED_FUZZ_SEED", random.randrange(10**6)))
FUZZ_CASES = 300


def _mutate(rng: random.Random, lines: list[bytes], kind: str) -> bytes:
    """A file's bytes with one kind of damage."""
    i = rng.randrange(len(lines))
    if kind == "random_bytes":
        lines[i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 60))) + b"\n"
    elif kind == "wrong_type":
        obj = json.loads(lines[i])
        obj[rng.choice(list(obj))] = rng.choice([1, 2.5, None, True, [], {}, ["x"]])
        lines[i] = json.dumps(obj).encode() + b"\n"
    elif kind == "huge_line" and lines[i].startswith(b"{"):
        obj = json.loads(lines[i])
        obj["anchor"] = "word " * rng.randint(20_000, 60_000)
        lines[i] = json.dumps(obj).encode() + b"\n"
    elif kind == "huge_line":
        lines[i] = lines[i][:3] + b"word " * rng.randint(20_000, 60_000) + lines[i][3:]
    elif kind == "bom":
        lines[0] = b"\xef\xbb\xbf" + lines[0]
    elif kind == "crlf":
        lines = [l.rstrip(b"\n") + b"\r\n" for l in lines]
    elif kind == "latin1":
        lines[i] = lines[i].replace(b"a", b"\xe9", 1)
    elif kind == "nul":
        lines[i] = lines[i][:5] + b"\x00" + lines[i][5:]
    elif kind == "deep_json":
        lines[i] = b"[" * 100_000 + b"\n"
    elif kind == "cut_line":
        lines[i] = lines[i][: rng.randrange(1, len(lines[i]))] + b"\n"
    elif kind == "blank_lines":
        lines.insert(i, b"\n\n")
    elif kind == "surrogate" and lines[i].startswith(b"{"):  # a JSON escape naming half a UTF-16 pair
        obj = json.loads(lines[i])
        col = rng.choice(list(obj))
        half = rng.choice(["\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\ude00\\ud83d"])
        text = json.dumps(obj[col])[1:-1]
        cut = rng.randrange(len(text) + 1)
        obj[col] = "@@"
        lines[i] = json.dumps(obj).replace("@@", text[:cut] + half + text[cut:]).encode() + b"\n"
    elif kind == "bad_utf8":  # byte sequences UTF-8 forbids: overlong, encoded surrogates, past U+10FFFF, cut
        bad = rng.choice([b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80",
                          b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xff\xfe"])
        at = rng.randrange(1, max(2, len(lines[i]) - 1))
        lines[i] = lines[i][:at] + bad + lines[i][at:]
    data = b"".join(lines)
    if kind == "truncate":
        data = data[: rng.randrange(1, len(data))]
    return data


KINDS = ["random_bytes", "wrong_type", "huge_line", "bom", "crlf", "latin1", "nul", "deep_json", "cut_line",
         "blank_lines", "truncate", "surrogate", "bad_utf8"]


def _fuzz_file(tmp: Path, rng: random.Random, case: int) -> tuple[Path, str]:
    fmt = rng.choice(["jsonl", "jsonl.gz", "csv", "tsv"])
    rows = [{k: v for k, v in r.items() if k in ("anchor", "positive")} for r in
            rng.sample(quick_triplets(500), rng.randint(1, 40))]
    kind = rng.choice(KINDS)
    if fmt.startswith("jsonl"):
        lines = [json.dumps(r).encode() + b"\n" for r in rows]
    else:
        import csv
        import io

        sep = "," if fmt == "csv" else "\t"
        buf = io.StringIO()
        w = csv.writer(buf, delimiter=sep, lineterminator="\n", quoting=csv.QUOTE_MINIMAL if sep == "," else
                       csv.QUOTE_NONE, escapechar=None if sep == "," else "\\")
        w.writerow(["anchor", "positive"])
        for r in rows:
            w.writerow([r["anchor"], r["positive"]])
        lines = [l.encode() + b"\n" for l in buf.getvalue().splitlines()]
        if kind in ("wrong_type", "deep_json", "surrogate"):
            kind = rng.choice(["random_bytes", "bad_utf8"])
    data = _mutate(rng, lines, kind)
    path = tmp / f"case{case}.{fmt}"
    path.write_bytes(gzip.compress(data, mtime=0) if fmt.endswith(".gz") and kind != "truncate" else
                     (gzip.compress(b"".join(lines), mtime=0)[: rng.randrange(10, 60)] if fmt.endswith(".gz") else data))
    return path, kind


def test_fuzzed_files_give_rows_counted_skips_or_one_line(tmp_path):
    """Every outcome is a row, a counted skip, or a DataError naming the file (never another
    exception); with on_error=skip, valid rows + skipped records = records read."""
    rng = random.Random(FUZZ_SEED)
    found = {}
    for case in range(FUZZ_CASES):
        path, kind = _fuzz_file(tmp_path, rng, case)
        note = f"seed {FUZZ_SEED} case {case} ({kind}, {path.name})"
        for on_error in ("raise", "skip"):
            try:
                res = scan(Source(str(path)), Schema.for_loss("mnrl"), {}, on_error, max_skip_fraction=1.0)
            except DataError as e:
                msg = str(e)
                assert msg.startswith(str(path)) and "\n" not in msg, (msg, note)
                found.setdefault(f"{kind}/{on_error}", msg.split(": ", 1)[1][:60])
                continue
            except Exception as e:  # anything else is a bug: a traceback for the user
                raise AssertionError(f"{type(e).__name__}: {e} ({note})") from e
            assert res.rows + res.skips.total == res.records, note
            if on_error == "raise":
                assert res.skips.total == 0, note
            for row in validate_rows(Source(str(path)).records(), Schema.for_loss("mnrl"), {}, "skip"):
                for text in row.texts:
                    text.encode("utf-8")  # every text that passes is Unicode (no lone surrogate)
    print(f"fuzz seed {FUZZ_SEED}: {FUZZ_CASES} files x 2 modes; outcomes: {json.dumps(found, indent=1)}")


@pytest.mark.slow
def test_fuzzed_files_end_to_end(tmp_path, tiny_model):
    """A few fuzzed files through `dist-embed train`: exit 0 or 2, never a traceback."""
    rng = random.Random(FUZZ_SEED + 1)
    for case in range(4):
        path, kind = _fuzz_file(tmp_path, rng, case)
        cfg = tiny_config(tmp_path, tiny_model, path, data={"on_error": rng.choice(["raise", "skip"]),
                          "max_skip_fraction": 0.5}, training={"max_steps": 1, "batch_size": 4})
        r = run_cli("train", cfg, f"output_dir={tmp_path / f'run{case}'}")
        note = f"seed {FUZZ_SEED + 1} case {case} ({kind}): {r.stderr[-2000:]}"
        assert r.returncode in (0, 2) and "Traceback" not in r.stderr, note
        if r.returncode == 2:
            assert str(path) in last_line(r), note


# ---------------------------------------------------------------------------------------------
# invalid Unicode, config values and the commands' other inputs


def test_a_lone_surrogate_is_bad_input_in_train_prepare_and_mine(tmp_path, tiny_model):
    good = quick_triplets(40)
    lines = [json.dumps(r) for r in good]
    lines[7] = '{"anchor": "bad \\ud800 x", "positive": "p", "negative": "n"}'
    data = tmp_path / "s.jsonl"
    data.write_text("\n".join(lines) + "\n")
    where = f"{data}:8: column 'anchor': invalid Unicode (a lone UTF-16 surrogate"
    r = run_cli("train", tiny_config(tmp_path, tiny_model, data))
    assert_one_line_exit_2(r, where)
    cfg = tiny_config(tmp_path, tiny_model, data, data={"on_error": "skip", "max_skip_fraction": 0.1},
                      training={"max_steps": 1})
    r = run_cli("train", cfg, f"output_dir={tmp_path / 'skip'}")
    assert r.returncode == 0 and "1 rows skipped: 1 column 'anchor': invalid Unicode" in r.stderr, r.stderr[-3000:]
    out = tmp_path / "shards"
    r = run_cli("prepare-data", data, "--out", out)
    assert_one_line_exit_2(r, where)
    assert not list(out.glob("*.partial")) and not list(out.glob("*.tar"))
    r = run_cli("prepare-data", data, "--out", tmp_path / "shards2", "--on-error", "skip")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "shards2" / "manifest.json").read_text())["rows"] == 39
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"anchor": "a", "positive": "p"}\n{"anchor": "b \\udfff", "positive": "q"}\n')
    r = run_cli("mine", pairs, "--model", tiny_model, "--out", tmp_path / "mined.jsonl")
    assert_one_line_exit_2(r, f"{pairs}:2: column 'anchor': invalid Unicode")


@pytest.mark.parametrize("override,fragment", [
    ("training.max_steps=0", "command line: training.max_steps: Value error, must be a positive number"),
    ("training.max_steps=-5", "command line: training.max_steps: Value error, must be a positive number"),
    ("training.lr=inf", "command line: training.lr: Input should be a finite number"),
    ("loss.scale=inf", "command line: loss.scale: Input should be a finite number"),
    ("foo.bar=1", "command line: foo: unknown key"),
    ("training.batch_sise=3", "command line: training.batch_sise: unknown key"),
])
def test_bad_values_are_refused_and_named_where_they_were_given(tmp_path, tiny_model, triplets, override, fragment):
    r = run_cli("train", tiny_config(tmp_path, tiny_model, triplets), override)
    assert_one_line_exit_2(r, fragment)


def test_status_and_report_read_past_a_torn_metrics_file(tmp_path, tiny_model, triplets):
    out = tmp_path / "run"
    assert run_cli("train", tiny_config(tmp_path, tiny_model, triplets), f"output_dir={out}").returncode == 0
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_bytes(("\n".join(lines[:3] + ["garbage {", '"a string"', '{"step": [1], "loss": "x"}'] + lines[3:])
                         + '\n{"step": 7, "lo').encode() + b"\xff\xfe")
    for cmd in ("status", "report"):
        r = run_cli(cmd, out)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "unreadable line(s) of metrics.jsonl skipped (first: " in r.stdout and "steps        6" in r.stdout
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for cmd in ("status", "report"):
        r = run_cli(cmd, not_a_dir)
        assert_one_line_exit_2(r, str(not_a_dir))


@pytest.mark.parametrize("args,fragment", [
    (["--range-min", "5", "--range-max", "2"], "--range-min 5 --range-max 2: the candidates ranked"),
    (["--range-min", "-1"], "--range-min -1 --range-max 100"),
    (["--max-score", "nan"], "--max-score must be a finite number"),
    (["--num-negatives", "0"], "--num-negatives must be at least 1"),
])
def test_mine_refuses_impossible_options(tmp_path, tiny_model, args, fragment):
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"anchor": "a", "positive": "b"}])
    r = run_cli("mine", pairs, "--model", tiny_model, "--out", tmp_path / "m.jsonl", *args)
    assert_one_line_exit_2(r, fragment)
