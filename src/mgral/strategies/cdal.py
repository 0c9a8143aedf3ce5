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
from mgral.errors import ConfigError
from mgral.strategies._detection_math import (
    canonical_order,
    category_columns,
    check_number,
    flatten_detections,
)
from mgral.strategies.base import Selection, SelectionContext, Strategy, check_budget, register_strategy
from mgral.strategies.core_set import k_center_greedy, random_subset


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
    *,
    chunk: int = 4096,
) -> np.ndarray:
    """float32 ``[len(image_ids), K * (K + 1)]``: each image's concatenated ``sqrt(P_c)`` (zeros
    for absent categories), so that half the squared Euclidean distance of two rows is
    :func:`contextual_distance` of the images.

    Row for row equal to :func:`class_confusion` image by image (the same sums in the same
    order), computed for ``chunk`` images at a time.
    """
    k = len(columns)
    out = np.zeros((len(image_ids), k * (k + 1)), dtype=np.float32)
    for lo in range(0, len(image_ids), chunk):
        ids = image_ids[lo : lo + chunk]
        flat = flatten_detections([predictions[i] for i in ids], ids, columns)
        keep = flat.scores >= min_score
        p = flat.probs[keep].astype(np.float64)
        w = entr(np.clip(p, 0.0, None)).sum(axis=1)
        cell = flat.image[keep] * k + (flat.cols[keep] - 1)  # (image, category)
        cells = len(ids) * k
        weighted = np.zeros((cells, k + 1))
        plain = np.zeros((cells, k + 1))
        _add_in_order(weighted, cell, w[:, None] * p)
        _add_in_order(plain, cell, p)
        mass = np.bincount(cell, weights=w, minlength=cells)
        count = np.bincount(cell, minlength=cells)
        by_entropy = weighted / np.where(mass > 0, mass, 1.0)[:, None]
        conf = np.where((mass > 0)[:, None], by_entropy, plain / np.maximum(count, 1)[:, None])
        out[lo : lo + len(ids)] = np.sqrt(np.clip(conf, 0.0, None)).reshape(len(ids), -1)
    return out


def _add_in_order(acc: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """``np.add.at(acc, index, values)``: each row of ``acc`` receives its values one after the
    other in their order (the same sums, rounding included), one rank at a time."""
    if not len(index):
        return
    order = np.argsort(index, kind="stable")
    index = index[order]
    first = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    length = np.diff(np.r_[first, len(index)])
    for r in range(int(length.max())):
        at = first[length > r]
        acc[index[at]] += values[order[at + r]]


def contextual_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``sum_c H^2(P_c^A, P_c^B)`` from two rows of :func:`contextual_features`."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return 0.5 * float(diff @ diff)


@register_strategy("CDAL: core-set on per-class entropy-weighted confusion distributions (contextual diversity)")
class Cdal(Strategy):
    """Contextual diversity for active learning, core-set variant (see the module doc).

    Args:
        min_score: boxes scoring below it are ignored (0: every box the detector kept).
        subset: run on a random subset of this many pool images (drawn with ``context.rng``; at
            least the budget), bounding the pool x budget cost of k-center greedy on large
            pools at the price of an approximate cover. None (default): the whole pool, exactly.

    Raises:
        ConfigError: a parameter out of range.
    """

    name = "cdal"
    requires = frozenset({"predictions", "detector"})
    selection_cost = 0.1  # one pass over the labeled set

    def workload(self, *, labeled: int, unlabeled: int, budget: int) -> tuple[float, float]:
        return 0.0, float(labeled)  # the labeled images predicted, for their class contexts

    def __init__(self, *, min_score: float = 0.0, subset: int | None = None) -> None:
        self.min_score = check_number("cdal", "min_score", min_score, 0.0, 1.0)
        if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
            raise ConfigError(f"cdal: subset must be a positive integer or null, got {subset!r}")
        self.subset = subset

    def select(self, context: SelectionContext, budget: int) -> Selection:
        n = check_budget(context, budget, self.requires)
        columns = category_columns(context.dataset.categories)
        pool_ids = canonical_order(context.pool_ids)  # pool order never matters, ties go to rng
        pool_ids = random_subset(pool_ids, self.subset, n, context.rng)
        pool = contextual_features(context.predictions, pool_ids, columns, self.min_score)
        labeled_ids = list(context.labeled_ids)
        labeled_preds = context.detector.predict(context.dataset, labeled_ids, embeddings=False) if labeled_ids else {}
        labeled_ids = [i for i in labeled_ids if i in labeled_preds]
        labeled = contextual_features(labeled_preds, labeled_ids, columns, self.min_score)
        picked, dist = k_center_greedy(pool, labeled.reshape(-1, pool.shape[1]), n, context.rng, normalize=False)
        scores = 0.5 * dist**2
        info = {"labeled_centers": len(labeled)}
        if self.subset is not None:
            info["searched"] = len(pool_ids)
        return Selection([pool_ids[i] for i in picked], scores.tolist(), info)
