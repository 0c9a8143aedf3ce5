"""A classical digit detector: segmentation proposals + a scikit-learn classifier.

The honest baseline of the demo until the CNN detectors exist; no deep learning. Built for
the built-in digits scenes (:mod:`mgral.data.synth`) but assumes nothing about them beyond
"objects contrast with their local background".

1. Proposals: each image is compared with an estimate of its local background (a median
   filter at a scale larger than ink strokes, computed on a downsampled image), the
   per-pixel contrast is thresholded at several multiples of its Otsu threshold, and the
   connected components (as found, and after joining pieces a few pixels apart) give
   boxes, filtered by the box sizes seen in training.
2. Classification: each box's contrast crop, resized to a small square, is described by
   its pixels and a histogram of oriented gradients per cell, plus its shape; a
   multinomial logistic regression over ``background + classes`` is trained on the
   ground-truth boxes, proposals matching them (IoU >= 0.5) and proposals matching none
   (IoU < 0.3, the background class).
3. Each proposal yields one detection per class whose probability is at least
   ``min_score``; class-wise non-maximum suppression removes duplicates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mgral.data.records import Dataset, Detections, ImageId

_DOWNSAMPLE = 4


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 ``[len(a), len(b)]`` IoU of xyxy boxes ``a [N, 4]`` and ``b [M, 4]``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return (inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes greedy non-maximum suppression keeps, best score first.

    A dozen lines of numpy rather than ``torchvision.ops.nms``, so the baseline does not
    import torch.
    """
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, order = order[0], order[1:]
        keep.append(i)
        order = order[box_iou(boxes[i : i + 1], boxes[order])[0] <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """The threshold maximizing the between-class variance of ``values`` (Otsu, 1979)."""
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1]
    w1 = hist.sum() - w0
    m0 = np.cumsum(hist * centers)[:-1]
    mu0, mu1 = m0 / np.maximum(w0, 1), (m0[-1] + hist[-1] * centers[-1] - m0) / np.maximum(w1, 1)
    return float(edges[1:-1][np.argmax(w0 * w1 * (mu0 - mu1) ** 2)])


def contrast_map(image: np.ndarray, *, window: int = 36) -> np.ndarray:
    """float32 ``[H, W]``: how far each pixel's colour is from its local background.

    ``image`` is uint8 ``[H, W, 3]``. The background is a per-channel median over
    ``window x window`` pixels (on a 4x downsampled copy, for speed): wide enough that
    the ink of a digit is a minority in it.
    """
    rgb = image.astype(np.float32)
    h, w = rgb.shape[:2]
    small = np.asarray(Image.fromarray(image).reduce(_DOWNSAMPLE), dtype=np.float32)
    size = max(1, round(window / _DOWNSAMPLE)) | 1
    background = ndimage.median_filter(small, size=(size, size, 1), mode="nearest")
    zoom = (h / background.shape[0], w / background.shape[1], 1)
    background = ndimage.zoom(background, zoom, order=1, mode="nearest", grid_mode=True)[:h, :w]
    contrast = np.linalg.norm(rgb - background, axis=2)
    return ndimage.gaussian_filter(contrast, 1.0)


def propose(contrast: np.ndarray, *, levels: Sequence[float], join: int) -> np.ndarray:
    """float32 ``[P, 4]`` xyxy boxes of the connected components of ``contrast`` above
    ``level x Otsu`` for each level, both as they are and after joining pieces up to
    ``join`` pixels apart."""
    base = otsu_threshold(contrast)
    structure = np.ones((3, 3), dtype=bool)
    boxes = []
    for level in levels:
        mask = contrast > base * level
        for grown in (mask, ndimage.binary_dilation(mask, structure, iterations=join)):
            labels, _ = ndimage.label(grown, structure)
            if grown is not mask:
                labels = labels * mask  # box the original pixels of each joined group
            for sl in ndimage.find_objects(labels):
                if sl is not None:
                    boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    if not boxes:
        return np.zeros((0, 4), dtype=np.float32)
    return np.unique(np.asarray(boxes, dtype=np.float32), axis=0)


