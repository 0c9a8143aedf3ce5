"""Uncertainty sampling for detection: least confidence, margin and entropy.

A box's uncertainty is computed from its full class distribution ``probs`` ``[K + 1]``,
background (column 0) included: background is part of what the model predicts, and a
box the model is sure is background is not an uncertain box. Where a detector gives no
``probs`` (``Detections.probs is None``), the box's score ``s`` stands in as the
two-way distribution ``(1 - s, s)`` (object vs background).

Box values become one image score through ``aggregation``:

* ``"max"`` (default): the most uncertain box.
* ``"mean"``: mean over boxes (indifferent to how many objects an image holds).
* ``"sum"``: sum over boxes (favours crowded images).
* ``"topk_mean"``: mean of the ``topk`` most uncertain boxes (of all of them when fewer).

An image with no boxes (none detected, or none scoring at least ``min_score``) scores
``empty_score``, 0 by default: the detector is confident nothing is there. Set it higher
(e.g. 1.0, the most a least-confidence or margin box can score) to treat empty images as
maximally uncertain, as one may early on when the detector still misses most objects.

References:
    Lewis and Gale, "A Sequential Algorithm for Training Text Classifiers", SIGIR 1994.
    Settles, "Active Learning Literature Survey", UW-Madison TR 1648, 2009 (section 3.1).
    Roy, Unmesh and Namboodiri, "Deep Active Learning for Object Detection", BMVC 2018.
    Brust, Käding and Denzler, "Active Learning for Deep Object Detection", VISAPP 2019.
    Haussmann et al., "Scalable Active Learning for Object Detection", IEEE IV 2020.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import numpy as np

from mgral.data.records import Detections, ImageId
from mgral.errors import ConfigError
from mgral.strategies.base import Selection, SelectionContext, Strategy, check_budget, register_strategy, select_top

Kind = Literal["least_confidence", "margin", "entropy"]
Aggregation = Literal["max", "mean", "sum", "topk_mean"]
AGGREGATIONS = ("max", "mean", "sum", "topk_mean")


def box_uncertainty(probs: np.ndarray, kind: Kind) -> np.ndarray:
    """Uncertainty of each box from its class distribution; higher = more uncertain.

    Args:
        probs: ``[N, C]`` rows summing to 1 (background included).
        kind: ``"least_confidence"``: ``1 - max_k p_k``, in ``[0, 1 - 1/C]``;
            ``"margin"``: ``1 - (p_(1) - p_(2))`` (best minus second best), in ``[0, 1]``;
            ``"entropy"``: ``-sum_k p_k ln p_k`` in nats (``0 ln 0 = 0``), in ``[0, ln C]``.

    Returns:
        float64 ``[N]``.
    """
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"probs must be [N, C] with C >= 1, got shape {p.shape}")
    if kind == "least_confidence":
        u = 1.0 - p.max(axis=1)
    elif kind == "margin":
        if p.shape[1] == 1:  # a one-class distribution is certain: the runner-up has probability 0
            u = 1.0 - p[:, 0]
        else:
            top = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
            u = 1.0 - (top[:, 1] - top[:, 0])
    elif kind == "entropy":
        u = -(p * np.log(np.where(p > 0, p, 1))).sum(axis=1)
    else:
        raise ValueError(f"unknown uncertainty kind {kind!r}; valid: least_confidence, margin, entropy")
    return u.astype(np.float64)


def aggregate(values: np.ndarray, how: Aggregation, topk: int = 3, empty_score: float = 0.0) -> float:
    """One image's score from its box values ``[N]`` (``empty_score`` when ``N == 0``)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return float(empty_score)
    if how == "max":
        return float(v.max())
    if how == "mean":
        return float(v.mean())
    if how == "sum":
        return float(v.sum())
    if how == "topk_mean":
        return float(np.sort(v)[::-1][:topk].mean())
    raise ValueError(f"unknown aggregation {how!r}; valid: {', '.join(AGGREGATIONS)}")


def uncertainty_scores(
    predictions: Mapping[ImageId, Detections],
    image_ids: Sequence[ImageId],
    kind: Kind,
    aggregation: Aggregation = "max",
    *,
    topk: int = 3,
    empty_score: float = 0.0,
    min_score: float = 0.0,
    chunk_size: int = 8192,
) -> np.ndarray:
    """Image scores, float64 ``[len(image_ids)]``, equal to :func:`aggregate` of
    :func:`box_uncertainty` image by image, vectorized over chunks of ``chunk_size`` images
    (boxes with ``score < min_score`` ignored; no ``probs``: the ``(1 - s, s)`` fallback)."""
    out = np.empty(len(image_ids), dtype=np.float64)
    for lo in range(0, len(image_ids), chunk_size):
        dets = [predictions[i] for i in image_ids[lo : lo + chunk_size]]
        values, counts = _box_values(dets, kind, min_score)
        out[lo : lo + len(dets)] = _segment_aggregate(values, counts, aggregation, topk, empty_score)
    return out


