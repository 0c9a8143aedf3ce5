"""Random sampling: the baseline every active-learning curve is compared with."""

from __future__ import annotations

import numpy as np

from mgral.strategies.base import Selection, SelectionContext, Strategy, check_budget, register_strategy


def random_scores(num_images: int, rng: np.random.Generator) -> np.ndarray:
    """One i.i.d. uniform ``[0, 1)`` key per image, float64 ``[num_images]``.

    The images with the ``n`` largest keys are a uniform random subset of size ``n``
    drawn without replacement, in uniform random order.
    """
    return rng.random(num_images)


@register_strategy("uniform random images (the baseline); needs nothing")
class RandomSampling(Strategy):
    """Uniform sampling without replacement from the pool, driven by ``context.rng``.

    Scores are the random keys the images were ranked by; they carry no information.

    References:
        The passive baseline of every study below, e.g. Settles, "Active Learning
        Literature Survey", University of Wisconsin-Madison TR 1648, 2009.
    """

    name = "random"
    requires = frozenset()

    def __init__(self) -> None:
        pass

    def select(self, context: SelectionContext, budget: int) -> Selection:
        n = check_budget(context, budget, self.requires)
        keys = random_scores(len(context.pool_ids), context.rng)
        # Keys are continuous, so ties have probability zero: no tie-breaking permutation needed.
        order = np.argsort(-keys, kind="stable")[:n]
        return Selection([context.pool_ids[i] for i in order], keys[order].tolist())
