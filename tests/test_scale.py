"""The 557,850-row scale corpus streamed through the global no-duplicates batcher (batch 256); the
data-plane benchmark on a small cut of it."""
import os
import subprocess
import sys

import pytest

from dist_embed.data.loader import PlanSpec
from dist_embed.data.readers import Source
from dist_embed.data.rows import Schema

from conftest import REPO

pytestmark = pytest.mark.slow
TOOL = REPO.parent / "shared" / "tools" / "make_scale_corpus.py"


@pytest.fixture(scope="session")
def scale_corpus(tmp_path_factory):
    if not TOOL.exists():
        pytest.skip("../shared/tools/make_scale_corpus.py is not beside the repository")
    out = tmp_path_factory.mktemp("scale") / "triplets-557k.jsonl.gz"
    subprocess.run([sys.executable, str(TOOL), "--out", str(out)], check=True, capture_output=True)
    return out


def test_scale_corpus_global_batches_have_no_duplicates_and_every_row_once(scale_corpus):
    spec = PlanSpec(Source(str(scale_corpus)), Schema.for_loss("mnrl"), {}, "raise", seed=42, global_batch=256,
                    shuffle=True, shuffle_buffer=10_000, no_duplicates=True, dedup_buffer=None)
    seen = bytearray(557_850)
    batches = short = 0
    for batch in spec.batches(epoch=0):
        texts = [t for row in batch for t in set(row.texts)]
        assert len(texts) == len(set(texts))
        for row in batch:
            assert not seen[row.row_id]
            seen[row.row_id] = 1
        batches += 1
        short += len(batch) < 256
    assert all(seen)
    assert short <= 2  # only the tail: the look-ahead buffer never ran full on this corpus


def test_the_data_plane_benchmark_reports_every_world_beside_the_global_plane(tmp_path):
    """benchmarks/data_plane.py --json (small): one object per format and world with the fields the
    docs' table reads; world 1 plans every row, a rank of a larger world only its share."""
    if not TOOL.exists():
        pytest.skip("../shared/tools/make_scale_corpus.py is not beside the repository")
    import json

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_plane.py"), "--worlds", "1,4", "--rows", "3000",
                        "--formats", "shards,jsonl", "--json"], capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(x["format"], x["world"]) for x in recs] == [("shards", 1), ("shards", 4), ("jsonl", 1), ("jsonl", 4)]
    for x in recs:
        assert x["per_rank_seconds"] > 0 and x["peak_rss_mib"] > 0 and x["global_per_rank_seconds"] > 0
        assert abs(x["aggregate_rows_s"] - x["per_rank_rows_s"] * x["world"]) < 1e-6 * x["aggregate_rows_s"]
        assert x["resume_seconds"] is not None and x["target_seconds"] > 0
        assert x["rows"] == 3000 if x["world"] == 1 else 0 < x["rows"] < 3000
