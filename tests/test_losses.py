"""Loss maths pinned against hand computations and against sentence-transformers' own losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from dist_embed.engine import losses


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_mnrl_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    n = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    s = 20.0
    r = 1 / math.sqrt(2)
    # row 0: cos with candidates [p0, p1, n0, n1] = [r, 0, -1, 1]; label 0
    # row 1: [r, 1, 0, 0]; label 1
    rows = [([r, 0, -1, 1], 0), ([r, 1, 0, 0], 1)]
    expected = sum(-(s * c[lab]) + math.log(sum(math.exp(s * x) for x in c)) for c, lab in rows) / 2
    got = losses.mnrl(a, p, [n], scale=s, label_offset=0, global_count=2)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_mnrl_sums_over_ranks_to_the_global_mean():
    a, p, n = rand(6, 5, seed=1), rand(6, 5, seed=2), rand(6, 5, seed=3)
    full = losses.mnrl(a, p, [n], scale=20, label_offset=0, global_count=6)
    parts = sum(losses.mnrl(a[i:i + 3], p, [n], scale=20, label_offset=i, global_count=6) for i in (0, 3))
    assert parts.item() == pytest.approx(full.item(), rel=1e-12)


@pytest.fixture(scope="module")
def st_model(tiny_model):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_model), device="cpu")


def test_mnrl_equals_sentence_transformers(st_model):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    a, p, n, n2 = (rand(8, 16, seed=s).float() for s in range(4))
    ref = MultipleNegativesRankingLoss(st_model, scale=20.0).compute_loss_from_embeddings([a, p, n, n2], None)
    ours = losses.mnrl(a, p, [n, n2], scale=20.0, label_offset=0, global_count=8)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


def test_cosine_loss_equals_sentence_transformers(st_model):
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    a, b = rand(8, 16, seed=5).float(), rand(8, 16, seed=6).float()
    y = torch.rand(8, generator=torch.Generator().manual_seed(0))
    ref = CosineSimilarityLoss(st_model).compute_loss_from_embeddings([a, b], y)
    ours = losses.cosine_similarity_loss(a, b, y, global_count=8)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    by_hand = ((F.cosine_similarity(a, b) - y) ** 2).mean()
    assert ours.item() == pytest.approx(by_hand.item(), rel=1e-6)


@pytest.mark.parametrize("distance", ["euclidean", "manhattan", "cosine"])
def test_triplet_loss_equals_sentence_transformers(st_model, distance):
    from sentence_transformers.sentence_transformer.losses import TripletDistanceMetric, TripletLoss

    a, p, n = (rand(8, 16, seed=s).float() for s in (7, 8, 9))
    metric = {"euclidean": TripletDistanceMetric.EUCLIDEAN, "manhattan": TripletDistanceMetric.MANHATTAN,
              "cosine": TripletDistanceMetric.COSINE}[distance]
    margin = 5.0 if distance != "cosine" else 0.5
    ref = TripletLoss(st_model, distance_metric=metric, triplet_margin=margin).compute_loss_from_embeddings([a, p, n], None)
    ours = losses.triplet_loss(a, p, n, margin=margin, distance=distance, global_count=8)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_triplet_by_hand():
    a, p, n = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]])
    # d(a,p)=5, d(a,n)=10 -> max(5 - 10 + 5, 0) = 0; margin 7 -> 2
    assert losses.triplet_loss(a, p, n, margin=5.0, global_count=1).item() == pytest.approx(0.0)
    assert losses.triplet_loss(a, p, n, margin=7.0, global_count=1).item() == pytest.approx(2.0)


@pytest.mark.parametrize("loss_name", ["mnrl", "cached_mnrl", "cosine", "triplet"])
def test_matryoshka_equals_sentence_transformers(tiny_model, loss_name):
    """The same batch through sentence-transformers' MatryoshkaLoss(inner loss) and through our step
    with loss.matryoshka_dims: the same loss and the same gradients (dropout 0: two libraries'
    forwards draw different masks)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses as st_losses

    from conftest import quick_triplets
    from dist_embed.data.rows import Row
    from conftest import step_parts
    from test_speedups import loss_and_grads

    dims, weights = (32, 16, 8), (1.0, 0.5, 0.25)
    trip = quick_triplets(12)
    if loss_name == "cosine":
        cols = [[r["anchor"] for r in trip], [r["positive"] for r in trip]]
        scores = [(i % 5) / 4 for i in range(len(trip))]
    else:
        cols = [[r["anchor"] for r in trip], [r["positive"] for r in trip], [r["negative"] for r in trip]]
        scores = None
    rows = [Row(i, tuple(c[i] for c in cols), scores[i] if scores else None) for i in range(len(trip))]
    ours, ours_grads = loss_and_grads(tiny_model, step_parts(loss_name, mini_batch_size=5,
                                                           matryoshka=tuple(zip(dims, weights))), rows)

    st = SentenceTransformer(str(tiny_model), device="cpu")
    st.eval()
    inner = {"mnrl": lambda: st_losses.MultipleNegativesRankingLoss(st),
             "cached_mnrl": lambda: st_losses.MultipleNegativesRankingLoss(st),
             "cosine": lambda: st_losses.CosineSimilarityLoss(st),
             "triplet": lambda: st_losses.TripletLoss(st, triplet_margin=5.0)}[loss_name]()
    loss_fn = st_losses.MatryoshkaLoss(st, inner, list(dims), list(weights))
    features = [st.tokenize(c) for c in cols]
    labels = torch.tensor(scores, dtype=torch.float32) if scores else None
    ref = loss_fn(features, labels)
    ref.backward()
    assert ours == pytest.approx(ref.item(), rel=1e-5), (ours, ref.item())
    theirs = {n: p.grad for n, p in st[0].auto_model.named_parameters() if p.grad is not None}
    mine = {n.removeprefix("transformer."): g for n, g in ours_grads.items()}
    assert set(mine) <= set(theirs) and len(mine) > 10
    scale = max(float(g.abs().max()) for g in theirs.values())
    for name, g in mine.items():
        assert (g - theirs[name]).abs().max() < 1e-5 * max(scale, 1.0), name
