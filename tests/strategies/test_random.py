"""Random sampling is uniform, without replacement, and driven only by the context's generator."""

from __future__ import annotations

import numpy as np

from mgral.strategies import build_strategy
from mgral.strategies.random import random_scores


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_every_image_is_equally_likely_to_be_chosen_and_to_come_first(make_context, for_strategy):
    strategy = build_strategy("random")
    ctx = for_strategy(make_context(num_pool=10, seed=2024), strategy)
    index = {image_id: k for k, image_id in enumerate(ctx.pool_ids)}
    chosen, first = np.zeros(10), np.zeros(10)
    for _ in range(3000):
        sel = strategy.select(ctx, 3)  # one generator across draws, as across the loop's cycles
        assert len(set(sel.image_ids)) == 3
        chosen[[index[i] for i in sel.image_ids]] += 1
        first[index[sel.image_ids[0]]] += 1
    # 9 degrees of freedom: P(chi2 > 40) is about 1e-5, so a fair sampler passes and a
    # biased one (e.g. always favouring the start of the pool) fails.
    assert chi_square(chosen) < 40
    assert chi_square(first) < 40


def test_scores_are_the_random_keys_in_descending_order(make_context, for_strategy):
    strategy = build_strategy("random")
    sel = strategy.select(for_strategy(make_context(), strategy), 10)
    assert all(0.0 <= s < 1.0 for s in sel.scores)
    assert sel.scores == sorted(sel.scores, reverse=True)


def test_different_seeds_give_different_selections(make_context, for_strategy):
    strategy = build_strategy("random")
    picks = {tuple(strategy.select(for_strategy(make_context(seed=s), strategy), 5).image_ids) for s in range(5)}
    assert len(picks) == 5


def test_random_scores_shape_and_range():
    keys = random_scores(1000, np.random.default_rng(0))
    assert keys.shape == (1000,) and keys.min() >= 0.0 and keys.max() < 1.0
    assert np.array_equal(keys, random_scores(1000, np.random.default_rng(0)))
