"""CDAL: contextual diversity, core-set selection on per-class confusion distributions.

An image's contextual descriptor holds, for each category ``c``, the class-specific
confusion ``P_c``: the mean of the class distributions ``p_r`` (``[K + 1]``, background
included) of the image's boxes ``r`` predicted as ``c``, each weighted by its entropy
``H(p_r)`` (a plain mean when every such box is certain); ``P_c`` is absent when no box is
predicted as ``c``. The distance between two images sums over categories the squared
Hellinger distance of their confusions,

    d(A, B) = sum_c H^2(P_c^A, P_c^B),   H^2(p, q) = 1/2 sum_i (sqrt(p_i) - sqrt(q_i))^2,

where a category present in only one image contributes 1/2 and one absent from both 0.
Identical images are at distance 0; ``d`` is symmetric. Selection is core-set k-center
greedy (:func:`mgral.strategies.core_set.k_center_greedy`) under this distance: each pick
is the pool image farthest from its nearest center, the centers being the labeled images
and the picks so far. A pick's score is its distance ``d`` to that center.

The labeled images' descriptors come from the detector's predictions on them (the loop
gives predictions for the pool only), hence ``requires`` names the detector.

Departures from the paper and the official code (``sharat29ag/CDAL``):

* squared Hellinger distance instead of symmetric KL: it is symmetric and bounded like
  KL's symmetrization is not, is defined when a probability is 0, and is half a squared
  Euclidean distance between the concatenated ``sqrt(P_c)``, so the core-set k-center
  greedy runs unchanged on those vectors (no pool x pool matrix).
* a category predicted in one image but not the other counts (1/2) instead of being
  skipped, so images with disjoint categories are far apart rather than at distance 0.
* the per-class confusions use the detector's kept boxes and their class distributions
  (any detector, e.g. this project's single-stage FCOS); the official repository's
  object-level variant (``preprocess.py``, ``KL_object``) instead averages all regions of
  an image into one distribution. CDAL's reinforcement-learning selector is not used;
  this is the paper's core-set variant (CDAL-CS). Nothing is retrained.

References:
    Agarwal, Arora, Anand and Arora, "Contextual Diversity for Active Learning", ECCV 2020;
    arXiv:2008.05723.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.special import entr

from mgral.data.records import Detections, ImageId
from mgral.strategies._detection_math import (
    box_columns,
    box_distributions,
    canonical_order,
    category_columns,
    check_number,
)
from mgral.strategies.base import Selection, SelectionContext, Strategy, check_budget, register_strategy
from mgral.strategies.core_set import k_center_greedy


def class_confusion(probs: np.ndarray, cols: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-category entropy-weighted mean class distribution of one image's boxes.

    Args:
        probs: ``[N, K + 1]`` box class distributions.
        cols: ``[N]`` each box's predicted category column, ``1..K``.
        num_classes: ``K``.

    Returns:
        ``(confusion, present)``: float64 ``[K, K + 1]`` (rows of absent categories are 0)
        and bool ``[K]``.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(len(cols), num_classes + 1)
    w = entr(np.clip(p, 0.0, None)).sum(axis=1)
    rows = np.asarray(cols, dtype=np.int64) - 1
    weighted = np.zeros((num_classes, num_classes + 1))
    plain = np.zeros_like(weighted)
    np.add.at(weighted, rows, w[:, None] * p)
    np.add.at(plain, rows, p)
    mass = np.bincount(rows, weights=w, minlength=num_classes)
    count = np.bincount(rows, minlength=num_classes)
    present = count > 0
    by_entropy = weighted / np.where(mass > 0, mass, 1.0)[:, None]
    conf = np.where((mass > 0)[:, None], by_entropy, plain / np.maximum(count, 1)[:, None])
    return conf, present


def contextual_features(
    predictions: Mapping[ImageId, Detections],
    image_ids: Sequence[ImageId],
    columns: dict[int, int],
    min_score: float = 0.0,
) -> np.ndarray:
    """float32 ``[len(image_ids), K * (K + 1)]``: each image's concatenated ``sqrt(P_c)`` (zeros
    for absent categories), so that half the squared Euclidean distance of two rows is
    :func:`contextual_distance` of the images."""
    k = len(columns)
    out = np.zeros((len(image_ids), k * (k + 1)), dtype=np.float32)
    for row, image_id in enumerate(image_ids):
        det = predictions[image_id]
        keep = det.scores >= min_score
        probs = box_distributions(det, columns, image_id)[keep]
        conf, _ = class_confusion(probs, box_columns(det, columns, image_id)[keep], k)
        out[row] = np.sqrt(np.clip(conf, 0.0, None)).reshape(-1)
    return out


def contextual_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``sum_c H^2(P_c^A, P_c^B)`` from two rows of :func:`contextual_features`."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return 0.5 * float(diff @ diff)


@register_strategy("CDAL: core-set on per-class entropy-weighted confusion distributions (contextual diversity)")
class Cdal(Strategy):
    """Contextual diversity for active learning, core-set variant (see the module doc).

    Args:
        min_score: boxes scoring below it are ignored (0: every box the detector kept).

    Raises:
        ConfigError: a parameter out of range.
    """

    name = "cdal"
    requires = frozenset({"predictions", "detector"})

    def __init__(self, *, min_score: float = 0.0) -> None:
        self.min_score = check_number("cdal", "min_score", min_score, 0.0, 1.0)

    def select(self, context: SelectionContext, budget: int) -> Selection:
        n = check_budget(context, budget, self.requires)
        columns = category_columns(context.dataset.categories)
        pool_ids = canonical_order(context.pool_ids)  # pool order never matters, ties go to rng
        pool = contextual_features(context.predictions, pool_ids, columns, self.min_score)
        labeled_ids = list(context.labeled_ids)
        labeled_preds = context.detector.predict(context.dataset, labeled_ids, embeddings=False) if labeled_ids else {}
        labeled_ids = [i for i in labeled_ids if i in labeled_preds]
        labeled = contextual_features(labeled_preds, labeled_ids, columns, self.min_score)
        picked, dist = k_center_greedy(pool, labeled.reshape(-1, pool.shape[1]), n, context.rng, normalize=False)
        scores = 0.5 * dist**2
        return Selection([pool_ids[i] for i in picked], scores.tolist(), {"labeled_centers": len(labeled)})
