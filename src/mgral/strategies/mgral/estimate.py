"""MGRAL's label-free gain estimate: what labeling a candidate batch would add to the mAP,
without its labels, from head-only surrogates on cached features (issue 19, steps 3 and 4).

**Labels in expectation.** The paper's informativeness is the expected model output change;
the expectation is over the batch's unknown labels. Labeling ``j`` of a candidate image is
drawn from the task detector's own predictive distribution: each proposal that produced
detections draws one class from its class distribution (background included), and its
detection of that class, if it has one, becomes a label. Each detection is thus kept with
probability equal to its score (FCOS: to its class probability; its score also weighs in
centerness), and one proposal never gives two labels. The draw is seeded
by ``(seed, image id, j)``: an image's labelings do not depend on the batch around it, and the
global random generators are neither read nor changed. A label's features are those of the
proposal its box was regressed from (:func:`mgral.detectors.heads.head_detections`); a dense
(FCOS) head needs none, and there "proposal" is the location a box was regressed from.

**Cross-fitting.** The labeled set ``L`` is split into ``K`` seeded folds. For fold ``k``, a
control head is fine-tuned on ``L`` minus fold ``k`` and a surrogate head on the same plus
the batch with labeling ``j``; both predict fold ``k`` only. Pooling the folds' predictions
scores every labeled image with heads that never trained on it, and the mAP is taken over
all of ``L`` (not a few held-out images). The gain of labeling ``j`` is pooled surrogate mAP
minus pooled control mAP; the estimate is its mean over the labelings, with a paired
bootstrap standard error over the images of ``L`` (the same resamples for the control and
every labeling, fixed by ``seed``: batches are compared on common resamples).

What cross-fitting does not remove: every head starts from the task detector's box
predictor and reads features of its trunk, both trained on all of ``L``; control and
surrogates share that start, so it shifts both.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mgral.data.records import Dataset, ImageId
from mgral.detectors.heads import (
    HeadCache,
    HeadDetections,
    HeadInputs,
    finetune_head,
    head_detections,
    predict_from_cache,
    with_labels,
)
from mgral.errors import ConfigError
from mgral.evaluation import SubsetEvaluator


@dataclass(frozen=True, eq=False)
class GainEstimate:
    """A batch's estimated mAP gain on the cross-fitted labeled set.

    Attributes:
        gain: mean over labelings of (pooled mAP with the batch) - (pooled control mAP).
        se: bootstrap standard error of ``gain`` over the labeled images (paired resamples).
        gains: the gain of each labeling.
        control_mAP: pooled mAP of the control heads.
        resampled: float64 ``[J, R]``: each labeling's gain on each bootstrap resample; the
            resamples are the estimator's, shared by all batches, so two batches' estimates
            can be compared pairwise (NaN where a resample leaves the mAP undefined).
    """

    gain: float
    se: float
    gains: tuple[float, ...]
    control_mAP: float
    resampled: np.ndarray


def paired_se(a: GainEstimate, b: GainEstimate) -> float:
    """Bootstrap standard error of ``a.gain - b.gain``: both estimated by one estimator, on
    common resamples of the labeled images (NaN with fewer than two usable resamples)."""
    diff = np.nanmean(a.resampled, axis=0) - np.nanmean(b.resampled, axis=0)
    return float(np.nanstd(diff, ddof=1)) if np.isfinite(diff).sum() > 1 else float("nan")


def sample_labeling(detections: HeadDetections, rng: np.random.Generator) -> np.ndarray:
    """Indices of the detections kept as labels in one labeling (sorted, int64).

    Each distinct proposal (``detections.rows``) draws a class from its distribution
    (``detections.probs``, background first); its detection of that class is kept. A
    detection is therefore kept with probability equal to its score.
    """
    rows = detections.rows.numpy()
    if len(rows) == 0:
        return np.zeros(0, np.int64)
    unique, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    cdf = np.cumsum(detections.probs.numpy()[first].astype(np.float64), axis=1)
    cdf /= cdf[:, -1:]
    drawn = (rng.random(len(unique))[:, None] >= cdf[:, :-1]).sum(axis=1)
    return np.flatnonzero(detections.labels.numpy() == drawn[inverse]).astype(np.int64)


def labeling_seed(seed: int, image_id: ImageId, j: int) -> list[int]:
    """The entropy of labeling ``j`` of ``image_id``: a function of those three only."""
    return [int(seed), zlib.crc32(json.dumps(image_id).encode()), int(j)]


def cross_fit_folds(labeled: Sequence[ImageId], folds: int, seed: int) -> list[list[ImageId]]:
    """``labeled`` split into ``folds`` seeded folds of (nearly) equal size, each in ``labeled``'s order.

    Raises:
        ConfigError: fewer than 2 folds, or more folds than images.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= len(labeled):
        raise ConfigError(f"cross-fitting needs 2 <= folds <= {len(labeled)} (the labeled images), got {folds!r}")
    position = np.random.default_rng([int(seed), 1]).permutation(len(labeled))
    return [[labeled[n] for n in sorted(part)] for part in np.array_split(position, folds)]