def _box_values(dets: list[Detections], kind: Kind, min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """All boxes' values, image after image, and the number of boxes of each image."""
    counts = np.fromiter((len(d) for d in dets), dtype=np.int64, count=len(dets))
    has_probs = np.fromiter((d.probs is not None for d in dets), dtype=bool, count=len(dets))
    values = np.empty(int(counts.sum()), dtype=np.float64)
    box_has_probs = np.repeat(has_probs, counts)
    if box_has_probs.any():
        values[box_has_probs] = box_uncertainty(
            np.concatenate([d.probs for d in dets if d.probs is not None and len(d)]), kind
        )
    if not box_has_probs.all():
        s = np.concatenate([d.scores for d in dets if d.probs is None]).astype(np.float64)
        values[~box_has_probs] = box_uncertainty(np.stack([1.0 - s, s], axis=1), kind)
    if min_score > 0 and values.size:
        keep = np.concatenate([d.scores for d in dets]) >= min_score
        image_of_box = np.repeat(np.arange(len(dets)), counts)[keep]
        values, counts = values[keep], np.bincount(image_of_box, minlength=len(dets))
    return values, counts


def _segment_aggregate(
    values: np.ndarray, counts: np.ndarray, how: Aggregation, topk: int, empty_score: float
) -> np.ndarray:
    out = np.full(len(counts), float(empty_score), dtype=np.float64)
    # reduceat over an empty segment returns a neighbour's element, so only non-empty images are reduced.
    nonempty = counts > 0
    c = counts[nonempty]
    if c.size == 0:
        return out
    starts = np.cumsum(c) - c
    if how == "max":
        agg = np.maximum.reduceat(values, starts)
    elif how == "sum":
        agg = np.add.reduceat(values, starts)
    elif how == "mean":
        agg = np.add.reduceat(values, starts) / c
    elif how == "topk_mean":
        segment = np.repeat(np.arange(c.size), c)
        v = values[np.lexsort((-values, segment))]
        keep = np.arange(v.size) - np.repeat(starts, c) < topk
        kc = np.minimum(c, topk)
        agg = np.add.reduceat(v[keep], np.cumsum(kc) - kc) / kc
    else:
        raise ValueError(f"unknown aggregation {how!r}; valid: {', '.join(AGGREGATIONS)}")
    out[nonempty] = agg
    return out


class UncertaintySampling(Strategy):
    """Pick the images whose detections the model is least sure of (see the module doc).

    Args:
        aggregation: box-to-image rule: ``"max"``, ``"mean"``, ``"sum"`` or ``"topk_mean"``.
        topk: boxes averaged by ``"topk_mean"``.
        empty_score: score of an image with no boxes (0: confidently empty).
        min_score: boxes scoring below it are ignored. Default 0: the detector's own score
            threshold (e.g. torchvision's 0.05) has already dropped the clutter, and a
            low-score box with a background-heavy distribution scores low anyway.

    Raises:
        ConfigError: a parameter out of range.
    """

    kind: ClassVar[Kind]
    requires = frozenset({"predictions"})

    def __init__(
        self, *, aggregation: Aggregation = "max", topk: int = 3, empty_score: float = 0.0, min_score: float = 0.0
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"{self.name}: aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ConfigError(f"{self.name}: topk must be a positive integer, got {topk!r}")
        if isinstance(empty_score, bool) or not isinstance(empty_score, (int, float)) or not math.isfinite(empty_score):
            raise ConfigError(f"{self.name}: empty_score must be a finite number, got {empty_score!r}")
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0 <= min_score <= 1:
            raise ConfigError(f"{self.name}: min_score must be a number in [0, 1], got {min_score!r}")
        self.aggregation = aggregation
        self.topk = topk
        self.empty_score = float(empty_score)
        self.min_score = float(min_score)

    def select(self, context: SelectionContext, budget: int) -> Selection:
        n = check_budget(context, budget, self.requires)
        expected = context.num_classes + 1
        without_probs = 0
        for image_id in context.pool_ids:
            probs = context.predictions[image_id].probs
            if probs is None:
                without_probs += 1
            elif probs.shape[1] != expected:
                raise ConfigError(
                    f"predictions for image {image_id!r}: probs has {probs.shape[1]} columns, expected {expected} "
                    f"(background + the dataset's {context.num_classes} categories)"
                )
        scores = uncertainty_scores(
            context.predictions,
            context.pool_ids,
            self.kind,
            self.aggregation,
            topk=self.topk,
            empty_score=self.empty_score,
            min_score=self.min_score,
        )
        return select_top(context.pool_ids, scores, n, context.rng, {"images_without_probs": without_probs})


@register_strategy("uncertainty: 1 - max class probability per box (background included), aggregated per image")
class LeastConfidence(UncertaintySampling):
    """Least-confidence sampling, ``1 - max_k p_k`` per box.

    References:
        Lewis and Gale, "A Sequential Algorithm for Training Text Classifiers", SIGIR 1994.
    """

    name = "least_confidence"
    kind = "least_confidence"


@register_strategy("uncertainty: 1 - (best - second-best class probability) per box, aggregated per image")
class Margin(UncertaintySampling):
    """Margin sampling, ``1 - (p_(1) - p_(2))`` per box (higher = smaller margin).

    References:
        Scheffer, Decomain and Wrobel, "Active Hidden Markov Models for Information
        Extraction", IDA 2001; Brust et al., VISAPP 2019 ("1-vs-2" for detection).
    """

    name = "margin"
    kind = "margin"


@register_strategy("uncertainty: entropy of each box's class distribution, aggregated per image")
class Entropy(UncertaintySampling):
    """Entropy sampling, ``-sum_k p_k ln p_k`` per box.

    References:
        Settles, "Active Learning Literature Survey", 2009, section 3.1; Roy et al.,
        BMVC 2018; Haussmann et al., IEEE IV 2020.
    """

    name = "entropy"
    kind = "entropy"
