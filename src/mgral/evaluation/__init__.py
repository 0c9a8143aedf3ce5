"""Detection metrics: COCO mAP (through faster-coco-eval), PASCAL VOC07 / VOC12 AP, exact
mAP of any subset of images (:class:`SubsetEvaluator`) and COCO-format prediction files.

References: Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014 and the
cocoapi; Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010
and its devkit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mgral.data.records import Dataset, Detections, ImageId
from mgral.evaluation._flat import check_predictions, check_style, evaluation_ids, flatten
from mgral.evaluation.coco import evaluate_coco
from mgral.evaluation.predictions import read_predictions, write_predictions
from mgral.evaluation.result import EvalResult
from mgral.evaluation.subset import SubsetAP, SubsetEvaluator
from mgral.evaluation.voc import evaluate_voc


def evaluate(
    gt: Dataset,
    preds: Mapping[ImageId, Detections],
    *,
    style: str = "coco",
    image_ids: Iterable[ImageId] | None = None,
) -> EvalResult:
    """mAP of ``preds`` against ``gt``.

    Args:
        gt: ground truth (boxes xyxy in pixels; ``iscrowd`` used by COCO, ``difficult``
            by VOC).
        preds: image id -> detections; an image without an entry has no detections.
        style: ``"coco"`` (faster-coco-eval, cocoapi's protocol), ``"voc07"`` (11-point)
            or ``"voc12"`` (all-point) AP at IoU 0.5.
        image_ids: evaluate only these images of ``gt`` (duplicates collapse); None = all.

    Returns:
        The figures of the style; NaN where the data leaves a figure undefined, None where
        the style has no such figure (see :mod:`mgral.evaluation.result`).

    Raises:
        DatasetError: a prediction for an image not in ``gt``, a prediction label that is
            not a ``gt`` category id, a non-finite box or score, an ``image_ids`` entry
            not in ``gt``.
        ValueError: an unknown style.
    """
    check_style(style)
    check_predictions(gt, preds)
    flat = flatten(gt, preds, evaluation_ids(gt, image_ids))
    if style == "coco":
        return evaluate_coco(flat)
    mean_ap, per_class = evaluate_voc(flat, use_07_metric=style == "voc07")
    return EvalResult.from_voc(
        mean_ap,
        {name: float(ap) for name, ap in zip(flat.names, per_class, strict=True)},
        style=style,
        num_images=len(flat.image_ids),
    )


__all__ = [
    "EvalResult",
    "SubsetAP",
    "SubsetEvaluator",
    "evaluate",
    "read_predictions",
    "write_predictions",
]
