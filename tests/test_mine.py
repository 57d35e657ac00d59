"""dist-embed mine: the filters pinned against a brute-force reference, the same bytes at 1 and 2
processes (random block and batch sizes), resume after SIGKILL, output that trains, bad input."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dist_embed.tools.mine import MineOptions, choose_negatives

from conftest import REPO, quick_triplets, run_cli, tiny_config, write_jsonl

pytestmark = pytest.mark.slow


def reference(scores, idx, texts, pos_score, exclude, opt):
    """The filters written out the slow, obvious way."""
    ranked = [(s, texts[i]) for s, i in zip(scores, idx) if texts[i] not in exclude]
    window = ranked[opt.range_min:opt.range_max]
    keep = [t for s, t in window
            if (opt.max_score is None or s <= opt.max_score) and (opt.min_score is None or s >= opt.min_score)
            and (opt.absolute_margin is None or s <= pos_score - opt.absolute_margin)
            and (opt.relative_margin is None or s <= pos_score * (1 - opt.relative_margin))]
    return keep[:opt.num_negatives]


def test_filters_equal_a_brute_force_reference():
    seed = random.SystemRandom().randrange(10**6)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(300):
        n = rng.randrange(1, 40)
        texts = [f"t{rng.randrange(30)}" for _ in range(n)]
        scores = np.sort(np.array([rng.uniform(-1, 1) for _ in range(n)], dtype=np.float32))[::-1]
        idx = np.array(rng.sample(range(n), n))
        opt = MineOptions(num_negatives=rng.randrange(1, 6), range_min=rng.randrange(0, 5), range_max=rng.randrange(1, 40),
                          max_score=rng.choice([None, rng.uniform(0, 1)]), min_score=rng.choice([None, rng.uniform(-1, 0)]),
                          absolute_margin=rng.choice([None, rng.uniform(0, 0.3)]),
                          relative_margin=rng.choice([None, rng.uniform(0, 0.2)]))
        exclude = set(rng.sample(texts, min(len(texts), rng.randrange(0, 3))))
        pos = rng.uniform(0, 1)
        assert choose_negatives(scores, idx, texts, pos, exclude, opt) == \
            reference(scores.tolist(), idx.tolist(), texts, pos, exclude, opt)


def mine_args(data, out, model, *extra):
    return ["mine", str(data), "--model", str(model), "--out", str(out), *map(str, extra)]


def test_same_bytes_at_one_and_two_processes_and_the_output_trains(tmp_path, minilm, tiny_model):
    seed = random.SystemRandom().randrange(10**6)
    print("seed", seed)
    rng = random.Random(seed)
    rows = quick_triplets(300)
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"q": r["anchor"], "a": r["positive"]} for r in rows])
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": r["negative"]} for r in rows[:200]])
    block, batch = rng.randrange(7, 120), rng.randrange(3, 40)
    print("block", block, "batch", batch)
    common = ["--corpus", corpus, "--columns", "anchor=q", "--columns", "positive=a", "--num-negatives", 2,
              "--range-min", 1, "--relative-margin", 0.05, "--block-size", block, "--batch-size", batch]
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"mined{nproc}.jsonl"
        r = run_cli(*mine_args(data, outs[nproc], minilm, *common, "--nproc", nproc))
        assert r.returncode == 0, r.stderr[-3000:]
    assert outs[1].read_bytes() == outs[2].read_bytes()
    mined = [json.loads(line) for line in outs[1].read_text().splitlines()]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["rows_written"] == len(mined) and summary["rows_written"] + summary[
        "anchors_without_enough_negatives"] == 300  # nothing silently lost
    by_anchor = {}
    for r0 in rows:
        by_anchor.setdefault(r0["anchor"], set()).add(r0["positive"])
    for m in mined:
        assert set(m) == {"anchor", "positive", "negative_1", "negative_2"}
        assert not ({m["negative_1"], m["negative_2"]} & (by_anchor[m["anchor"]] | {m["anchor"]}))
    # the mined file trains (anchor, positive, negative_1, negative_2 -> MNRL with 2 negatives)
    r = run_cli("train", tiny_config(tmp_path, tiny_model, outs[1], training={"max_steps": 2}))
    assert r.returncode == 0, r.stderr[-3000:]


def test_resume_after_sigkill_gives_the_uninterrupted_bytes(tmp_path, minilm):
    rows = quick_triplets(1200)
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": r["anchor"], "positive": r["positive"]} for r in rows])
    args = ["--block-size", 100, "--num-negatives", 1]
    straight = tmp_path / "straight.jsonl"
    assert run_cli(*mine_args(data, straight, minilm, *args)).returncode == 0
    out = tmp_path / "killed.jsonl"
    parts = tmp_path / ".killed.jsonl.parts"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *mine_args(data, out, minilm, *args, "--nproc", 2)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("block-*.jsonl"))) < 3:
        time.sleep(0.2)
    done = len(list(parts.glob("block-*.jsonl")))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= done < 12 and not out.exists(), done
    r = run_cli(*mine_args(data, out, minilm, *args, "--nproc", 2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "blocks already mined" in r.stderr
    assert out.read_bytes() == straight.read_bytes() and not parts.exists()


@pytest.mark.parametrize("case", ["column", "file", "model"])
def test_bad_input_is_one_line(tmp_path, minilm, case):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": "a b", "answer": "c d"}, {"anchor": "e", "answer": "f"}])
    args = {"column": mine_args(data, tmp_path / "o.jsonl", minilm),
            "file": mine_args(tmp_path / "missing.jsonl", tmp_path / "o.jsonl", minilm),
            "model": mine_args(data, tmp_path / "o.jsonl", tmp_path / "no-model", "--columns", "positive=answer")}[case]
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    print(line)
    assert {"column": "missing column 'positive'", "file": "missing.jsonl", "model": "no-model"}[case] in line
