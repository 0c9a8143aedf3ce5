"""The figures an evaluation reports, and the one rule for figures that are undefined.

Rule (used by every style and by :class:`~mgral.evaluation.SubsetEvaluator`):

* A figure the style does not define (VOC has no mAP75, no area ranges, no AR) is ``None``
  in both the dataclass and :meth:`EvalResult.to_dict`.
* A figure the style defines but the data leaves undefined is ``float('nan')`` in the
  dataclass and ``None`` in :meth:`EvalResult.to_dict` (JSON has no NaN). pycocotools
  reports these as ``-1``: a class without ground truth, ``mAP_small`` when there are no
  small objects, every figure of an empty image set. VOC: a class without non-difficult
  ground truth (the devkit divides by ``npos = 0``).
* Means over classes skip undefined classes (pycocotools' ``s[s > -1]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

STYLES = ("coco", "voc07", "voc12")

COCO_FIGURES = (
    "mAP",
    "mAP50",
    "mAP75",
    "mAP_small",
    "mAP_medium",
    "mAP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)
"""The 12 COCO summary figures, in pycocotools' ``stats`` order."""


def undefined_to_nan(value: float) -> float:
    """pycocotools' ``-1`` (undefined) -> NaN; any other value as a Python float."""
    value = float(value)
    return math.nan if value == -1.0 else value


def _json_float(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return float(value)


@dataclass(frozen=True)
class EvalResult:
    """Detection metrics of one evaluation (all values in [0, 1]).

    Attributes:
        mAP: COCO: AP averaged over IoU 0.50:0.05:0.95, 101 recall points, all areas,
            100 detections per image and class. VOC: AP at IoU 0.5 (same as ``mAP50``).
        mAP50, mAP75: COCO AP at IoU 0.50 / 0.75 (``mAP75`` is None for VOC).
        mAP_small, mAP_medium, mAP_large: COCO AP over objects of area < 32², 32²..96²,
            > 96² pixels² (None for VOC).
        AR1, AR10, AR100: COCO recall with at most 1 / 10 / 100 detections per image and
            class, averaged over IoU 0.50:0.95 and classes (None for VOC).
        AR_small, AR_medium, AR_large: COCO AR100 by object area (None for VOC).
        per_class: category name -> AP (COCO: AP@[.5:.95]; VOC: AP@0.5), in category id
            order; NaN for a class without (non-ignored) ground truth.
        style: ``"coco"``, ``"voc07"`` or ``"voc12"``.
        num_images: images evaluated (a bootstrap weight of 2 counts twice).

    NaN means "undefined for this data" and None "not defined by this style"; see the
    module docstring.
    """

    mAP: float
    mAP50: float
    mAP75: float | None
    mAP_small: float | None
    mAP_medium: float | None
    mAP_large: float | None
    AR1: float | None
    AR10: float | None
    AR100: float | None
    AR_small: float | None
    AR_medium: float | None
    AR_large: float | None
    per_class: dict[str, float] = field(default_factory=dict)
    style: str = "coco"
    num_images: int = 0

    @classmethod
    def from_coco_stats(cls, stats: Any, per_class: dict[str, float], *, num_images: int) -> EvalResult:
        """Build from pycocotools' 12 ``COCOeval.stats`` (``-1`` -> NaN)."""
        values = [undefined_to_nan(s) for s in stats]
        if len(values) != len(COCO_FIGURES):
            raise ValueError(f"expected {len(COCO_FIGURES)} COCO stats, got {len(values)}")
        figures = dict(zip(COCO_FIGURES, values, strict=True))
        return cls(**figures, per_class=per_class, style="coco", num_images=num_images)

    @classmethod
    def from_voc(cls, mean_ap: float, per_class: dict[str, float], *, style: str, num_images: int) -> EvalResult:
        """Build a VOC result: ``mAP = mAP50`` = VOC AP at IoU 0.5; COCO-only figures None."""
        rest = dict.fromkeys(COCO_FIGURES[2:])
        return cls(mAP=mean_ap, mAP50=mean_ap, **rest, per_class=per_class, style=style, num_images=num_images)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the 12 figures, ``per_class``, ``style``, ``num_images``; NaN -> None."""
        out: dict[str, Any] = {name: _json_float(getattr(self, name)) for name in COCO_FIGURES}
        out["per_class"] = {name: _json_float(ap) for name, ap in self.per_class.items()}
        out["style"] = self.style
        out["num_images"] = self.num_images
        return out
