"""The 557,850-row scale corpus streamed through the global no-duplicates batcher (batch 256)."""
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
