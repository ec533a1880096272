"""Tests for metrics.py: the paper's outlier metrics (kurtosis, inf-norm, 6-sigma outliers and where they sit),
against hand-computed answers. CPU, well under a second."""

import math

import torch

import pytest

import metrics as M
from metrics import OutlierStats, inf_norm, kurtosis, outlier_counts, outlier_mask


def test_kurtosis_gaussian_and_spike():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 500, 200, generator=gen)
    k = kurtosis(x)
    assert k.shape == (2,) and torch.allclose(k, torch.full((2,), 3.0), atol=0.05)
    x[1, 3, 7] = 300.0
    k = kurtosis(x)
    assert abs(k[0] - 3) < 0.05 and k[1] > 100
    # uniform: 9/5
    u = torch.rand(1, 1000, 100, generator=gen)
    assert abs(kurtosis(u).item() - 1.8) < 0.02


def test_kurtosis_and_inf_norm_ignore_padding():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 6, generator=gen)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    xp = x.clone()
    xp[1, 7:] = 1e4  # garbage at the padding
    k, n = kurtosis(xp, mask), inf_norm(xp, mask)
    assert torch.allclose(k[1], kurtosis(x[1:, :7])[0]) and torch.allclose(k[0], kurtosis(x[:1])[0])
    assert n[1] == x[1, :7].abs().max() and n[0] == x[0].abs().max()
    assert torch.equal(inf_norm(torch.tensor([[[1.0, -5.0], [2.0, 0.0]]])), torch.tensor([5.0]))


def test_outlier_mask_and_counts():
    # 3 spikes in 4,000 small values (a 6-std outlier needs a big enough tensor: max z-score <= sqrt(n - 1))
    x = 0.01 * torch.randn(2, 50, 40, generator=torch.Generator().manual_seed(0))
    x[0, 1, 2] = 100.0
    x[1, 3, 2] = -100.0
    x[1, 49, 0] = 100.0
    om = outlier_mask(x)
    assert om.sum() == 3 and om[0, 1, 2] and om[1, 3, 2] and om[1, 49, 0]
    assert not outlier_mask(x, n_std=1000.0).any()
    ids = torch.zeros(2, 50, dtype=torch.long)
    ids[0, 1], ids[1, 3], ids[1, 49] = 1, 7, 7
    c = outlier_counts(x, token_ids=ids, num_ids=9)
    assert c["total"] == 3
    per_dim, per_pos = torch.zeros(40, dtype=torch.long), torch.zeros(50, dtype=torch.long)
    per_dim[2], per_dim[0] = 2, 1
    per_pos[1], per_pos[3], per_pos[49] = 1, 1, 1
    assert torch.equal(c["per_dim"], per_dim) and torch.equal(c["per_pos"], per_pos)
    assert c["per_token"].tolist() == [0, 1, 0, 0, 0, 0, 0, 2, 0]
    assert c["per_dim"].sum() == c["per_pos"].sum() == c["per_token"].sum() == c["total"]
    # padding positions are never outliers and do not enter the mean / std
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 40:] = False
    c = outlier_counts(x, mask)
    assert c["total"] == 2 and c["per_pos"][49] == 0 and c["per_dim"].tolist()[:3] == [0, 0, 2]
    assert not outlier_mask(x, mask=mask)[1, 40:].any()


