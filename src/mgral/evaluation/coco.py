"""COCO-style box mAP through faster-coco-eval (the C++ port of the official cocoapi).

Protocol: Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014, and the
cocoapi ``COCOeval`` (https://github.com/cocodataset/cocoapi): AP averaged over IoU
thresholds 0.50:0.05:0.95 and 101 recall points, at most 100 detections per image and
class, ``iscrowd`` ground truth ignored (a detection matched to it is neither TP nor FP),
area ranges small < 32² <= medium < 96² <= large (pixels², bounds inclusive as in
cocoapi).

We have no segmentations, so each ground-truth ``area`` (which decides its area range) is
its box's ``w * h``, as for detections. ``difficult`` is a VOC notion: cocoapi has none, so
difficult boxes count as ordinary ground truth here.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from mgral.evaluation._flat import Flat
from mgral.evaluation.result import EvalResult


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """faster-coco-eval's ``print_function``: it reports timings we do not want."""


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while one dict per box is built and indexed.

    The dicts hold no reference cycles (reference counting frees them), but their
    allocation triggers collections that re-scan every live object: on 500,000 boxes
    that costs a fifth of the whole evaluation.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def empty_result(names: list[str], *, num_images: int) -> EvalResult:
    """Every figure undefined: no images or no categories (pycocotools gives -1 throughout)."""
    return EvalResult.from_coco_stats([-1.0] * 12, dict.fromkeys(names, math.nan), num_images=num_images)


def to_coco_dicts(flat: Flat) -> tuple[dict[str, Any], dict[str, Any]]:
    """The flat view as faster-coco-eval's in-memory ground-truth and detection datasets.

    Annotation ids start at 1 (cocoapi uses id 0 to mean "unmatched"); the detection
    dataset is built directly rather than through ``COCO.loadRes``, which would add a
    polygon per box that bbox evaluation never reads.
    """
    images = [
        {"id": c, "width": w, "height": h} for c, (w, h) in zip(flat.codes.tolist(), flat.sizes.tolist(), strict=True)
    ]
    categories = [{"id": c, "name": n} for c, n in zip(flat.cat_ids.tolist(), flat.names, strict=True)]
    codes, cats = flat.codes, flat.cat_ids
    gt_anns = [
        {"id": n, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": k}
        for n, i, c, b, a, k in zip(
            range(1, len(flat.gt_img) + 1),
            codes[flat.gt_img].tolist(),
            cats[flat.gt_cls].tolist(),
            flat.gt_xywh.tolist(),
            flat.gt_area.tolist(),
            flat.gt_crowd.astype(np.int64).tolist(),
            strict=True,
        )
    ]
    dt_anns = [
        {"id": n, "image_id": i, "category_id": c, "bbox": b, "area": a, "score": s, "iscrowd": 0}
        for n, i, c, b, a, s in zip(
            range(1, len(flat.dt_img) + 1),
            codes[flat.dt_img].tolist(),
            cats[flat.dt_cls].tolist(),
            flat.dt_xywh.tolist(),
            flat.dt_area.tolist(),
            flat.dt_score.tolist(),
            strict=True,
        )
    ]
    gt = {"images": images, "categories": categories, "annotations": gt_anns}
    dt = {"images": list(images), "categories": [dict(c) for c in categories], "annotations": dt_anns}
    return gt, dt


def per_class_ap(precision: np.ndarray, names: list[str]) -> dict[str, float]:
    """Class name -> AP@[.5:.95] (area all, 100 detections) from cocoapi's ``precision``.

    ``precision`` is ``[T, R, K, A, M]``; a class without non-crowd ground truth has only
    ``-1`` entries and gets NaN.
    """
    out = {}
    for k, name in enumerate(names):
        s = precision[:, :, k, 0, -1]
        out[name] = float(np.mean(s[s > -1])) if (s > -1).any() else math.nan
    return out


def evaluate_coco(flat: Flat) -> EvalResult:
    """COCO box metrics of ``flat`` computed by faster-coco-eval's ``COCOeval_faster``."""
    if not flat.image_ids or not flat.num_classes:
        return empty_result(flat.names, num_images=len(flat.image_ids))
    with _gc_paused():
        gt_dict, dt_dict = to_coco_dicts(flat)
        coco_gt = COCO(gt_dict, print_function=_silent)
        coco_dt = COCO(dt_dict, print_function=_silent)
        engine = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=_silent)
        engine.params.imgIds = flat.codes.tolist()
        engine.evaluate()
        engine.accumulate()
        engine.summarize()
    return EvalResult.from_coco_stats(
        engine.stats, per_class_ap(np.asarray(engine.eval["precision"]), flat.names), num_images=len(flat.image_ids)
    )
