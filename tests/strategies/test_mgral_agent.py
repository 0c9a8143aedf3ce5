"""MGRAL's agent and reward model on planted rewards (no detector)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mgral.strategies.mgral.agent import (
    AgentSettings,
    SamplingAgent,
    agent_scores,
    gumbel_top_b,
    plackett_luce_log_prob,
    repair_to_b,
    train_agent,
)
from mgral.strategies.mgral.reward import TableRows, cluster_term, fit_reward_model, loo_spearman


def test_plackett_luce_log_probs_normalize_over_all_ordered_batches():
    logits = torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7], dtype=torch.float64)
    picks = torch.tensor(list(itertools.permutations(range(5), 2)))
    total = plackett_luce_log_prob(logits, picks).exp().sum()
    assert float(total) == pytest.approx(1.0, abs=1e-12)
    picks3 = torch.tensor(list(itertools.permutations(range(5), 3)))
    assert float(plackett_luce_log_prob(logits, picks3).exp().sum()) == pytest.approx(1.0, abs=1e-12)


def test_gumbel_top_b_draws_follow_plackett_luce():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    picks = gumbel_top_b(logits, 1, 40000, torch.Generator().manual_seed(0))
    freq = np.bincount(picks[:, 0].numpy(), minlength=4) / 40000
    assert freq == pytest.approx(torch.softmax(logits, 0).numpy(), abs=0.01)
    many = gumbel_top_b(logits, 3, 100, torch.Generator().manual_seed(1))
    assert all(len(set(row.tolist())) == 3 for row in many)


def test_repair_to_b_keeps_exactly_b():
    logits = np.array([0.1, 0.9, -0.3, 0.5, 0.2])
    assert sorted(repair_to_b(np.array([1, 1, 1, 1, 0]), logits, 2)) == [1, 3]
    assert sorted(repair_to_b(np.array([0, 0, 1, 0, 0]), logits, 3)) == [1, 2, 3]
    assert sorted(repair_to_b(np.array([0, 1, 0, 1, 0]), logits, 2)) == [1, 3]


def _planted_subset(n=48, f=6, hidden=8, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, f))
    secret = np.zeros(n, dtype=bool)
    secret[rng.choice(n, hidden, replace=False)] = True
    features[:, 0] += 1.5 * secret  # the hidden items are learnable from their features
    return features, secret


@pytest.mark.parametrize("sampling", ["plackett_luce", "bernoulli"])
def test_agent_learns_a_planted_hidden_subset(sampling):
    features, secret = _planted_subset()
    budget = 8

    def reward(batches):
        return secret[batches].sum(axis=1).astype(float)

    torch.manual_seed(0)
    agent = SamplingAgent(features.shape[1], hidden=32)
    settings = AgentSettings(updates=150, samples=8, lr=3e-3, chunk=16, sampling=sampling)
    curve = train_agent(agent, features, budget, reward, settings, seed=0)
    rng = np.random.default_rng(1)
    random_reward = np.mean([secret[rng.choice(len(secret), budget, replace=False)].sum() for _ in range(2000)])
    late = np.mean([c["reward_mean"] for c in curve[-20:]])
    early = np.mean([c["reward_mean"] for c in curve[:10]])
    assert late > early + 1.0 and late > 2 * random_reward  # random: 8 * 8/48 = 1.33
    orders = [np.random.default_rng(k).permutation(len(secret)) for k in range(4)]
    top = np.argsort(-agent_scores(agent, features, orders, 16, sampling=sampling, budget=budget))[:budget]
    assert secret[top].sum() >= 6


def test_agent_learns_a_diminishing_returns_cluster_reward():
    rng = np.random.default_rng(3)
    clusters = np.repeat(np.arange(6), 8)  # 6 clusters of 8
    features = np.eye(6)[clusters] + 0.1 * rng.normal(size=(48, 6))
    value = np.array([1.0, 1.0, 1.0, 0.2, 0.2, 0.2])  # three valuable clusters

    def reward(batches):
        counts = np.stack([np.bincount(clusters[b], minlength=6) for b in batches])
        return (np.sqrt(counts) * value).sum(axis=1)

    torch.manual_seed(0)
    agent = SamplingAgent(6, hidden=32)
    curve = train_agent(agent, features, 6, reward, AgentSettings(updates=200, lr=3e-3, chunk=16), seed=0)
    random_batches = np.stack([rng.choice(48, 6, replace=False) for _ in range(2000)])
    assert np.mean([c["reward_mean"] for c in curve[-20:]]) > reward(random_batches).mean() + 0.5


def _planted_rows(weights, bias, lam, *, rows=200, n=300, size=10, noise=0.01, seed=0, clusters=8):
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n, len(weights)))
    cl = rng.integers(0, clusters, n)
    combos = np.stack([rng.choice(n, size, replace=False) for _ in range(rows)])
    credits = phi @ weights + bias
    dmap = credits[combos].sum(1) + lam * np.array([cluster_term(cl[c], clusters) for c in combos])
    dmap = dmap + noise * rng.normal(size=rows)
    table = TableRows(
        phi[combos].sum(1),
        np.full(rows, size, dtype=float),
        np.array([cluster_term(cl[c], clusters) for c in combos]),
        dmap,
        np.ones(rows),
    )
    return table, phi, cl


def test_reward_model_recovers_planted_feature_weights():
    w = np.array([0.02, -0.01, 0.0, 0.005])
    table, phi, cl = _planted_rows(w, 0.001, 0.004)
    model = fit_reward_model(table, alpha=1e-3)
    assert model.weights == pytest.approx(w, abs=1e-3)
    assert model.cluster_coef == pytest.approx(0.004, abs=2e-3)
    # O(|S|) batch rewards equal the planted reward of fresh batches
    batches = np.stack([np.random.default_rng(k).choice(300, 10, replace=False) for k in range(50)])
    truth = (phi @ w + 0.001)[batches].sum(1) + 0.004 * np.array([cluster_term(cl[b], 8) for b in batches])
    pred = model.batch_rewards(model.credits(phi), cl, batches)
    assert np.corrcoef(pred, truth)[0, 1] > 0.98


def test_negative_cluster_fit_is_dropped():
    table, _, _ = _planted_rows(np.array([0.01, 0.0]), 0.0, -0.01, noise=0.0)
    assert fit_reward_model(table, alpha=1e-3).cluster_coef == 0.0


def test_loo_spearman_is_computed_by_leaving_each_row_out():
    table, _, _ = _planted_rows(np.array([0.02, -0.01]), 0.0, 0.0, rows=12, noise=0.002)
    held = np.zeros(12, dtype=bool)
    held[4:] = True
    rho, preds = loo_spearman(table, held, alpha=1e-3)
    manual = []
    for i in range(4, 12):
        keep = np.arange(12) != i
        manual.append(fit_reward_model(table.take(keep), alpha=1e-3).predict_rows(table.take(np.array([i])))[0])
    assert preds == pytest.approx(manual)
    from scipy.stats import spearmanr

    assert rho == pytest.approx(spearmanr(manual, table.dmap[4:]).statistic)
    assert rho > 0.8
    # with noise only, the reward model does not predict held-out rows
    pure = TableRows(table.phi_sum, table.sizes, table.cluster, np.random.default_rng(5).normal(size=12), table.weight)
    assert abs(loo_spearman(pure, held, alpha=1.0)[0]) < 0.9
    assert loo_spearman(table.take(np.arange(2)), np.ones(2, dtype=bool))[0] is None
