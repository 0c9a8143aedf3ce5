"""MGRAL's prior-tied policy, its memoised table and safe selection, on planted rewards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mgral.strategies.mgral.policy import (
    BatchMemo,
    PolicySettings,
    PriorTiedAgent,
    policy_scores,
    safe_choice,
    standardise,
    top_b,
    train_policy,
)

N, F, B = 40, 6, 5


def _planted(seed: int = 0, prior_noise: float = 2.0):
    """Candidates whose value is a linear function of their features (learnable), a prior
    that sees the value through heavy noise, and a useless second prior column."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(N, F))
    value = features @ rng.normal(size=F)
    z, _ = standardise({"noisy": value + prior_noise * value.std() * rng.normal(size=N), "useless": rng.normal(size=N)})
    return features, value, z


def test_standardise_gives_z_scores_and_zeros_a_constant_or_broken_column():
    z, names = standardise({"a": np.array([1.0, 2.0, 3.0]), "flat": np.ones(3), "nan": np.array([np.nan, 1.0, 1.0])})
    assert names == ["a", "flat", "nan"]
    assert z[:, 0] == pytest.approx([-1.2247449, 0.0, 1.2247449])
    assert not z[:, 1].any() and not z[:, 2].any()


def test_the_untrained_policy_is_the_prior_in_any_reading_order():
    features, _, z = _planted()
    agent = PriorTiedAgent(F, [1.0, 0.5], hidden=16, proj=8)
    prior = z @ np.array([1.0, 0.5])
    for order in (np.arange(N), np.random.default_rng(1).permutation(N)):
        x, zt = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(z, dtype=torch.float32)
        logits = agent.logits(x, zt, order, chunk=16)
        assert logits.detach().numpy() == pytest.approx(prior, abs=1e-6)


def _train(features, z, reward, *, seed=0, **settings):
    agent = PriorTiedAgent(F, [1.0, 0.0], seed=seed, hidden=16, proj=8)
    s = PolicySettings(**{"updates": 120, "samples": 16, "chunk": 8, **settings})
    curve = train_policy(agent, features, z, B, reward, s, seed=seed)
    return curve, policy_scores(agent, features, z, s, seed=seed)


@pytest.fixture(scope="module")
def planted_policy():
    """The planted scenario, the policy trained on its exact reward through the table."""
    features, value, z = _planted()
    memo = BatchMemo(lambda batch: value[list(batch)].sum())
    curve, scores = _train(features, z, memo, kl=0.05)
    return value, z, curve, scores


def test_the_policy_finds_a_planted_best_batch_the_prior_misses(planted_policy):
    value, z, curve, scores = planted_policy
    best = value[top_b(value, B)].sum()
    learned, prior = value[top_b(scores, B)].sum(), value[top_b(z[:, 0], B)].sum()
    assert learned > prior + 0.25 * (best - prior), (learned, prior, best)
    assert len(set(top_b(scores, B)) & set(top_b(value, B))) >= 3
    assert np.mean([c["reward_mean"] for c in curve[-20:]]) > np.mean([c["reward_mean"] for c in curve[:20]])


def test_on_a_pure_noise_reward_the_kl_penalty_keeps_the_prior():
    features, _, z = _planted()
    rng = np.random.default_rng(5)
    _, scores = _train(features, z, lambda batches: rng.normal(size=len(batches)), kl=5.0)
    assert len(set(top_b(scores, B)) & set(top_b(z[:, 0], B))) >= 4


def test_training_is_deterministic_and_leaves_the_global_generators_alone():
    features, value, z = _planted()
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    first, second, other = (_train(features, z, lambda b: value[b].sum(1), seed=s, updates=10) for s in (3, 3, 4))
    assert first[0] == second[0] and np.array_equal(first[1], second[1])
    assert torch.equal(torch.get_rng_state(), torch_state) and np.array_equal(np.random.get_state()[1], np_state)
    assert not np.array_equal(other[1], first[1])


def test_the_table_evaluates_each_set_once_whatever_its_order():
    calls: list[tuple[int, ...]] = []

    def estimate(batch):
        calls.append(batch)
        return float(sum(batch))

    memo = BatchMemo(estimate)
    assert memo(np.array([[3, 1, 2], [2, 3, 1], [4, 5, 6]])).tolist() == [6.0, 6.0, 15.0]
    assert calls == [(1, 2, 3), (4, 5, 6)] and memo.rows == [((1, 2, 3), 6.0), ((4, 5, 6), 15.0)]


@pytest.mark.parametrize(
    ("diff", "se", "same", "learned", "reason"),
    [
        (0.05, 0.01, False, True, "learned beats the prior by 0.05 > 2 x SE 0.01"),
        (0.015, 0.01, False, False, "within 2 x SE 0.01: the prior's batch"),
        (-0.02, 0.01, False, False, "the prior's batch"),
        (float("nan"), 0.01, False, False, "not finite"),
        (0.0, 0.0, True, False, "the policy's batch is the prior's"),
    ],
)
def test_safe_choice_takes_the_learned_batch_only_beyond_two_paired_standard_errors(diff, se, same, learned, reason):
    choice = safe_choice(diff, se, same=same)
    assert choice.learned is learned and reason in choice.reason
    assert choice.to_dict()["batch"] == ("learned" if learned else "prior")


def test_safe_selection_falls_back_to_the_prior_when_the_estimate_is_noise(planted_policy):
    """Estimates = truth + noise of standard error `se`: with a noisy estimator the learned
    batch is taken only when it is really better; with noise far above the differences,
    almost never."""
    value, z, _, scores = planted_policy
    rng = np.random.default_rng(0)
    learned, prior = top_b(scores, B), top_b(z[:, 0], B)
    gap = value[learned].sum() - value[prior].sum()
    assert gap > 0
    noisy = 50 * gap  # paired SE of the difference far above the true gap
    taken = [safe_choice(gap + noisy * rng.normal(), noisy).learned for _ in range(200)]
    assert sum(taken) <= 10  # P(N(gap, noisy) > 2 noisy) = 2.2% plus the gap's share
    exact = safe_choice(gap, gap / 10)
    assert exact.learned