def _hog(patch: np.ndarray, cells: int, bins: int) -> np.ndarray:
    gy, gx = np.gradient(patch)
    magnitude = np.hypot(gx, gy)
    orientation = ((np.arctan2(gy, gx) % np.pi) / np.pi * bins).astype(int) % bins
    size = patch.shape[0] // cells
    cell = (np.arange(patch.shape[0]) // size)[:, None] * cells + (np.arange(patch.shape[1]) // size)[None, :]
    hist = np.bincount((cell * bins + orientation).ravel(), magnitude.ravel(), minlength=cells * cells * bins)
    return hist / (np.linalg.norm(hist) + 1e-6)


def features(contrast: np.ndarray, boxes: np.ndarray, *, patch: int = 16) -> np.ndarray:
    """float32 ``[P, F]`` features of each box's contrast crop (pixels, gradient histograms, shape)."""
    rows = []
    height, width = contrast.shape
    for x1, y1, x2, y2 in boxes:
        # Integer pixels covering the box, at least one, inside the image.
        x1, y1 = min(max(int(np.floor(x1)), 0), width - 1), min(max(int(np.floor(y1)), 0), height - 1)
        x2, y2 = min(max(int(np.ceil(x2)), x1 + 1), width), min(max(int(np.ceil(y2)), y1 + 1), height)
        crop = contrast[y1:y2, x1:x2]
        small = np.asarray(Image.fromarray(crop).resize((patch, patch), Image.Resampling.BILINEAR))
        small = small / (small.max() + 1e-6)
        w, h = x2 - x1, y2 - y1
        shape = [np.log(w / h), h / contrast.shape[0], float((crop > crop.mean()).mean())]
        rows.append(np.concatenate([small.ravel(), _hog(small, 4, 8), shape]))
    return np.asarray(rows, dtype=np.float32).reshape(len(boxes), -1)


class ClassicalDigitDetector:
    """Region proposals from image segmentation + a scikit-learn classifier on the crops.

    Args:
        seed: seeds the background subsampling and the classifier.
        levels: multiples of the Otsu threshold the proposals are cut at.
        join: pieces up to this many pixels apart also form one proposal.
        window: side in pixels of the median filter that estimates the local background.
        background_per_image: at most this many background proposals per training image.
        min_score: lowest class probability reported as a detection.
        nms_iou: class-wise non-maximum suppression threshold.
        max_detections: per image, best scores first.
        C: inverse L2 regularization strength of the logistic regression.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        levels: Sequence[float] = (0.7, 1.0, 1.5, 2.2),
        join: int = 2,
        window: int = 36,
        background_per_image: int = 20,
        min_score: float = 0.05,
        nms_iou: float = 0.5,
        max_detections: int = 100,
        C: float = 0.03,
    ) -> None:
        self.seed = seed
        self.levels = tuple(levels)
        self.join = join
        self.window = window
        self.background_per_image = background_per_image
        self.min_score = min_score
        self.nms_iou = nms_iou
        self.max_detections = max_detections
        self.C = C
        self.category_ids_: np.ndarray | None = None

    def _proposals(self, dataset: Dataset, image_id: ImageId) -> tuple[np.ndarray, np.ndarray]:
        """The image's contrast map and its proposals of plausible digit size."""
        with Image.open(dataset.image_path(image_id)) as im:
            contrast = contrast_map(np.asarray(im.convert("RGB")), window=self.window)
        boxes = propose(contrast, levels=self.levels, join=self.join)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        low, high = self.height_range_
        return contrast, boxes[(h >= low) & (h <= high) & (w >= 2) & (w <= 1.5 * h)]

    def fit(self, dataset: Dataset, image_ids: Sequence[ImageId]) -> ClassicalDigitDetector:
        """Train on the ground truth of ``image_ids`` (reads their image files).

        Raises:
            ValueError: the images hold no boxes.
        """
        rng = np.random.default_rng(self.seed)
        heights = np.concatenate([dataset[i].target.boxes[:, 3] - dataset[i].target.boxes[:, 1] for i in image_ids])
        if heights.size == 0:
            raise ValueError("ClassicalDigitDetector.fit: the training images hold no boxes")
        self.height_range_ = (0.7 * float(heights.min()), 1.3 * float(heights.max()))
        # Classifier classes: 0 is background, 1 + i is category_ids_[i] (a dataset may
        # well have a category with id 0).
        self.category_ids_ = np.asarray([c.id for c in dataset.categories], dtype=np.int64)
        index = {int(c): i + 1 for i, c in enumerate(self.category_ids_)}
        xs, ys = [], []
        for image_id in image_ids:
            target = dataset[image_id].target
            gt_classes = np.asarray([index[int(c)] for c in target.labels], dtype=np.int64)
            contrast, boxes = self._proposals(dataset, image_id)
            classes = np.zeros(len(boxes), dtype=np.int64)
            if len(target) and len(boxes):
                iou = box_iou(boxes, target.boxes)
                best = iou.max(axis=1)
                classes = np.where(best >= 0.5, gt_classes[iou.argmax(axis=1)], -1)  # -1: ambiguous, unused
                classes[best < 0.3] = 0
            background = np.flatnonzero(classes == 0)
            if len(background) > self.background_per_image:
                background = rng.choice(background, self.background_per_image, replace=False)
            keep = np.sort(np.concatenate([np.flatnonzero(classes > 0), background]))
            xs.append(features(contrast, np.concatenate([boxes[keep], target.boxes])))
            ys.append(np.concatenate([classes[keep], gt_classes]))
        self.model_ = make_pipeline(
            StandardScaler(), LogisticRegression(C=self.C, tol=1e-3, max_iter=500, random_state=self.seed)
        )
        self.model_.fit(np.concatenate(xs), np.concatenate(ys))
        return self

    def predict(self, dataset: Dataset, image_ids: Sequence[ImageId]) -> dict[ImageId, Detections]:
        """Detections for each of ``image_ids``: boxes float32 ``[N, 4]`` xyxy pixels,
        scores float32 ``[N]`` (class probabilities, best first), labels int64 ``[N]``
        category ids.

        Raises:
            RuntimeError: ``fit`` was not called.
        """
        if self.category_ids_ is None:
            raise RuntimeError("ClassicalDigitDetector.predict: call fit() first")
        return {image_id: self._detect(*self._proposals(dataset, image_id)) for image_id in image_ids}

    def _detect(self, contrast: np.ndarray, boxes: np.ndarray) -> Detections:
        if not len(boxes):
            return Detections()
        probs = self.model_.predict_proba(features(contrast, boxes))
        classes = self.model_.classes_
        probs[:, classes == 0] = 0.0
        rows, cols = np.nonzero(probs >= self.min_score)
        boxes, scores, labels = boxes[rows], probs[rows, cols], self.category_ids_[classes[cols] - 1]
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        kept = np.concatenate(
            [np.zeros(0, dtype=np.int64)] + [g[nms(boxes[g], scores[g], self.nms_iou)] for g in groups]
        )
        kept = kept[np.argsort(-scores[kept], kind="stable")][: self.max_detections]
        return Detections(boxes[kept], scores[kept], labels[kept])
