"""Several datasets in one run, planner level: samplers' shares, epoch semantics, exact resume.

Sizes, batch sizes and stop points are drawn from a printed seed (DIST_EMBED_FUZZ_SEED replays)."""
import json
import os
import random
from collections import Counter

import pytest

from dist_embed.data.loader import MixSpec, PlanSpec, json_without_ids
from dist_embed.data.readers import Source
from dist_embed.data.rows import Schema

from conftest import write_jsonl

SEED = int(os.environ.get("DIST_EMBED_FUZZ_SEED", random.randrange(1 << 30)))


def make_sets(tmp_path, sizes, dup_every=0):
    """Datasets of triplets, pairs and scored pairs; texts unique unless ``dup_every``."""
    paths, losses = [], ["mnrl", "mnrl", "cosine"]
    for d, n in enumerate(sizes):
        rows = []
        for i in range(n):
            j = i // dup_every if dup_every else i
            if d == 0:
                rows.append({"anchor": f"a{d}-{j}", "positive": f"p{d}-{i}", "negative": f"n{d}-{i}"})
            elif d == 1:
                rows.append({"anchor": f"q{d}-{j}", "positive": f"d{d}-{i}"})
            else:
                rows.append({"sentence1": f"s{d}-{j}", "sentence2": f"t{d}-{i}", "score": (i % 5) / 4})
        paths.append(write_jsonl(tmp_path / f"set{d}.jsonl", rows))
    return paths, losses[:len(sizes)]


def mix(paths, losses, sampler, G, *, temperature=1.0, weights=None, no_dup=False, seed=3):
    specs = tuple(PlanSpec(Source(str(p)), Schema.for_loss(l), {}, "raise", seed, G, True, 32, no_dup, None)
                  for p, l in zip(paths, losses))
    return MixSpec(tuple(f"d{i}" for i in range(len(paths))), specs, sampler, temperature,
                   tuple(weights) if weights else None, seed)


def walk(planner, G, limit=None):
    out = []
    while (limit is None or len(out) < limit) and (b := planner.next_batch(G)) is not None:
        out.append((planner.last_dataset, [r.row_id for r in b]))
    return out


