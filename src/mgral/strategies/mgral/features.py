"""Label-free features of candidate images: what the reward model and the agent read.

Per image, from the task detector's detections on the image and on its horizontal mirror:

* uncertainty statistics — max and mean entropy of the kept boxes' class distributions
  (background included, normalised by ``log(K + 1)``), the max score, the number of boxes
  over 0.3 and over 0.5;
* flip consistency — each box's best IoU with the mirrored view's boxes mapped back (score
  weighted mean), and ``1 - JS distance`` (the square root of the JS divergence, in bits)
  between the matched boxes' class distributions (1 when neither view finds anything, 0 when only one does);
* the predicted-class histogram (boxes over 0.3 per category);
* the pooled backbone embedding (kept apart: the compact vector uses a few principal
  components of it, fitted on the candidate pool).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

from mgral.data.records import Dataset, Detections, ImageId
from mgral.strategies._detection_math import box_iou, js_divergence, unflip_boxes

STAT_NAMES = (
    "max_entropy",
    "mean_entropy",
    "max_score",
    "boxes_over_0.3",
    "boxes_over_0.5",
    "flip_box_consistency",
    "flip_class_consistency",
)


@dataclass(frozen=True)
class Features:
    """The features stage's result: per image of ``ids`` (in order) its raw statistics
    (``stats``: :func:`feature_names` columns, :func:`raw_features`) and its pooled embedding."""

    ids: list[ImageId]
    stats: np.ndarray
    embeddings: np.ndarray

    def take(self, ids: Sequence[ImageId]) -> Features:
        """The rows of ``ids`` (a subset of these), in their order."""
        pos = {i: k for k, i in enumerate(self.ids)}
        rows = [pos[i] for i in ids]
        return Features(list(ids), self.stats[rows], self.embeddings[rows])


def feature_names(class_names: Sequence[str]) -> list[str]:
    return [*STAT_NAMES, *(f"class_hist[{n}]" for n in class_names)]


def _entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1) / np.log(probs.shape[1])


def flip_consistency(det: Detections, mirrored: Detections, width: float) -> tuple[float, float]:
    """(box, class) consistency between an image's detections and its mirror's, mapped back."""
    if len(det.boxes) == 0 and len(mirrored.boxes) == 0:
        return 1.0, 1.0
    if len(det.boxes) == 0 or len(mirrored.boxes) == 0:
        return 0.0, 0.0
    iou = box_iou(det.boxes, unflip_boxes(mirrored.boxes, width))
    best = iou.argmax(axis=1)
    weights = np.clip(det.scores, 1e-6, None)
    box = float(np.average(iou[np.arange(len(best)), best], weights=weights))
    if det.probs is None or mirrored.probs is None:
        return box, box
    distance = np.sqrt(js_divergence(det.probs, mirrored.probs[best], axis=1))  # Jensen-Shannon distance, bits
    return box, float(np.average(1.0 - distance, weights=weights))


def image_stats(det: Detections, mirrored: Detections, width: float, class_ids: Sequence[int]) -> np.ndarray:
    """The uncertainty statistics, flip consistency and class histogram of one image."""
    stats = np.zeros(len(STAT_NAMES) + len(class_ids))
    if len(det.boxes):
        if det.probs is not None:
            ent = _entropy(det.probs)
            stats[0], stats[1] = ent.max(), ent.mean()
        stats[2] = det.scores.max()
        stats[3], stats[4] = (det.scores > 0.3).sum(), (det.scores > 0.5).sum()
        confident = det.labels[det.scores > 0.3]
        for k, c in enumerate(class_ids):
            stats[len(STAT_NAMES) + k] = (confident == c).sum()
    stats[5], stats[6] = flip_consistency(det, mirrored, width)
    return stats


def raw_features(
    dataset: Dataset,
    ids: Sequence[ImageId],
    detections: Mapping[ImageId, Detections],
    mirrored: Mapping[ImageId, Detections],
) -> np.ndarray:
    """``[N, len(feature_names)]`` statistics of ``ids`` (rows in ``ids`` order)."""
    class_ids = [c.id for c in dataset.categories]
    return np.stack([image_stats(detections[i], mirrored[i], dataset[i].width, class_ids) for i in ids])


def compact_features(
    stats: np.ndarray,
    embeddings: np.ndarray,
    reference: np.ndarray,
    *,
    components: int,
    seed: int,
    stat_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Standardised ``[stats | PCA(embedding)]`` for every row; the z-scores and the PCA are
    fitted on the rows selected by the boolean mask ``reference`` (the candidate pool)."""
    parts = [stats]
    names = list(stat_names) if stat_names is not None else [f"stat{k}" for k in range(stats.shape[1])]
    n_comp = min(components, embeddings.shape[1], int(reference.sum()) - 1)
    if n_comp >= 1:
        pca = PCA(n_components=n_comp, random_state=seed).fit(embeddings[reference])
        parts.append(pca.transform(embeddings))
        names += [f"pc{k}" for k in range(n_comp)]
    x = np.concatenate(parts, axis=1)
    mean, std = x[reference].mean(axis=0), x[reference].std(axis=0)
    return (x - mean) / np.where(std > 1e-8, std, 1.0), names
