"""PASCAL VOC AP at IoU 0.5: VOC2007's 11-point and VOC2010+'s all-point (area) AP.

Reference: Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV
2010, and the devkit's ``VOCevaldet.m`` / its Python port ``voc_eval.py``
(py-faster-rcnn). Hand-written because no installed library implements the VOC protocol
(faster-coco-eval implements COCO's).

Per class, detections of all images in descending score order, ties broken stably (as the
MATLAB devkit's ``sort``) by image -- integer ids ascending, string ids in dataset order --
then prediction order. Each detection takes the ground truth of its image and class with
the highest IoU (the first on ties, already matched or not); if that IoU is ``> 0.5``
(strictly: the devkit's ``ovmax > ovthresh``), difficult ground truth makes the detection
neither TP nor FP, otherwise the first detection to take the ground truth is a TP and later
ones are FPs; IoU ``<= 0.5`` -> FP. ``npos`` counts the non-difficult ground truth. Ground
truth marked ``iscrowd`` is ignored like ``difficult``.

Boxes: mgral's continuous pixel frame (VOC's 1-based inclusive ``xmin..xmax`` is stored as
``[xmin - 1, xmax]``), so the plain IoU here equals the devkit's ``+1`` IoU on its integer
corners.

VOC07 AP: mean over recall thresholds ``np.arange(0., 1.1, 0.1)`` (the Python devkit's
values, e.g. 0.30000000000000004) of the max precision at recall >= t. VOC12 AP: area
under the monotone precision envelope. A class without non-difficult ground truth has
undefined AP (NaN; the devkit divides by ``npos = 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mgral.evaluation._flat import Flat

IOU_THRESHOLD = 0.5
_FP, _TP, _IGNORED = 0, 1, 2
_VOC07_RECALLS = np.arange(0.0, 1.1, 0.1)


def voc_iou(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Element-wise IoU of xyxy boxes ``d[i]``, ``g[i]`` (float64 ``[N, 4]``), devkit order."""
    iw = np.maximum(np.minimum(g[:, 2], d[:, 2]) - np.maximum(g[:, 0], d[:, 0]), 0.0)
    ih = np.maximum(np.minimum(g[:, 3], d[:, 3]) - np.maximum(g[:, 1], d[:, 1]), 0.0)
    inters = iw * ih
    uni = (d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inters
    with np.errstate(divide="ignore", invalid="ignore"):
        return inters / uni


@dataclass
class VocMatches:
    """Every detection's VOC outcome, in accumulation order (class, then score order).

    Attributes:
        det_img: int64 ``[N]`` image index; det_out: int8 ``[N]`` 0 FP, 1 TP, 2 ignored.
        cls_start: int64 ``[K + 1]`` where each class's detections start.
        pos_img, pos_cls, pos_count: per (image, class) with non-difficult ground truth.
    """

    num_images: int
    num_classes: int
    det_img: np.ndarray
    det_out: np.ndarray
    cls_start: np.ndarray
    pos_img: np.ndarray
    pos_cls: np.ndarray
    pos_count: np.ndarray


def match_voc(flat: Flat) -> VocMatches:
    """The devkit's matching for every class at once.

    A detection's outcome depends only on its own image (``R['det']`` is per image) and on
    the earlier detections of that image, so all images and classes are matched together:
    each detection's target is its max-IoU ground truth, and the first detection in score
    order to target a non-difficult one is its TP.
    """
    k_num = flat.num_classes
    nd = len(flat.dt_img)
    order = np.lexsort((np.arange(nd), flat.dt_img, -flat.dt_score, flat.dt_cls))
    img, cls, box = flat.dt_img[order], flat.dt_cls[order], flat.dt_xyxy[order]
    pair = img * k_num + cls

    ng = len(flat.gt_img)
    g = np.lexsort((np.arange(ng), flat.gt_cls, flat.gt_img))
    g_pair = flat.gt_img[g] * k_num + flat.gt_cls[g]
    g_box = flat.gt_xyxy[g]
    g_ignored = flat.gt_difficult[g] | flat.gt_crowd[g]
    g_first = np.searchsorted(g_pair, pair, side="left")
    g_num = np.searchsorted(g_pair, pair, side="right") - g_first

    out = np.full(nd, _FP, dtype=np.int8)
    di = np.flatnonzero(g_num > 0)
    if len(di):
        counts = g_num[di]
        block = np.cumsum(counts) - counts
        owner = np.repeat(np.arange(len(di)), counts)
        local = np.arange(int(counts.sum())) - block[owner]
        iou = voc_iou(box[di][owner], g_box[g_first[di][owner] + local])
        ovmax = np.maximum.reduceat(iou, block)
        # np.argmax: the first ground truth with the max IoU
        jmax = np.minimum.reduceat(np.where(iou == ovmax[owner], local, np.iinfo(np.int64).max), block)
        hit = ovmax > IOU_THRESHOLD
        target = g_first[di[hit]] + jmax[hit]
        det = di[hit]
        ign = g_ignored[target]
        out[det[ign]] = _IGNORED
        # detections are in score order, so the first claim of a ground truth is its TP
        _, first = np.unique(target[~ign], return_index=True)
        out[det[~ign][first]] = _TP

    g_regular = ~(flat.gt_difficult | flat.gt_crowd)
    key = flat.gt_img[g_regular] * k_num + flat.gt_cls[g_regular]
    ukey, ucount = np.unique(key, return_counts=True)
    return VocMatches(
        num_images=len(flat.image_ids),
        num_classes=k_num,
        det_img=img,
        det_out=out,
        cls_start=np.searchsorted(cls, np.arange(k_num + 1)),
        pos_img=ukey // max(k_num, 1),
        pos_cls=ukey % max(k_num, 1),
        pos_count=ucount,
    )


def voc_ap(rec: np.ndarray, prec: np.ndarray, *, use_07_metric: bool) -> float:
    """The devkit's ``voc_ap``: 11-point interpolated (VOC07) or area under the envelope."""
    if use_07_metric:
        ap = 0.0
        for t in _VOC07_RECALLS:
            p = float(np.max(prec[rec >= t])) if np.any(rec >= t) else 0.0
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_class_ap(matches: VocMatches, weights: np.ndarray, *, use_07_metric: bool) -> np.ndarray:
    """float64 ``[K]`` AP@0.5 per class (NaN without non-difficult ground truth).

    Args:
        weights: int64 ``[I]`` how many times each image counts (0 = left out); a weight
            of 2 is the same as the image's ground truth and detections appearing twice.
    """
    m = matches
    npos = np.bincount(m.pos_cls, weights=weights[m.pos_img] * m.pos_count, minlength=m.num_classes)
    det_w = weights[m.det_img]
    out = np.full(m.num_classes, math.nan)
    for k in range(m.num_classes):
        if npos[k] == 0:
            continue
        s, e = m.cls_start[k], m.cls_start[k + 1]
        w, o = det_w[s:e], m.det_out[s:e]
        # ignored detections and left-out images change neither tp nor fp: drop them
        keep = (w > 0) & (o != _IGNORED)
        w, o = w[keep], o[keep]
        tp = np.cumsum(w * (o == _TP)).astype(np.float64)
        fp = np.cumsum(w * (o == _FP)).astype(np.float64)
        rec = tp / float(npos[k])
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        out[k] = voc_ap(rec, prec, use_07_metric=use_07_metric)
    return out


def evaluate_voc(flat: Flat, *, use_07_metric: bool) -> tuple[float, np.ndarray]:
    """VOC mAP and per-class AP of ``flat`` (every image once).

    Returns:
        (mean AP over classes with non-difficult ground truth, NaN if none; ``[K]`` APs).
    """
    per_class = voc_class_ap(match_voc(flat), np.ones(len(flat.image_ids), dtype=np.int64), use_07_metric=use_07_metric)
    return mean_defined(per_class), per_class


def mean_defined(values: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    defined = values[~np.isnan(values)]
    return float(np.mean(defined)) if len(defined) else math.nan