@pytest.mark.parametrize("sampler", ["proportional", "round_robin", "temperature", "weighted"])
def test_sampler_shares_and_epoch_semantics(tmp_path, sampler):
    rng = random.Random(SEED + hash(sampler) % 1000)
    sizes = [rng.randrange(300, 900), rng.randrange(100, 400), rng.randrange(50, 300)]
    G = rng.choice([4, 8, 12])
    weights = [rng.uniform(0.5, 3) for _ in sizes] if sampler == "weighted" else None
    T = rng.choice([0.5, 2.0, 5.0])
    note = f"seed {SEED}: sizes {sizes} G {G} weights {weights} T {T}"
    paths, losses = make_sets(tmp_path, sizes)
    spec = mix(paths, losses, sampler, G, temperature=T, weights=weights)
    planner = spec.planner(0, sizes=sizes)
    batches = walk(planner, G)
    assert planner.complete, note
    per_rows = Counter()
    for d, ids in batches:
        per_rows[d] += len(ids)
    n_batches = Counter(d for d, _ in batches)
    if sampler == "proportional":  # every row of every dataset exactly once
        for d, n in enumerate(sizes):
            ids = [i for dd, b in batches if dd == d for i in b]
            assert sorted(ids) == list(range(n)), note
    elif sampler == "round_robin":  # turns; the epoch ends when the dataset in turn has run out
        assert [d for d, _ in batches] == [i % 3 for i in range(len(batches))], note
        k = min(-(-n // G) for n in sizes)
        assert min(n_batches.values()) == k and len(batches) in range(3 * k - 2, 3 * k + 3), note
        assert spec.epoch_rows(sizes, G) == sum(per_rows.values()), note
    else:  # fixed probabilities; the epoch is sum(sizes) rows; datasets that run out start a new pass
        assert sum(per_rows.values()) == sum(sizes), note
        expected = spec.shares(sizes)
        total = len(batches)
        for d, p in enumerate(expected):
            share = n_batches[d] / total  # each draw is one batch
            tol = 4 * (p * (1 - p) / total) ** 0.5 + 1 / total  # 4 sigma of a binomial share
            assert abs(share - p) <= tol, (d, share, p, tol, note)
        # within a pass a dataset repeats no row
        for d in range(3):
            ids = [i for dd, b in batches if dd == d for i in b]
            for start in range(0, len(ids), sizes[d]):
                part = ids[start:start + sizes[d]]
                assert len(set(part)) == len(part), note
    print(note, dict(n_batches))


@pytest.mark.parametrize("sampler", ["proportional", "round_robin", "temperature", "weighted"])
def test_mix_resume_is_exact_at_any_stop_and_batch_size(tmp_path, sampler):
    """Stop after a random batch, save the state through JSON, continue with another global
    batch size: the datasets drawn and the rows are those of an uninterrupted walk that switches
    batch size at the same point."""
    rng = random.Random(SEED * 7 + len(sampler))
    sizes = [rng.randrange(80, 300) for _ in range(3)]
    G1, G2 = rng.choice([6, 8, 16]), rng.choice([3, 4, 8])
    no_dup = rng.random() < 0.5
    paths, losses = make_sets(tmp_path, sizes, dup_every=rng.choice([0, 3]))
    weights = [1, 2, 3] if sampler == "weighted" else None
    spec = mix(paths, losses, sampler, G1, weights=weights, no_dup=no_dup, temperature=2.0)
    total = len(walk(spec.planner(0, sizes=sizes), G1))
    stop = rng.randrange(1, total)
    note = f"seed {SEED}: sizes {sizes} G {G1}->{G2} stop {stop}/{total} no_dup {no_dup}"
    a = spec.planner(0, sizes=sizes)
    first = walk(a, G1, stop)
    state = json.loads(json.dumps(a.state_dict(), default=json_without_ids))
    reference = first + walk(a, G2)
    b = spec.planner(0, state, sizes=sizes)
    resumed = first + walk(b, G2)
    assert resumed == reference, note
    if no_dup:
        for d, ids in reference:
            texts = [t for i in ids for t in _texts(paths[d], i)]
            assert len(texts) == len(set(texts)), note


_cache: dict = {}


def _texts(path, row_id):
    if path not in _cache:
        _cache[path] = [[v for k, v in json.loads(l).items() if k != "score"] for l in open(path)]
    return _cache[path][row_id]


def test_one_dataset_mix_is_the_plain_planner(tmp_path):
    paths, losses = make_sets(tmp_path, [157])
    spec = mix(paths, losses, "proportional", 8, no_dup=True)
    plain = [[r.row_id for r in b] for b in spec.specs[0].batches(0, 8)]
    assert [[r.row_id for r in b] for _, b in spec.batches(0, 8, sizes=[157])] == plain


@pytest.mark.parametrize("sampler", ["round_robin", "weighted"])
def test_streams_of_unknown_length_mix_and_resume(tmp_path, sampler):
    """Hub streams have no size: round robin still ends the epoch when the stream in turn runs out
    (found by reading, not counting); weighted draws forever (a max_steps run) and resumes exactly."""
    rng = random.Random(SEED + 11 + len(sampler))
    sizes = [rng.randrange(40, 120) for _ in range(3)]
    paths, losses = make_sets(tmp_path, sizes)
    spec = mix(paths, losses, sampler, 8, weights=[1, 1, 2] if sampler == "weighted" else None)
    unknown = [None, sizes[1], None]
    limit = None if sampler == "round_robin" else 60
    whole = walk(spec.planner(0, sizes=unknown), 8, limit)
    if sampler == "round_robin":
        k = min(-(-n // 8) for n in sizes)
        assert min(Counter(d for d, _ in whole).values()) == k, (SEED, sizes)
    stop = rng.randrange(1, len(whole) - 1)
    a = spec.planner(0, sizes=unknown)
    first = walk(a, 8, stop)
    state = json.loads(json.dumps(a.state_dict(), default=json_without_ids))
    rest = walk(spec.planner(0, state, sizes=unknown), 8, None if limit is None else limit - stop)
    assert first + rest == whole, (SEED, sizes, stop)
