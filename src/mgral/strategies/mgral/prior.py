"""The prior of MGRAL's head-estimator path: standardised scores of the baselines it must beat.

Per image, higher = more wanted:

* ``least_confidence`` — ``1 - max p`` of the most uncertain kept box (the least-confidence
  baseline's score, :func:`mgral.strategies.uncertainty.uncertainty_scores`);
* ``coreset_distance`` — distance of the L2-normalised embedding to the nearest labeled
  image's (what the core-set baseline maximises first);
* ``class_rarity`` — the score-weighted count of predicted boxes, each weighted by how rare
  its class is among the labeled boxes (``(N + K) / (K (n_c + 1))``: 1 when the classes are
  balanced, larger for the rare ones);
* ``inconsistency`` — ``1 - flip class consistency`` (CALD's idea: the detections of an
  image and of its mirror disagree); it needs the mirrored pass, so only candidates have it.

:func:`pool_prior` ranks the whole pool on the first three (cheap: cached predictions and
embeddings) to pick the candidates; the policy's prior then adds ``inconsistency`` over them
(:func:`mgral.strategies.mgral.policy.standardise` makes each a z-score).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mgral.data.records import Dataset, Detections, ImageId
from mgral.strategies.core_set import prepare_embeddings, stack_embeddings
from mgral.strategies.mgral.policy import standardise
from mgral.strategies.uncertainty import uncertainty_scores

POOL_SCORES = ("least_confidence", "coreset_distance", "class_rarity")
PRIOR_SCORES = (*POOL_SCORES, "inconsistency")


def class_weights(dataset: Dataset, labeled: Sequence[ImageId]) -> dict[int, float]:
    """Category id -> rarity weight ``(N + K) / (K (n_c + 1))`` from the labeled boxes."""
    ids = [c.id for c in dataset.categories]
    counts = dict.fromkeys(ids, 0)
    for i in labeled:
        for label in dataset[i].target.labels.tolist():
            if label in counts:
                counts[label] += 1
    total, k = sum(counts.values()), max(len(ids), 1)
    return {c: (total + k) / (k * (n + 1)) for c, n in counts.items()}


def class_rarity(predictions: Mapping[ImageId, Detections], image_ids: Sequence[ImageId], weights: Mapping[int, float]):
    """Score-weighted sum of the rarity weights of each image's predicted boxes, float64 ``[N]``."""
    out = np.zeros(len(image_ids))
    for k, i in enumerate(image_ids):
        d = predictions[i]
        if len(d.scores):
            w = np.array([weights.get(int(c), 1.0) for c in d.labels])
            out[k] = float((d.scores.astype(np.float64) * w).sum())
    return out


def coreset_distance(
    embeddings: Mapping[ImageId, np.ndarray], image_ids: Sequence[ImageId], labeled: Sequence[ImageId]
) -> np.ndarray:
    """Euclidean distance of each L2-normalised embedding to the nearest labeled one (float64 ``[N]``;
    zeros when nothing is labeled)."""
    from sklearn.metrics import pairwise_distances_argmin_min

    if not labeled or not image_ids:
        return np.zeros(len(image_ids))
    pool, centers = (prepare_embeddings(stack_embeddings(embeddings, ids), True) for ids in (image_ids, labeled))
    _, dist = pairwise_distances_argmin_min(pool, centers)
    return dist.astype(np.float64)


def pool_scores(
    dataset: Dataset,
    predictions: Mapping[ImageId, Detections],
    embeddings: Mapping[ImageId, np.ndarray],
    image_ids: Sequence[ImageId],
    labeled: Sequence[ImageId],
) -> dict[str, np.ndarray]:
    """The :data:`POOL_SCORES` of ``image_ids`` (raw, not standardised)."""
    return {
        "least_confidence": uncertainty_scores(predictions, list(image_ids), "least_confidence", "max"),
        "coreset_distance": coreset_distance(embeddings, image_ids, labeled),
        "class_rarity": class_rarity(predictions, image_ids, class_weights(dataset, labeled)),
    }


def pool_prior(scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """The sum of the standardised scores: the candidates are the pool's highest."""
    z, _ = standardise(scores)
    return z.sum(axis=1)
