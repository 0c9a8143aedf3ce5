"""mAP of any subset (or multiset) of images without re-matching: active-learning and
bootstrap workloads evaluate thousands of subsets of one prediction set.

The matching pass runs once in the constructor (:func:`~mgral.evaluation.coco_subset.match_coco`
or :func:`~mgral.evaluation.voc.match_voc`); each subset then only re-accumulates. COCO
figures equal cocoapi's on the subset (``params.imgIds = subset``) to the last bits; an image with
weight ``w`` counts as ``w`` copies of its ground truth and detections.

Weights count each detection ``w`` times in a row. Physical copies with new image ids can
differ only where scores tie: cocoapi orders tied detections by image id, so a copy's tied
detections land after other images' (or, for a copy right after its original, after the
original's other tied detections of the same class). Without tied scores the two agree
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mgral.data.records import Dataset, Detections, ImageId
from mgral.errors import DatasetError
from mgral.evaluation._flat import check_predictions, check_style, evaluation_ids, flatten
from mgral.evaluation.coco import empty_result
from mgral.evaluation.coco_subset import IOU_THRS, CocoAccumulator, class_ap, match_coco, summarize
from mgral.evaluation.result import EvalResult
from mgral.evaluation.voc import match_voc, mean_defined, voc_class_ap


@dataclass(frozen=True)
class SubsetAP:
    """The mAP figures of one subset (what a bootstrap resample needs).

    Attributes:
        mAP: COCO AP@[.5:.95] / VOC AP@0.5; NaN when undefined.
        mAP50: AP at IoU 0.5 (equal to ``mAP`` for VOC).
        mAP75: COCO AP at IoU 0.75; None for VOC.
        per_class: float64 ``[K]`` per-class AP (as ``mAP``), aligned with
            :attr:`SubsetEvaluator.class_names`; NaN where the class has no ground truth.
    """

    mAP: float
    mAP50: float
    mAP75: float | None
    per_class: np.ndarray


def _nan(value: float) -> float:
    return math.nan if value == -1.0 else float(value)


class SubsetEvaluator:
    """Exact mAP of any subset of images of ``gt`` from one matching pass.

    Args:
        gt: the ground truth; all its images are matched.
        preds: image id -> detections (missing images have none).
        style: ``"coco"``, ``"voc07"`` or ``"voc12"``.

    Attributes:
        image_ids: the images in evaluation order (integer ids sorted; string ids in
            dataset order); a weight array is aligned with it.
        class_names: category names in category-id order (``per_class`` keys).

    Raises:
        DatasetError: as :func:`mgral.evaluation.evaluate`.
    """

    def __init__(self, gt: Dataset, preds: Mapping[ImageId, Detections], *, style: str = "coco") -> None:
        self.style = check_style(style)
        check_predictions(gt, preds)
        self.image_ids: list[ImageId] = evaluation_ids(gt, None)
        self._index = {image_id: n for n, image_id in enumerate(self.image_ids)}
        self._int_ids = (
            np.array(self.image_ids, dtype=np.int64) if all(type(i) is int for i in self.image_ids) else None
        )
        flat = flatten(gt, preds, self.image_ids)
        self.class_names: list[str] = flat.names
        if style == "coco":
            self._coco = CocoAccumulator(match_coco(flat))
        else:
            self._voc = match_voc(flat)

    # -- which images count how often --------------------------------------------------
    def weights(
        self, image_ids: Iterable[ImageId] | None = None, weights: Mapping[ImageId, int] | Sequence[int] | None = None
    ) -> np.ndarray:
        """int64 ``[len(image_ids)]``: how many times each image of :attr:`image_ids` counts.

        Args:
            image_ids: the images to count once each (duplicates collapse, as in
                cocoapi's ``imgIds``); None = all. Exclusive with ``weights``.
            weights: image id -> count (unlisted images count 0), or a sequence of counts
                aligned with :attr:`image_ids`. Counts are non-negative integers.

        Raises:
            DatasetError: an image id that is not in the ground truth.
            ValueError: both arguments, a sequence of the wrong length, a negative or
                non-integer count.
        """
        n = len(self.image_ids)
        if image_ids is not None and weights is not None:
            raise ValueError("pass image_ids or weights, not both (weights of 0 leave images out)")
        if weights is None:
            if image_ids is None:
                return np.ones(n, dtype=np.int64)
            w = np.zeros(n, dtype=np.int64)
            w[self._positions(image_ids)] = 1
            return w
        if isinstance(weights, Mapping):
            w = np.zeros(n, dtype=np.int64)
            for image_id, count in weights.items():
                w[self._position(image_id)] = self._count(count)
            return w
        arr = np.asarray(weights)
        if arr.shape != (n,):
            raise ValueError(f"weights: expected {n} counts aligned with image_ids, got shape {arr.shape}")
        if arr.size and (not np.issubdtype(arr.dtype, np.number) or (arr < 0).any() or (arr != np.round(arr)).any()):
            raise ValueError("weights: expected non-negative integer counts")
        return arr.astype(np.int64)

    def _positions(self, image_ids: Iterable[ImageId]) -> np.ndarray:
        """Indices into :attr:`image_ids`, by binary search where the ids are integers
        (sorted, as evaluation order) -- subset evaluations are called thousands of times."""
        ids = list(image_ids)
        if self._int_ids is not None and all(type(i) is int for i in ids):
            query = np.array(ids, dtype=np.int64)
            pos = np.minimum(np.searchsorted(self._int_ids, query), max(len(self._int_ids) - 1, 0))
            missing = np.flatnonzero(self._int_ids[pos] != query) if len(self._int_ids) else np.arange(len(ids))
            if len(missing):
                raise DatasetError(f"image {ids[missing[0]]!r} is not in the ground truth")
            return pos
        return np.array([self._position(i) for i in ids], dtype=np.int64)

    def _position(self, image_id: ImageId) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise DatasetError(f"image {image_id!r} is not in the ground truth") from None

    @staticmethod
    def _count(count: object) -> int:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"weights: expected a non-negative integer count, got {count!r}")
        return int(count)

    # -- figures -------------------------------------------------------------------------
    def evaluate(
        self,
        image_ids: Iterable[ImageId] | None = None,
        *,
        weights: Mapping[ImageId, int] | Sequence[int] | None = None,
    ) -> EvalResult:
        """All figures of the style on a subset (see :meth:`weights` for the arguments).

        COCO: the 12 cocoapi figures and per-class AP, equal to a fresh cocoapi evaluation
        of the subset. An empty subset has every figure undefined (NaN).
        """
        w = self.weights(image_ids, weights)
        num_images = int(w.sum())
        if self.style != "coco":
            per_class = voc_class_ap(self._voc, w, use_07_metric=self.style == "voc07")
            return EvalResult.from_voc(
                mean_defined(per_class), self._named(per_class), style=self.style, num_images=num_images
            )
        acc = self._coco
        if num_images == 0 or not self.class_names:
            return empty_result(self.class_names, num_images=num_images)
        det_w = acc.det_weights(w)
        npig = acc.npig(w)
        all_area, by_max_dets = acc.curves(w, det_w, npig, 0, max_dets=(1, 10))
        areas = [acc.curves(w, det_w, npig, a)[0] for a in (1, 2, 3)]
        p = all_area.precision
        stats = [
            summarize(p),
            summarize(p[np.where(IOU_THRS == 0.5)[0]]),
            summarize(p[np.where(IOU_THRS == 0.75)[0]]),
            *(summarize(c.precision) for c in areas),
            summarize(by_max_dets[1]),
            summarize(by_max_dets[10]),
            summarize(all_area.recall),
            *(summarize(c.recall) for c in areas),
        ]
        return EvalResult.from_coco_stats(stats, self._named(class_ap(p)), num_images=num_images)

    def average_precision(
        self,
        image_ids: Iterable[ImageId] | None = None,
        *,
        weights: Mapping[ImageId, int] | Sequence[int] | None = None,
    ) -> SubsetAP:
        """mAP, mAP50, mAP75 and per-class AP of a subset: the cheap part of :meth:`evaluate`
        (COCO: area range "all" and 100 detections only), with the same values."""
        return self._ap(self.weights(image_ids, weights))

    def _ap(self, w: np.ndarray) -> SubsetAP:
        if self.style != "coco":
            per_class = voc_class_ap(self._voc, w, use_07_metric=self.style == "voc07")
            m = mean_defined(per_class)
            return SubsetAP(mAP=m, mAP50=m, mAP75=None, per_class=per_class)
        acc = self._coco
        if not w.any() or not self.class_names:
            return SubsetAP(math.nan, math.nan, math.nan, np.full(len(self.class_names), math.nan))
        curves, _ = acc.curves(w, acc.det_weights(w), acc.npig(w), 0)
        p = curves.precision
        return SubsetAP(
            mAP=_nan(summarize(p)),
            mAP50=_nan(summarize(p[np.where(IOU_THRS == 0.5)[0]])),
            mAP75=_nan(summarize(p[np.where(IOU_THRS == 0.75)[0]])),
            per_class=class_ap(p),
        )

    def _named(self, per_class: np.ndarray) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.class_names, per_class, strict=True)}

    # -- uncertainty ----------------------------------------------------------------------
    def bootstrap(self, n: int, *, seed: int | np.random.Generator, confidence: float = 0.95) -> dict[str, Any]:
        """Percentile bootstrap confidence intervals of mAP and mAP50.

        Each of ``n`` resamples draws ``len(image_ids)`` images uniformly with replacement
        (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13); the
        interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles
        (numpy's linear interpolation) of the resampled figures. Resamples where a figure
        is undefined are left out of its interval.

        Args:
            n: number of resamples (>= 1).
            seed: an int seed or a ``numpy.random.Generator`` (consumed).
            confidence: in (0, 1).

        Returns:
            JSON-ready ``{"mAP": {...}, "mAP50": {...}, "n": n, "seed": seed or None}``; each
            figure ``{"estimate", "low", "high", "mean", "std", "confidence"}`` (None where
            undefined), ``estimate`` being the figure on all images.

        Raises:
            ValueError: ``n < 1`` or ``confidence`` outside (0, 1).
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"bootstrap: expected n >= 1 resamples, got {n!r}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"bootstrap: expected 0 < confidence < 1, got {confidence!r}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        size = len(self.image_ids)
        values = np.full((int(n), 2), math.nan)
        for b in range(int(n)):
            w = np.bincount(rng.integers(0, size, size=size), minlength=size) if size else np.zeros(0, np.int64)
            ap = self._ap(w)
            values[b] = ap.mAP, ap.mAP50
        full = self._ap(np.ones(size, dtype=np.int64))
        tail = 100.0 * (1.0 - confidence) / 2.0
        out: dict[str, Any] = {}
        for col, (name, estimate) in enumerate((("mAP", full.mAP), ("mAP50", full.mAP50))):
            v = values[:, col][~np.isnan(values[:, col])]
            low, high = np.percentile(v, [tail, 100.0 - tail]) if len(v) else (math.nan, math.nan)
            out[name] = {
                "estimate": _json(estimate),
                "low": _json(low),
                "high": _json(high),
                "mean": _json(np.mean(v)) if len(v) else None,
                "std": _json(np.std(v)) if len(v) else None,
                "confidence": confidence,
            }
        out["n"] = int(n)
        out["seed"] = int(seed) if isinstance(seed, (int, np.integer)) else None
        return out


def _json(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
