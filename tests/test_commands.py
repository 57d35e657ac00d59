"""Every command's options as a user gives them: a bad value, a model that cannot be loaded or an
output that would overwrite an input is one line and exit 2, before any work. Most cases run the
command line's own ``main`` in this process (the checks come before anything heavy)."""
import hashlib

import pytest

from launch.cli import main

from conftest import QUICK, quick_triplets, run_cli, tiny_config, write_jsonl
from test_bad_input import assert_one_line_exit_2

STS = QUICK / "snli-dev-pairs-1k.tsv"
HUB_TYPO = "sentence-transformers/all-MiniLM-L66-v2"  # not cached here, and the tests run offline


def one_line(capsys, code: int, *fragments) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    for f in fragments:
        assert f in line, (f, line)
    return line


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_eval_refuses_a_batch_size_below_one_and_a_hub_id_it_cannot_load(capsys, tiny_model):
    for size in ("0", "-3"):
        one_line(capsys, main(["eval", str(tiny_model), "--sts", str(STS), "--batch-size", size]),
                 f"--batch-size must be at least 1 (got {size})")
    one_line(capsys, main(["eval", HUB_TYPO, "--sts", str(STS)]), f"{HUB_TYPO}: cannot be loaded",
             "neither cached here nor downloadable")
    for spec in ("dev=", "=" + str(STS)):  # an empty path would read the working directory as data
        one_line(capsys, main(["eval", str(tiny_model), "--sts", spec]), f"--sts {spec!r}: expected [NAME=]PATH")


def test_prepare_data_never_writes_among_its_sources(capsys, tmp_path):
    """Shards written into a source's directory would make it read as a shard set from then on."""
    src = tmp_path / "data"
    src.mkdir()
    rows = write_jsonl(src / "t.jsonl", quick_triplets(20))
    for sources, out in (([src], src / "shards"), ([rows], src), ([rows], rows), ([src], tmp_path)):
        one_line(capsys, main(["prepare-data", *map(str, sources), "--out", str(out)]), f"--out {out}: it ",
                 "write the shards to a directory of their own")
    assert sorted(p.name for p in src.iterdir()) == ["t.jsonl"]


def test_train_resume_from_a_missing_directory_is_one_line(capsys, tmp_path, tiny_model, triplets):
    cfg = tiny_config(tmp_path, tiny_model, triplets)
    one_line(capsys, main(["train", str(cfg), "--resume", str(tmp_path / "nowhere")]), "no such checkpoint directory")


@pytest.mark.parametrize("flags,fragment", [
    (["--resume-or-start-fresh"], "--resume-or-start-fresh qualifies --resume latest"),
    (["--resume", "x", "--resume-or-start-fresh"], "--resume-or-start-fresh qualifies --resume latest"),
    (["--allow-data-change"], "--allow-data-change qualifies --resume"),
    (["--allow-data-change", "--nproc", "2"], "--allow-data-change qualifies --resume"),
])
def test_train_refuses_a_flag_without_the_one_it_qualifies(capsys, tmp_path, tiny_model, triplets, flags, fragment):
    cfg = tiny_config(tmp_path, tiny_model, triplets)
    one_line(capsys, main(["train", str(cfg), *flags]), fragment)
    assert not (tmp_path / "run").exists()


def test_mine_never_writes_over_an_input_or_an_existing_file(capsys, tmp_path, tiny_model):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": r["anchor"], "positive": r["positive"]}
                                                   for r in quick_triplets(30)])
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": r["negative"]} for r in quick_triplets(30)])
    before = digest(pairs)
    base = ["mine", str(pairs), "--model", str(tiny_model), "--corpus", str(corpus), "--num-negatives", "1"]
    for out, what in ((pairs, "it is the data"), (corpus, "it is --corpus"), (tiny_model / "m.jsonl", "--model"),
                      (tmp_path, "the data")):
        one_line(capsys, main(base + ["--out", str(out)]), f"--out {out}: ", what)
    (tmp_path / "sub").mkdir()
    one_line(capsys, main(base + ["--out", str(tmp_path / "sub")]), "a directory; --format jsonl writes a file")
    assert digest(pairs) == before
    for bad in ("0", "-4"):  # 0 silently meant the model's own length
        one_line(capsys, main(base + ["--out", str(tmp_path / "m.jsonl"), "--max-seq-length", bad]),
                 f"--max-seq-length must be at least 1 (got {bad})")
    # an earlier output: kept unless --overwrite
    out = tmp_path / "mined.jsonl"
    out.write_text("earlier\n")
    one_line(capsys, main(base + ["--out", str(out)]), "already exists", "--overwrite")
    assert out.read_text() == "earlier\n"
    assert main(base + ["--out", str(out), "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 30 and digest(pairs) == before


@pytest.mark.slow
def test_train_with_a_hub_id_it_cannot_load_is_one_line(tmp_path, tiny_model, triplets):
    r = run_cli("train", tiny_config(tmp_path, tiny_model, triplets), f"model.name_or_path={HUB_TYPO}")
    assert_one_line_exit_2(r, f"model.name_or_path: {HUB_TYPO}: cannot be loaded")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_mining_stopped_by_ctrl_c_exits_75_and_a_rerun_continues(tmp_path, tiny_model, nproc):
    """Ctrl-C (SIGINT to the terminal's process group) alone or under --nproc: mining ends after
    whole blocks with one line and exit 75, as training does; the same command again finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": r["anchor"], "positive": r["positive"]}
                                                   for r in quick_triplets(600)])
    out = tmp_path / "mined.jsonl"
    args = ["mine", str(pairs), "--model", str(tiny_model), "--out", str(out), "--block-size", "8",
            "--nproc", str(nproc)]
    err = tmp_path / "err.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=f, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while "mining 600 anchors" not in err.read_text() and time.time() < deadline:
            assert proc.poll() is None, err.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 75, err.read_text()[-3000:]
    text = err.read_text()
    assert "Traceback" not in text and "mining stopped by SIG" in text and "run the same command again" in text, text
    assert not out.exists()
    if nproc == 2:  # the same command again (here alone: blocks do not depend on the world size) finishes
        r = run_cli("mine", *args[1:-2])
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(out.read_text().splitlines()) == 600
