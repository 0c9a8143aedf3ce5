"""PASCAL VOC07 / VOC12 AP against a straightforward loop port of the devkit's voc_eval."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from evalkit import Workload, assert_same_per_class, make_workload, reference_voc

from mgral.data.coco import read
from mgral.data.records import Category, Dataset, Detections, ImageRecord, Target
from mgral.evaluation import SubsetEvaluator, evaluate


@pytest.mark.parametrize("style", ["voc07", "voc12"])
@pytest.mark.parametrize(
    "seed,cfg",
    [
        (0, Workload()),
        (1, Workload(tie_levels=4, p_difficult=0.3)),
        (2, Workload(str_ids=True, p_crowded=0.4, tie_levels=9)),
        (3, Workload(images=40, classes=12, classes_without_gt=3, p_crowd=0.2)),
    ],
)
def test_random_workloads_match_the_devkit_loop(seed: int, cfg: Workload, style: str) -> None:
    gt, preds = make_workload(seed, cfg)
    use_07 = style == "voc07"
    result = evaluate(gt, preds, style=style)
    ref = reference_voc(gt, preds, use_07)
    assert_same_per_class(result.per_class, ref)
    defined = [v for v in ref.values() if not math.isnan(v)]
    assert result.mAP == pytest.approx(np.mean(defined), abs=1e-12)
    assert result.mAP50 == result.mAP
    assert result.mAP75 is None and result.AR100 is None and result.style == style
    assert_same_per_class(SubsetEvaluator(gt, preds, style=style).evaluate().per_class, ref)


def _one_box(det_boxes: list, scores: list, difficult: bool = False, gt_boxes: list | None = None) -> tuple:
    gt_boxes = gt_boxes or [[0, 0, 10, 10]]
    gt = Dataset(
        "/x",
        [Category(1, "a")],
        [
            ImageRecord(
                "im",
                "im.jpg",
                100,
                100,
                target=Target(boxes=gt_boxes, labels=[1] * len(gt_boxes), difficult=[difficult] * len(gt_boxes)),
            )
        ],
    )
    preds = {"im": Detections(boxes=det_boxes, scores=scores, labels=[1] * len(det_boxes))}
    return gt, preds


def test_iou_of_exactly_one_half_is_not_a_match_for_voc_but_is_for_coco() -> None:
    gt, preds = _one_box([[0, 0, 10, 5]], [0.9])  # IoU = 50 / 100
    assert evaluate(gt, preds, style="voc12").mAP == 0.0
    assert evaluate(gt, preds, style="coco").mAP50 == pytest.approx(1.0)


def test_duplicates_are_false_positives_and_difficult_is_ignored() -> None:
    gt, preds = _one_box([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8])
    assert evaluate(gt, preds, style="voc12").mAP == pytest.approx(1.0)  # FP after full recall
    gt, preds = _one_box([[0, 0, 10, 10], [2, 0, 12, 10]], [0.8, 0.9])
    r = evaluate(gt, preds, style="voc07")
    assert r.mAP == pytest.approx(1.0)  # the higher-scored detection is the TP, in any input order
    gt, preds = _one_box([[0, 0, 10, 10]], [0.9], difficult=True)
    r = evaluate(gt, preds, style="voc12")
    assert math.isnan(r.mAP) and math.isnan(r.per_class["a"]) and r.to_dict()["mAP"] is None


def test_a_detection_takes_its_best_ground_truth_even_when_already_taken() -> None:
    # both detections overlap GT 0 most; the second is an FP although GT 1 is free (devkit)
    gt, preds = _one_box([[0, 0, 10, 10], [1, 0, 11, 10]], [0.9, 0.8], gt_boxes=[[0, 0, 10, 10], [3, 0, 13, 10]])
    ref = reference_voc(gt, preds, use_07_metric=False)
    r = evaluate(gt, preds, style="voc12")
    assert r.per_class["a"] == pytest.approx(ref["a"], abs=1e-12) == pytest.approx(0.5)


def _voc_sample(root: Path) -> tuple[Dataset, dict]:
    """voc-sample-100: GT from annotations_coco.json, detections from the txt files.

    The txt boxes are VOC-style 1-based inclusive corners like the XML they were scored
    against, so they move to mgral's continuous frame as ``[x1 - 1, y1 - 1, x2, y2]``.
    """
    gt = read(root / "annotations_coco.json", check_files=False)
    by_stem = {Path(r.file_name).stem: r.id for r in gt}
    names = (root / "voc.names").read_text().split()
    cat_of = {c.name: c.id for c in gt.categories}
    preds = {}
    for txt in sorted((root / "detections_abs_xyx2y2").glob("*.txt")):
        rows = [line.split() for line in txt.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        a = np.array([[float(v) for v in r[1:]] for r in rows])
        boxes = a[:, 1:5] - np.array([1.0, 1.0, 0.0, 0.0])
        labels = [cat_of[names[int(r[0])]] for r in rows]
        preds[by_stem[txt.stem]] = Detections(boxes=boxes, scores=a[:, 0], labels=labels)
    return gt, preds


def test_voc_sample_100(metrics_fixtures: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt, preds = _voc_sample(metrics_fixtures / "voc-sample-100")
    assert len(gt) == 100 and len(gt.categories) == 20
    assert sum(int(r.target.difficult.sum()) for r in gt) == 38
    figures = {}
    for style in ("voc07", "voc12"):
        result = evaluate(gt, preds, style=style)
        assert_same_per_class(result.per_class, reference_voc(gt, preds, style == "voc07"))
        figures[style] = result.mAP
    coco = evaluate(gt, preds, style="coco")
    with capsys.disabled():
        print(
            f"\nvoc-sample-100: VOC07 mAP {figures['voc07']:.4f}, VOC12 mAP {figures['voc12']:.4f}, "
            f"COCO mAP50 {coco.mAP50:.4f}, COCO mAP {coco.mAP:.4f}"
        )
    assert 0.3 < figures["voc12"] < 0.95 and 0.3 < figures["voc07"] < 0.95
    # the 11-point figure interpolates coarsely but stays close to the all-point one
    assert abs(figures["voc07"] - figures["voc12"]) < 0.05
