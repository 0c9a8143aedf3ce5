"""Validation of predictions against ground truth, and the flat arrays every style reads.

Every evaluator works on the same flat view: all ground-truth boxes and all detections of
the evaluated images concatenated in *evaluation order* (the order pycocotools visits
images: sorted integer ids), each row carrying its image index and class index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from mgral.data.records import Dataset, Detections, ImageId
from mgral.errors import DatasetError
from mgral.evaluation.result import STYLES


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown evaluation style {style!r}; expected one of {', '.join(STYLES)}")
    return style


def image_codes(gt: Dataset) -> dict[ImageId, int]:
    """Image id -> the integer id the COCO engines see.

    Integer ids are kept (so ties between equal scores break in pycocotools' order, by
    image id); a dataset with any string id (VOC / YOLO file stems) is numbered 1, 2, ...
    in dataset order.
    """
    ids = list(gt.images)
    if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        return {i: int(i) for i in ids}
    return {i: n + 1 for n, i in enumerate(ids)}


def class_names(gt: Dataset) -> tuple[np.ndarray, list[str]]:
    """Category ids sorted (pycocotools' ``catIds`` order) and their display names.

    A name shared by several categories gets its id appended so ``per_class`` keys stay
    unique.
    """
    cats = sorted(gt.categories, key=lambda c: c.id)
    counts: dict[str, int] = {}
    for c in cats:
        counts[c.name] = counts.get(c.name, 0) + 1
    names = [c.name if counts[c.name] == 1 else f"{c.name} (id {c.id})" for c in cats]
    return np.array([c.id for c in cats], dtype=np.int64), names


def check_predictions(gt: Dataset, preds: Mapping[ImageId, Detections]) -> None:
    """Refuse predictions that cannot be evaluated against ``gt``.

    Raises:
        DatasetError: a prediction for an image id that is not in ``gt``; a label that is
            not one of ``gt``'s category ids; a non-finite box coordinate or score.
    """
    cat_ids = {c.id for c in gt.categories}
    known = sorted(cat_ids)
    for image_id, det in preds.items():
        if image_id not in gt:
            raise DatasetError(
                f"predictions for image {image_id!r}, which is not in the ground truth "
                f"({len(gt)} images); expected predictions keyed by the ground truth's image ids"
            )
        labels = np.asarray(det.labels)
        if len(labels):
            bad = [int(v) for v in np.unique(labels) if int(v) not in cat_ids]
            if bad:
                shown = ", ".join(map(str, known[:20])) + (", ..." if len(known) > 20 else "")
                raise DatasetError(
                    f"predictions for image {image_id!r}: label {bad[0]} is not a ground-truth category id; "
                    f"expected one of [{shown}]"
                )
        if not (np.isfinite(det.boxes).all() and np.isfinite(det.scores).all()):
            raise DatasetError(
                f"predictions for image {image_id!r}: non-finite box coordinate or score; expected finite numbers"
            )


def evaluation_ids(gt: Dataset, image_ids: Iterable[ImageId] | None) -> list[ImageId]:
    """The images to evaluate, deduplicated, in evaluation order (by engine id).

    Raises:
        DatasetError: an id of ``image_ids`` is not in ``gt``.
    """
    codes = image_codes(gt)
    if image_ids is None:
        ids = list(gt.images)
    else:
        ids = []
        seen: set[ImageId] = set()
        for i in image_ids:
            if i not in codes:
                raise DatasetError(f"image_ids: image {i!r} is not in the ground truth")
            if i not in seen:
                seen.add(i)
                ids.append(i)
    return sorted(ids, key=codes.__getitem__)


def xywh_area(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """xyxy ``[N, 4]`` -> float64 COCO ``[x, y, w, h]`` and area ``w * h`` (pixels²).

    Every engine gets the boxes through this one conversion so that all of them compute
    bit-identical IoUs and areas.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    xywh = np.empty_like(b)
    xywh[:, :2] = b[:, :2]
    xywh[:, 2:] = b[:, 2:] - b[:, :2]
    return xywh, xywh[:, 2] * xywh[:, 3]


@dataclass
class Flat:
    """Ground truth and detections of the evaluated images, concatenated.

    Images are in evaluation order; within an image, boxes keep their dataset order and
    detections their prediction order. ``*_img`` index ``image_ids``; ``*_cls`` index
    ``cat_ids`` (sorted category ids). Boxes are float64, both COCO ``xywh`` (the COCO
    engines) and ``xyxy`` (VOC); areas ``w * h`` in pixels².
    """

    image_ids: list[ImageId]
    codes: np.ndarray  # int64 [I] engine ids
    sizes: np.ndarray  # int64 [I, 2] width, height
    cat_ids: np.ndarray  # int64 [K]
    names: list[str]  # [K]
    gt_img: np.ndarray  # int64 [G]
    gt_cls: np.ndarray  # int64 [G]
    gt_xywh: np.ndarray  # float64 [G, 4]
    gt_xyxy: np.ndarray  # float64 [G, 4]
    gt_area: np.ndarray  # float64 [G]
    gt_crowd: np.ndarray  # bool [G]
    gt_difficult: np.ndarray  # bool [G]
    dt_img: np.ndarray  # int64 [D]
    dt_cls: np.ndarray  # int64 [D]
    dt_xywh: np.ndarray  # float64 [D, 4]
    dt_xyxy: np.ndarray  # float64 [D, 4]
    dt_area: np.ndarray  # float64 [D]
    dt_score: np.ndarray  # float64 [D]

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)


