"""Sharded safetensors: what ZeRO-3's per-module save streams into, read back by us and by
sentence-transformers (transformers' shard + index layout)."""
import json
import random

import numpy as np
import pytest
import torch

from dist_embed.model.encoder import Encoder
from dist_embed.config.schema import parse_size
from dist_embed.model.weights import weight_files

TEXTS = ["A man is playing a guitar.", "Two dogs run through the snow.", "A woman slices an onion."]


def test_shards_hold_every_weight_once_and_load_in_sentence_transformers(tmp_path, tiny_model):
    from sentence_transformers import SentenceTransformer

    seed = random.randrange(10**6)
    print(f"seed {seed}")
    rng = random.Random(seed)
    enc = Encoder.from_pretrained(str(tiny_model))
    state = enc.state_for_saving()
    limit = rng.randrange(2_000, 60_000)  # bytes: most tensors share shards, the embeddings get their own
    parts = list(state.items())
    rng.shuffle(parts)
    cut = sorted(rng.sample(range(1, len(parts)), 3))
    pieces = [dict(parts[a:b]) for a, b in zip([0] + cut, cut + [len(parts)])]  # as a gather yields them
    sharded = tmp_path / "sharded"
    enc.save(sharded, pieces, max_shard_size=limit)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = weight_files(sharded)
    assert not (sharded / "model.safetensors").exists() and len(files) > 2
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    from safetensors import safe_open

    for f in files:  # a shard over the limit holds one tensor that alone is over it
        with safe_open(str(f), "pt") as h:
            keys = list(h.keys())
        assert f.stat().st_size <= limit + 4096 or len(keys) == 1, (f.name, keys)
    back = Encoder.saved_weights(sharded)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    single = tmp_path / "single"
    enc.save(single)
    assert [p.name for p in weight_files(single)] == ["model.safetensors"]
    a = SentenceTransformer(str(single), device="cpu").encode(TEXTS)
    b = SentenceTransformer(str(sharded), device="cpu").encode(TEXTS)
    assert np.abs(a - b).max() < 1e-6
    # saved again into the same directory as one file: no stale shard or index is left to mislead a loader
    enc.save(sharded)
    assert [p.name for p in sorted(sharded.glob("model*"))] == ["model.safetensors"]


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1.5 kb", 1500), (123, 123)])
def test_shard_sizes_read_as_transformers_writes_them(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["0GB", "five", "-3MB", "12 parsecs"])
def test_a_bad_shard_size_is_refused_at_load(tmp_path, bad):
    from dist_embed.config import ConfigError, load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: x\nmodel: {name_or_path: m}\ndata: {train: t.jsonl}\n"
                   f"checkpoint: {{max_shard_size: '{bad}'}}\n")
    with pytest.raises(ConfigError, match="max_shard_size"):
        load_config(str(cfg), [])