def test_outlier_stats_accumulates_per_name_and_kind():
    gen = torch.Generator().manual_seed(0)
    st = OutlierStats()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    for b in range(2):
        a0 = torch.randn(2, 6, 8, generator=gen)
        a1 = torch.randn(2, 6, 8, generator=gen)
        f0 = torch.randn(2, 6, 8, generator=gen)
        f0[:, 2, 5] = 50.0 + b  # an outlier dimension
        f0[1, 5, :] = 1e6  # at the padding: ignored
        st.update({"blocks.0.attn_out": a0, "blocks.1.attn_out": a1 * 2, "blocks.0.ffn_out": f0,
                   "blocks.0.attn_probs": torch.rand(2, 2, 6, 6)}, mask)
    s = st.summary()
    assert "blocks.0.attn_probs" not in s["per_name"]
    ffn = s["per_name"]["blocks.0.ffn_out"]
    assert math.isclose(ffn["mean_inf_norm"], (50 + 50 + 51 + 51) / 4, rel_tol=1e-6)
    assert ffn["n_samples"] == 4 and ffn["n_outliers"] == 4 and ffn["top_dims"] == [(5, 4)]
    assert ffn["outliers_per_pos"].tolist() == [0, 0, 4, 0, 0, 0]
    pk = s["per_kind"]
    assert set(pk) == {"attn_out", "ffn_out"} and pk["attn_out"]["n_layers"] == 2
    a = s["per_name"]
    assert pk["attn_out"]["max_inf_norm"] == max(a["blocks.0.attn_out"]["mean_inf_norm"],
                                                 a["blocks.1.attn_out"]["mean_inf_norm"])
    assert pk["attn_out"]["max_inf_norm_at"] == "blocks.1.attn_out"
    assert math.isclose(pk["attn_out"]["mean_kurtosis"], (a["blocks.0.attn_out"]["mean_kurtosis"]
                                                          + a["blocks.1.attn_out"]["mean_kurtosis"]) / 2)


# ------------------------------------------------------------------------------------ sentence embeddings
def test_mean_pool_counts_valid_positions_only():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2); the last position is padding
    assert torch.equal(M.mean_pool(h, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 3.0]]))
    assert torch.allclose(M.mean_pool(h), h.mean(1))


def test_identical_embeddings_give_cosine_one_and_full_neighbour_agreement():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 5, 8, generator=g)  # 6 sentences of 5 tokens
    acc = M.EmbeddingAgreement()
    acc.update(h[:4], h[:4].clone())
    acc.update(h[4:], h[4:].clone())
    s = acc.summary()
    assert s["n_sentences"] == 6 and s["neighbour_agreement"] == 1.0
    assert s["cosine_mean"] == pytest.approx(1.0, abs=1e-12) and s["cosine_min"] == pytest.approx(1.0, abs=1e-12)


def test_embedding_agreement_hand_built_case():
    # three sentences of one token each: their embeddings are the token vectors
    ref = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # nearest neighbours: 1, 0 (cos .8 vs 0), 1
    other = torch.tensor([[1.0, 1.0], [0.8, 0.6], [0.0, 1.0]])  # sentence 0 moved 45 degrees
    # other's neighbours: 0 -> 1 (cos 0.99) , 1 -> 0 (0.99 vs 0.6), 2 -> 0 (0.707 vs 0.6): sentence 2 changed
    assert M.nearest_neighbours(ref).tolist() == [1, 0, 1] and M.nearest_neighbours(other).tolist() == [1, 0, 0]
    assert M.neighbour_agreement(ref, other) == pytest.approx(2 / 3)
    cos = M.cosine_rows(ref, other)
    assert cos.tolist() == pytest.approx([2 ** -0.5, 1.0, 1.0])
    acc = M.EmbeddingAgreement()
    acc.update(ref[:, None, :], other[:, None, :])
    s = acc.summary()
    assert s["cosine_mean"] == pytest.approx((2 ** -0.5 + 2) / 3) and s["cosine_min"] == pytest.approx(2 ** -0.5)
    assert s["neighbour_agreement"] == pytest.approx(2 / 3)