def _concat(parts: list[np.ndarray], dtype: type, width: int | None = None) -> np.ndarray:
    if parts:
        return np.concatenate(parts).astype(dtype, copy=False)
    return np.zeros((0,) if width is None else (0, width), dtype=dtype)


def flatten(gt: Dataset, preds: Mapping[ImageId, Detections], image_ids: list[ImageId]) -> Flat:
    """Concatenate ``image_ids``' ground truth and predictions (already validated)."""
    cat_ids, names = class_names(gt)
    codes = image_codes(gt)
    g_box, g_lab, g_crowd, g_diff, g_n = [], [], [], [], []
    d_box, d_lab, d_score, d_n = [], [], [], []
    sizes = np.zeros((len(image_ids), 2), dtype=np.int64)
    for n, image_id in enumerate(image_ids):
        rec = gt.images[image_id]
        sizes[n] = rec.width, rec.height
        t = rec.target
        g_box.append(t.boxes)
        g_lab.append(t.labels)
        g_crowd.append(t.iscrowd)
        g_diff.append(t.difficult)
        g_n.append(len(t))
        det = preds.get(image_id)
        if det is not None and len(det):
            d_box.append(det.boxes)
            d_lab.append(det.labels)
            d_score.append(det.scores)
            d_n.append(len(det))
        else:
            d_n.append(0)
    gt_labels = _concat(g_lab, np.int64)
    if not np.isin(gt_labels, cat_ids).all():
        bad = int(gt_labels[~np.isin(gt_labels, cat_ids)][0])
        raise DatasetError(f"ground truth has a box labelled {bad}, which is not one of its category ids")
    gt_xyxy = _concat(g_box, np.float32, 4).astype(np.float64)
    dt_xyxy = _concat(d_box, np.float32, 4).astype(np.float64)
    gt_xywh, gt_area = xywh_area(gt_xyxy)
    dt_xywh, dt_area = xywh_area(dt_xyxy)
    image_index = np.arange(len(image_ids), dtype=np.int64)
    return Flat(
        image_ids=list(image_ids),
        codes=np.array([codes[i] for i in image_ids], dtype=np.int64),
        sizes=sizes,
        cat_ids=cat_ids,
        names=names,
        gt_img=np.repeat(image_index, g_n),
        gt_cls=np.searchsorted(cat_ids, gt_labels),
        gt_xywh=gt_xywh,
        gt_xyxy=gt_xyxy,
        gt_area=gt_area,
        gt_crowd=_concat(g_crowd, bool),
        gt_difficult=_concat(g_diff, bool),
        dt_img=np.repeat(image_index, d_n),
        dt_cls=np.searchsorted(cat_ids, _concat(d_lab, np.int64)),
        dt_xywh=dt_xywh,
        dt_xyxy=dt_xyxy,
        dt_area=dt_area,
        dt_score=_concat(d_score, np.float32).astype(np.float64),
    )