class CrossFitGain:
    """Label-free gain estimates of candidate batches for one AL state.

    Fits the ``K`` control heads once, on first use; :meth:`estimate` costs ``labelings * folds`` head
    fine-tunes per batch.

    Args:
        detector: the task detector (a Faster R-CNN or FCOS ``TorchvisionDetector``).
        cache: head inputs of the labeled images (with their labels) and of every candidate.
        dataset: the ground truth of the labeled images.
        labeled: ``L``; folds: ``K``; labelings: ``J``; seed: folds, labelings, the heads'
            RoI samples and the bootstrap resamples.
        resamples: bootstrap resamples of the standard error.
        train: head fine-tune settings (``mgral.detectors.heads.HEAD_TRAIN_DEFAULTS`` keys).

    Raises:
        ConfigError: bad folds or labelings, an image missing from the cache or without labels.
    """

    def __init__(
        self,
        detector: Any,
        cache: HeadCache,
        dataset: Dataset,
        labeled: Sequence[ImageId],
        *,
        folds: int = 3,
        labelings: int = 2,
        seed: int = 0,
        resamples: int = 200,
        train: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(labelings, bool) or not isinstance(labelings, int) or labelings < 1:
            raise ConfigError(f"labelings must be an integer >= 1, got {labelings!r}")
        self.detector, self.cache, self.labelings, self.seed = detector, cache, labelings, seed
        self.train = dict(train or {})
        self.labeled = list(labeled)
        self.folds = cross_fit_folds(self.labeled, folds, seed)
        self._gt = dataset.subset(self.labeled)
        self._detections: dict[ImageId, HeadDetections] = {}
        size = len(self._gt.image_ids())
        rng = np.random.default_rng([int(seed), 2])
        self._weights = [np.bincount(rng.integers(0, size, size), minlength=size) for _ in range(resamples)]

    @property
    def control_mAP(self) -> float:
        """Pooled mAP of the control heads on ``L`` (fits them on first use)."""
        return float(self._control[0])

    @functools.cached_property
    def _control(self) -> np.ndarray:
        """The control heads' :meth:`_scores` (fitted on first use)."""
        return self._scores(self._evaluator({}))

    def _evaluator(self, extra: Mapping[ImageId, HeadInputs]) -> SubsetEvaluator:
        """Pooled predictions on ``L``: fold ``k`` by a head fine-tuned on the other folds plus ``extra``."""
        cache = {**self.cache, **extra}
        preds = {}
        for fold in self.folds:
            held_out = set(fold)
            train = [i for i in self.labeled if i not in held_out] + list(extra)
            head, _ = finetune_head(self.detector, cache, train, seed=self.seed, **self.train)
            preds.update(predict_from_cache(self.detector, cache, fold, predictor=head))
        return SubsetEvaluator(self._gt, preds)

    def _scores(self, evaluator: SubsetEvaluator) -> np.ndarray:
        """mAP on all of ``L``, then on each bootstrap resample: float64 ``[1 + resamples]``."""
        return np.array(
            [evaluator.average_precision().mAP] + [evaluator.average_precision(weights=w).mAP for w in self._weights]
        )

    def labeling(self, image_id: ImageId, j: int) -> HeadInputs:
        """``image_id``'s cached inputs with labeling ``j`` as its labels."""
        if image_id not in self._detections:
            self._detections.update(head_detections(self.detector, self.cache, [image_id]))
        det = self._detections[image_id]
        keep = sample_labeling(det, np.random.default_rng(labeling_seed(self.seed, image_id, j)))
        return with_labels(self.cache[image_id], det.boxes[keep], det.labels[keep], det.rows[keep])

    def estimate(self, batch: Sequence[ImageId]) -> GainEstimate:
        """The label-free gain of labeling ``batch`` (its ``labelings`` sampled labelings).

        Raises:
            ConfigError: a batch image that is labeled already or not in the cache.
        """
        overlap = set(batch) & set(self.labeled)
        if overlap:
            raise ConfigError(f"batch image {next(iter(overlap))!r} is labeled already; candidates come from the pool")
        return self.gain([{i: self.labeling(i, j) for i in batch} for j in range(self.labelings)])

    def gain(self, labelings: Sequence[Mapping[ImageId, HeadInputs]]) -> GainEstimate:
        """The gain of adding images with given labels (one mapping per labeling, e.g. the
        true labels for an oracle figure), averaged over the labelings."""
        control = self._control
        scores = np.stack([self._scores(self._evaluator(lab)) for lab in labelings]) - control
        mean = scores.mean(axis=0)
        return GainEstimate(
            gain=float(mean[0]),
            se=float(np.nanstd(mean[1:], ddof=1)) if len(mean) > 2 else float("nan"),
            gains=tuple(float(g) for g in scores[:, 0]),
            control_mAP=float(control[0]),
            resampled=scores[:, 1:],
        )