def test_embedding_metrics_agree_with_torch_and_refuse_bad_shapes():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, 16, generator=g), torch.randn(10, 16, generator=g)
    assert torch.allclose(M.cosine_rows(a, b), torch.nn.functional.cosine_similarity(a.double(), b.double()))
    assert M.cosine_rows(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 1.0
    with pytest.raises(ValueError, match="N >= 2"):
        M.nearest_neighbours(torch.ones(1, 3))
    with pytest.raises(ValueError, match="shape"):
        M.neighbour_agreement(a, b[:5])


# ------------------------------------------------------------------------------------ retrieval and intervals
def test_retrieval_known_answers():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(50, 16, generator=g)
    ranks = M.retrieval_ranks(e, e.clone())  # each query is its own document: all found first
    assert torch.equal(ranks, torch.ones(50, dtype=torch.long))
    s = M.retrieval_summary(ranks)
    assert s == {"recall@1": 1.0, "recall@10": 1.0, "mrr": 1.0, "n": 50}
    # a hand-built case (cosines by hand): query 0 finds doc 0 (cosine 1); query 1 = (0, 1) is closer to doc 2
    # (0.995) than to its doc 1 (0.707); query 2 = (1, 0.2) is closer to doc 0 (0.981) and doc 1 (0.832) than to
    # its doc 2 (0.293). Scale does not matter (doc 0 has norm 5).
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2]])
    d = torch.tensor([[5.0, 0.0], [1.0, 1.0], [0.1, 1.0]])
    assert M.retrieval_ranks(q, d).tolist() == [1, 2, 3]
    s = M.retrieval_summary(M.retrieval_ranks(q, d))
    assert s["recall@1"] == pytest.approx(1 / 3) and s["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # ties count against the query: identical documents give the worst rank, never a lucky first place
    assert M.retrieval_ranks(torch.ones(4, 3), torch.ones(4, 3)).tolist() == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="same shape|one shape"):
        M.retrieval_ranks(torch.ones(4, 3), torch.ones(5, 3))


def test_retrieval_of_unrelated_embeddings_is_at_chance():
    """Random queries and documents: recall@1 is 1/N per query, so over many trials the count of hits is
    binomial(trials * N, 1/N); it must sit inside that distribution's 99.9% range."""
    g = torch.Generator().manual_seed(1)
    N, trials, hits = 20, 200, 0
    for _ in range(trials):
        r = M.retrieval_ranks(torch.randn(N, 8, generator=g), torch.randn(N, 8, generator=g))
        hits += int((r == 1).sum())
    n, p = N * trials, 1 / N
    sd = math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) < 3.3 * sd, (hits, n * p, sd)
    # the mean reciprocal rank of a uniform rank in 1..N is H_N / N
    r = torch.cat([M.retrieval_ranks(torch.randn(N, 8, generator=g), torch.randn(N, 8, generator=g))
                   for _ in range(trials)])
    assert M.retrieval_summary(r)["mrr"] == pytest.approx(sum(1 / k for k in range(1, N + 1)) / N, rel=0.1)


def test_paired_bootstrap_interval_covers_a_known_difference():
    """Paired 0/1 scores whose true mean difference is known: the 95% interval covers it in about 95% of
    repeated experiments (binomial tolerance), is centred on the observed difference, and says 'within noise'
    when the two score vectors are equal."""
    g = torch.Generator().manual_seed(2)
    true_diff, n, reps, covered = -0.03, 400, 200, 0
    for rep in range(reps):
        a = (torch.rand(n, generator=g) < 0.6).double()
        flip = torch.rand(n, generator=g)
        b = a.clone()
        b[(a == 1) & (flip < 0.10)] = 0  # lose 10% of the hits (6 points) ...
        b[(a == 0) & (flip < 0.075)] = 1  # ... gain 7.5% of the misses (3 points): true difference -3 points
        r = M.paired_bootstrap(a, b, n_boot=1000, seed=rep)
        assert r["lo"] <= r["diff"] <= r["hi"] and r["diff"] == pytest.approx(float((b - a).mean()))
        covered += r["lo"] <= true_diff <= r["hi"]
    assert 0.88 * reps <= covered <= reps, covered
    same = M.paired_bootstrap(a, a)
    assert same["diff"] == 0 and same["within_noise"]
    far = M.paired_bootstrap(torch.ones(100), torch.zeros(100))
    assert far["diff"] == -1 and not far["within_noise"]
    # fixed seed: the same interval every time
    assert M.paired_bootstrap(a, b) == M.paired_bootstrap(a, b)
    with pytest.raises(ValueError, match="same items"):
        M.paired_bootstrap(torch.ones(3), torch.ones(4))
    ci = M.bootstrap_interval(a)
    assert ci["lo"] < float(a.mean()) < ci["hi"]
