"""CALD: consistency between the detections on an image and on augmented views of it,
then class-distribution diversity against the labeled set.

Stage 1 (consistency). The detector predicts every pool image again under each view
(``views``: horizontal flip, a 0.8 rescale, a colour change of brightness, contrast and
saturation by 1.5); the view's boxes are mapped back to the original image (``x -> W - x``
for the flip, divided by the scale factor for the rescale). Each original box ``j`` (score
``s_j``, class distribution ``p_j``) is matched to the view's box ``m`` of largest IoU, and

    c_j = IoU(b_j, b_m) + 1/2 (s_j + s_m) (1 - JS(p_j, p_m))        (in [0, 2])

(JS in bits, so ``1 - JS`` is in ``[0, 1]``; identical detections give ``c_j = 1 + s_j``).
A view's consistency is ``min_j |c_j - base_point|`` and the image's is the mean over
views; an image without boxes, or a view without boxes, counts as consistency 0 (most
informative), as in the official code. The stage-1 score is ``2 - consistency`` (higher =
more informative). ``base_point`` (the official code's ``bp``, 1.3) makes the boxes whose
consistency is near it the informative ones: low-score clutter (``c`` near 0) and stable
confident boxes (``c`` near 2) both count as consistent. ``base_point=0`` gives the plain
rule "the least consistent box decides".

Stage 2 (class diversity). The ``ceil(candidate_ratio * budget)`` best images of stage 1
are ordered greedily: each step picks the candidate whose predicted class distribution
(per class, the highest box score, averaged over the original and the views, then
normalized; uniform for an image without boxes) is farthest, in JS divergence, from the
labeled set's class distribution (box counts per category of ``context.labeled_ids``);
the pick is then added to the labeled distribution as one average labeled image (the
mean number of boxes per labeled image, spread over classes by its predicted
distribution). The selection's scores are these JS divergences at pick time.

Departures from the paper and the official code (``we1pingyu/CALD``, ``cald_train.py``):

* any detector with ``predict(..., augment=...)``, e.g. this project's single-stage FCOS;
  the paper used Faster R-CNN and RetinaNet.
* views: flip, 0.8 rescale and colour change; the official default is flip, cutout,
  0.8 rescale and a 5 degree rotation (cutout is random, rotation needs a box warp).
* the view's boxes are mapped back to the original image instead of the original boxes
  forward into the view (the same IoU for flips and uniform rescales).
* JS in bits rather than nats; ``s`` is the box's detection score (the official code
  uses the model's highest class probability, ``prob_max``); all boxes of the original
  are matched (the official code subsamples 50 when an image has more than 40).
* stage 2 normalizes the class vectors and label counts instead of the official code's
  softmax over them, treats an image without boxes as a uniform distribution (the
  official code takes such images first), and updates the labeled distribution after
  each pick as the paper describes (the official code leaves that update commented out).

References:
    Yu, Zhu, Yang and Chen, "Consistency-based Active Learning for Object Detection",
    CVPR 2022 Workshops (L3D-IVU); arXiv:2103.10374.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from mgral.data.records import Dataset, Detections, ImageId
from mgral.errors import ConfigError
from mgral.strategies._detection_math import (
    FlatDetections,
    box_columns,
    box_iou,
    canonical_order,
    category_columns,
    check_number,
    flatten_detections,
    hflip,
    js_divergence,
    ordered_map,
    unflip_boxes,
)
from mgral.strategies.base import Selection, SelectionContext, Strategy, check_budget, register_strategy, select_top

SCALE = 0.8
"""Rescale factor of the ``"scale"`` view (the official code's ``smaller_resize``)."""
COLOR_FACTOR = 1.5
"""Brightness, contrast and saturation factor of the ``"color"`` view (official ``ColorAdjust(1.5)``)."""


def _scaled_size(width: int, height: int) -> tuple[int, int]:
    return max(1, round(width * SCALE)), max(1, round(height * SCALE))


def _unflip(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    return unflip_boxes(boxes, width)


def _scale(image: torch.Tensor) -> torch.Tensor:
    w, h = _scaled_size(image.shape[-1], image.shape[-2])
    return F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]


def _unscale(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    w, h = _scaled_size(width, height)
    return boxes * np.array([width / w, height / h, width / w, height / h], dtype=boxes.dtype)


def _color(image: torch.Tensor) -> torch.Tensor:
    image = TF.adjust_brightness(image, COLOR_FACTOR)
    image = TF.adjust_contrast(image, COLOR_FACTOR)
    return TF.adjust_saturation(image, COLOR_FACTOR)


def _same(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    return boxes


@dataclass(frozen=True)
class View:
    """A test-time view: ``augment`` maps the image ``[3, H, W]`` to the view; ``unmap`` maps
    the view's boxes ``[N, 4]`` back to the original image of ``width x height`` pixels."""

    augment: Callable[[torch.Tensor], torch.Tensor]
    unmap: Callable[[np.ndarray, int, int], np.ndarray]


VIEWS: dict[str, View] = {
    "flip": View(hflip, _unflip),
    "scale": View(_scale, _unscale),
    "color": View(_color, _same),
}


def box_consistency(
    ref_boxes: np.ndarray,
    ref_scores: np.ndarray,
    ref_probs: np.ndarray,
    aug_boxes: np.ndarray,
    aug_scores: np.ndarray,
    aug_probs: np.ndarray,
) -> np.ndarray:
    """Consistency ``c_j`` in ``[0, 2]`` of each original box with its best match in a view.

    ``c_j = IoU(b_j, b_m) + (s_j + s_m) / 2 * (1 - JS(p_j, p_m))``, ``m`` the view's box of
    largest IoU with ``b_j`` (boxes in the same coordinates; JS in bits). A view without
    boxes gives 0 for every box.

    Returns:
        float64 ``[N]`` (``N`` original boxes).
    """
    n = len(ref_boxes)
    if n == 0 or len(aug_boxes) == 0:
        return np.zeros(n)
    iou = box_iou(ref_boxes, aug_boxes)
    m = iou.argmax(axis=1)
    rows = np.arange(n)
    similar = 1.0 - js_divergence(ref_probs, np.asarray(aug_probs, dtype=np.float64)[m])
    scores = 0.5 * (np.asarray(ref_scores, dtype=np.float64) + np.asarray(aug_scores, dtype=np.float64)[m])
    return iou[rows, m] + scores * similar


def view_consistency(values: np.ndarray, base_point: float) -> float:
    """One view's consistency from its box values ``c_j``: ``min_j |c_j - base_point|`` (0 when
    there are no boxes; :class:`Cald` also scores a view without boxes 0)."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.abs(v - base_point).min()) if v.size else 0.0


def view_consistencies(ref: FlatDetections, aug: FlatDetections, base_point: float, max_pairs: int = 1 << 18):
    """:func:`view_consistency` of :func:`box_consistency` for every image at once, float64 ``[P]``.

    Args:
        ref: each image's original boxes (those to match; ``probs`` required).
        aug: each image's view boxes, already mapped back to the original image.
        base_point: ``beta``.
        max_pairs: most (original box, view box) pairs, padding included, held at once.

    Equal, image for image, to the per-image functions (the same float64 operations on the
    same numbers; the first view box of largest IoU is the match, as ``argmax`` takes it);
    an image with no box on either side gets 0. Images are processed in blocks of similar
    box counts, padded to the block's largest, on the run's threads (:func:`ordered_map`).
    """
    out = np.zeros(len(ref.counts))
    live = np.flatnonzero((ref.counts > 0) & (aug.counts > 0))
    if not live.size:
        return out
    live = live[np.lexsort((aug.counts[live], ref.counts[live]))]
    nr_all, na_all = ref.counts[live], aug.counts[live]
    ref_start, aug_start = ref.starts[live], aug.starts[live]
    r_cols = [ref.boxes[:, j].astype(np.float64) for j in range(4)]  # float64, as box_iou computes
    a_cols = [aug.boxes[:, j].astype(np.float64) for j in range(4)]
    r_area = (r_cols[2] - r_cols[0]) * (r_cols[3] - r_cols[1])
    a_area = (a_cols[2] - a_cols[0]) * (a_cols[3] - a_cols[1])
    ref_scores, aug_scores = ref.scores.astype(np.float64), aug.scores.astype(np.float64)
    # the bounds below need every JS to be a number: finite, non-negative rows with a positive entry
    exact_bounds = _js_defined(ref.probs) and _js_defined(aug.probs)
    spans, lo = [], 0
    while lo < live.size:
        window = slice(lo, lo + 4096)  # sorted by box count: the block's padded size is count x running max
        cost = np.arange(1, len(nr_all[window]) + 1) * nr_all[window] * np.maximum.accumulate(na_all[window])
        hi = lo + max(1, int(np.searchsorted(cost, max_pairs, side="right")))
        spans.append(slice(lo, hi))
        lo = hi

    def block(span: slice) -> np.ndarray:  # the consistency of the images live[span]
        nr, na, rs, as_ = nr_all[span], na_all[span], ref_start[span], aug_start[span]
        ri, ai = np.arange(int(nr.max())), np.arange(int(na.max()))
        r_ok, a_ok = ri < nr[:, None], ai < na[:, None]
        r_idx = np.where(r_ok, rs[:, None] + ri, rs[:, None])  # padding repeats a real box, masked below
        a_idx = np.where(a_ok, as_[:, None] + ai, as_[:, None])
        rx1, ry1, rx2, ry2 = (c[r_idx][:, :, None] for c in r_cols)
        # padded view boxes are (0, 0, 0, 0): IoU 0 (or 0/0 -> 0), after every real box, so argmax
        # (the first of the largest; a real IoU is >= 0) never takes one
        ax1, ay1, ax2, ay2 = (np.where(a_ok, c[a_idx], 0.0)[:, None, :] for c in a_cols)
        w = np.minimum(rx2, ax2)
        w -= np.maximum(rx1, ax1)
        h = np.minimum(ry2, ay2)
        h -= np.maximum(ry1, ay1)
        np.maximum(w, 0.0, out=w)
        np.maximum(h, 0.0, out=h)
        w *= h  # the intersection
        union = r_area[r_idx][:, :, None] + np.where(a_ok, a_area[a_idx], 0.0)[:, None, :]
        union -= w
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.divide(w, union, out=w)
        if not np.isfinite(iou).all():
            np.nan_to_num(iou, nan=0.0, copy=False)
        m = iou.argmax(axis=2)
        best = np.take_along_axis(iou, m[:, :, None], axis=2)[:, :, 0][r_ok]
        rows, m = r_idx[r_ok], (as_[:, None] + m)[r_ok]
        scores = 0.5 * (ref_scores[rows] + aug_scores[m])
        starts = np.cumsum(nr) - nr
        if exact_bounds and np.isfinite(scores).all():
            # c = best + scores * similar with similar in [0, 1], so (rounding being monotone) the
            # computed c lies in [best, best + scores]. Each image's box of the tightest bound is
            # computed first; a box bound to land farther from base_point than it cannot be the
            # minimum, and its JS is skipped.
            low, high = best - base_point, (best + scores) - base_point
            floor = np.where(low > 0, low, np.where(high < 0, -high, 0.0))
            ceiling = np.maximum(np.abs(low), np.abs(high))
            at = np.arange(len(rows))
            first = np.minimum.reduceat(
                np.where(ceiling == np.repeat(np.minimum.reduceat(ceiling, starts), nr), at, len(at)), starts
            )
            probe = _consistency_values(
                ref.probs, aug.probs, rows[first], m[first], best[first], scores[first], base_point
            )
            need = floor <= np.repeat(probe, nr)
            rows, m, best, scores = rows[need], m[need], best[need], scores[need]
            kept = np.add.reduceat(need, starts)
            starts = np.cumsum(kept) - kept
        values = _consistency_values(ref.probs, aug.probs, rows, m, best, scores, base_point)
        return np.minimum.reduceat(values, starts)

    for span, values in zip(spans, ordered_map(block, spans, len(spans)), strict=True):
        out[live[span]] = values
    return out


def _js_defined(probs: np.ndarray) -> bool:
    """Whether every row is finite, non-negative and has a positive entry (its JS is a number)."""
    if not len(probs):
        return True
    if not probs.min() >= 0:  # NaN fails too
        return False
    sums = probs @ np.ones(probs.shape[1], dtype=probs.dtype)  # of non-negative entries: > 0 iff one is
    return bool((sums > 0).all() and np.isfinite(sums).all())


def _consistency_values(ref_probs, aug_probs, rows, m, best, scores, base_point) -> np.ndarray:
    """``|c - base_point|`` of the original boxes ``rows`` matched to the view boxes ``m``."""
    similar = 1.0 - js_divergence(ref_probs[rows].astype(np.float64), aug_probs[m].astype(np.float64))
    return np.abs((best + scores * similar) - base_point)


def class_vectors(flat: FlatDetections, num_classes: int, min_score: float) -> np.ndarray:
    """float64 ``[P, K]``: :func:`class_vector` of every image of ``flat``."""
    out = np.zeros((len(flat.counts), num_classes))
    keep = flat.scores >= min_score
    np.maximum.at(out, (flat.image[keep], flat.cols[keep] - 1), flat.scores[keep].astype(np.float64))
    return out


def class_vector(det: Detections, columns: dict[int, int], image_id: ImageId, min_score: float) -> np.ndarray:
    """float64 ``[K]``: per category, the highest score of a box of it (0 where none)."""
    out = np.zeros(len(columns))
    keep = det.scores >= min_score
    if keep.any():
        np.maximum.at(out, box_columns(det, columns, image_id)[keep] - 1, det.scores[keep].astype(np.float64))
    return out


def labeled_class_counts(dataset: Dataset, labeled_ids: Sequence[ImageId], columns: dict[int, int]) -> np.ndarray:
    """float64 ``[K]``: boxes per category over the labeled images (labels of other ids ignored)."""
    counts = np.zeros(len(columns))
    for image_id in labeled_ids:
        cols = [columns[int(label)] - 1 for label in dataset[image_id].target.labels if int(label) in columns]
        np.add.at(counts, cols, 1.0)
    return counts


def class_diversity_order(
    class_vectors: np.ndarray, labeled_counts: np.ndarray, per_image: float, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy order of ``n`` candidates by JS divergence from the labeled class distribution.

    Args:
        class_vectors: ``[M, K]`` non-negative per-candidate class evidence (normalized
            here; an all-zero row counts as uniform).
        labeled_counts: ``[K]`` labeled boxes per class (uniform when all zero).
        per_image: mass one pick adds to the labeled counts (spread by its distribution).
        n: picks, ``1 <= n <= M``.
        rng: breaks ties.

    Returns:
        ``(indices, divergences)``: int64 ``[n]`` rows in pick order and float64 ``[n]`` each
        pick's JS divergence (bits) from the labeled distribution when picked.
    """
    v = np.asarray(class_vectors, dtype=np.float64)
    k = v.shape[1]
    total = v.sum(axis=1, keepdims=True)
    q = np.where(total > 0, v / np.where(total > 0, total, 1.0), 1.0 / k)
    counts = np.asarray(labeled_counts, dtype=np.float64).copy()
    perm = rng.permutation(len(q))  # argmax takes the first of equals: a random permutation breaks ties
    q = q[perm]
    free = np.ones(len(q), dtype=bool)
    picked, div = np.empty(n, dtype=np.int64), np.empty(n)
    for t in range(n):
        p = counts / counts.sum() if counts.sum() > 0 else np.full(k, 1.0 / k)
        js = np.where(free, js_divergence(q, p[None, :]), -np.inf)
        i = int(np.argmax(js))
        picked[t], div[t], free[i] = i, js[i], False
        counts += per_image * q[i]
    return perm[picked], div


@register_strategy("CALD: detection consistency under flip/scale/colour views, then class diversity vs labeled")
class Cald(Strategy):
    """Consistency-based active learning for detection (see the module doc).

    Args:
        views: test-time views, any of ``"flip"``, ``"scale"``, ``"color"`` (default all).
        base_point: ``beta`` of ``|c - beta|`` in ``[0, 2]`` (official code: 1.3; 0 ranks by
            the least consistent box).
        candidate_ratio: stage 2 orders the ``ceil(candidate_ratio * budget)`` best images
            of stage 1 (official code: 1.2), at least 1.
        min_score: original boxes scoring below it are not matched, and boxes below it do
            not count in the class vectors (0: every box the detector kept).

    Raises:
        ConfigError: a parameter out of range.
    """

    name = "cald"
    requires = frozenset({"predictions", "detector"})
    detector_needs = frozenset({"augment"})
    selection_cost = 1.0  # three passes over the pool: 0.3 (digits) to 1.1 (BCCD) trainings measured

    def workload(self, *, labeled: int, unlabeled: int, budget: int) -> tuple[float, float]:
        return 0.0, float(len(self.views) * unlabeled)  # the pool predicted again under each view

    def __init__(
        self,
        *,
        views: Sequence[str] = ("flip", "scale", "color"),
        base_point: float = 1.3,
        candidate_ratio: float = 1.2,
        min_score: float = 0.0,
    ) -> None:
        if isinstance(views, str) or not isinstance(views, Sequence) or not views:
            raise ConfigError(f"cald: views must be a non-empty list of {', '.join(VIEWS)}, got {views!r}")
        unknown = [v for v in views if v not in VIEWS]
        if unknown or len(set(views)) != len(views):
            raise ConfigError(
                f"cald: views must be distinct names among {', '.join(VIEWS)}, got {list(views)!r}"
                + (f" ({unknown[0]!r} is unknown)" if unknown else " (a view is repeated)")
            )
        self.views = tuple(views)
        self.base_point = check_number("cald", "base_point", base_point, 0.0, 2.0)
        self.candidate_ratio = check_number("cald", "candidate_ratio", candidate_ratio, 1.0)
        self.min_score = check_number("cald", "min_score", min_score, 0.0, 1.0)

    def select(self, context: SelectionContext, budget: int) -> Selection:
        n = check_budget(context, budget, self.requires)
        pool, dataset = canonical_order(context.pool_ids), context.dataset  # pool order never matters
        columns = category_columns(dataset.categories)
        ref = flatten_detections([context.predictions[i] for i in pool], pool, columns)
        keep = ref.scores >= self.min_score
        kept = (
            ref
            if keep.all()
            else FlatDetections(
                np.bincount(ref.image[keep], minlength=len(pool)),
                ref.boxes[keep],
                ref.scores[keep],
                ref.cols[keep],
                ref.probs[keep],
            )
        )
        vectors = class_vectors(ref, len(columns), self.min_score)
        sizes = np.array([(dataset[i].width, dataset[i].height) for i in pool], dtype=np.int64).reshape(-1, 2)
        kinds = np.unique(sizes, axis=0, return_inverse=True) if len(sizes) else (np.zeros((0, 2)), None)
        consistency = np.zeros((len(pool), len(self.views)))
        nothing = Detections()
        for v, view_name in enumerate(self.views):
            view = VIEWS[view_name]
            name = f"CALD view {v + 1}/{len(self.views)} ({view_name})"
            outs = context.detector.predict(
                dataset, pool, embeddings=False, augment=view.augment, progress=context.progress and name
            )
            aug = flatten_detections([outs.get(i, nothing) for i in pool], pool, columns)
            vectors = vectors + class_vectors(aug, len(columns), self.min_score)
            consistency[:, v] = view_consistencies(kept, _unmapped(aug, view, kinds), self.base_point)
        scores = 2.0 - consistency.mean(axis=1)
        m = min(len(pool), max(n, math.ceil(self.candidate_ratio * n - 1e-9)))
        candidates = select_top(pool, scores, m, context.rng)
        index = {image_id: k for k, image_id in enumerate(pool)}
        rows = np.array([index[i] for i in candidates.image_ids], dtype=np.int64)
        counts = labeled_class_counts(dataset, context.labeled_ids, columns)
        per_image = counts.sum() / len(context.labeled_ids) if counts.sum() > 0 else 1.0
        order, div = class_diversity_order(vectors[rows] / (1 + len(self.views)), counts, per_image, n, context.rng)
        info = {
            "candidates": m,
            "views": list(self.views),
            "mean_consistency": float(consistency.mean()),
            "labeled_boxes": int(counts.sum()),
        }
        return Selection([pool[r] for r in rows[order]], div.tolist(), info)


def _unmapped(aug: FlatDetections, view: View, kinds: tuple[np.ndarray, np.ndarray | None]) -> FlatDetections:
    """``aug`` with its boxes mapped back to the original images, one ``unmap`` call per image size
    (the maps work box by box). ``kinds``: the distinct ``(width, height)`` ``[S, 2]`` and each
    image's row of them (``np.unique(sizes, axis=0, return_inverse=True)``)."""
    kinds, which = kinds
    if len(kinds) == 1:  # one image size: all boxes at once
        boxes = view.unmap(aug.boxes, int(kinds[0, 0]), int(kinds[0, 1]))
    else:
        boxes = aug.boxes.copy()
        box_kind = np.repeat(np.asarray(which).reshape(-1), aug.counts)
        for k, (w, h) in enumerate(kinds):
            at = box_kind == k
            boxes[at] = view.unmap(aug.boxes[at], int(w), int(h))
    return FlatDetections(aug.counts, boxes, aug.scores, aug.cols, aug.probs)
