"""COCO-style evaluation: the official golden figures, and pycocotools on random workloads."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from evalkit import (
    COCO_FIGURES,
    Workload,
    assert_matches_reference,
    coco_dicts,
    make_workload,
    pycocotools_eval,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgral.data.coco import read
from mgral.data.records import Category, Dataset, Detections, ImageRecord, Target
from mgral.errors import DatasetError
from mgral.evaluation import EvalResult, SubsetEvaluator, evaluate, read_predictions

# cocoapi's stats for coco-eval-golden (SOURCE.md; official cocoapi, 6 decimals)
GOLDEN = {
    "mAP": 0.503647,
    "mAP50": 0.696973,
    "mAP75": 0.571667,
    "mAP_small": 0.593252,
    "mAP_medium": 0.557991,
    "mAP_large": 0.489363,
    "AR1": 0.386813,
    "AR10": 0.593680,
    "AR100": 0.595353,
    "AR_small": 0.654764,
    "AR_medium": 0.603130,
    "AR_large": 0.553744,
}


@pytest.fixture(scope="module")
def golden(metrics_fixtures: Path) -> tuple[Dataset, Path]:
    root = metrics_fixtures / "coco-eval-golden"
    return read(root / "gt_instances.json", check_files=False), root


def test_golden_reproduces_the_official_figures(golden: tuple[Dataset, Path]) -> None:
    gt, root = golden
    preds = read_predictions(root / "detections.json", gt)
    result = evaluate(gt, preds)
    for name, expected in GOLDEN.items():
        assert abs(getattr(result, name) - expected) <= 1e-6, (name, getattr(result, name), expected)
    assert result.style == "coco" and result.num_images == 100
    assert len(result.per_class) == 80
    defined = [v for v in result.per_class.values() if not math.isnan(v)]
    assert np.mean(defined) == pytest.approx(result.mAP, abs=1e-12)


def test_golden_dataset_form_and_subset_evaluator_agree(golden: tuple[Dataset, Path]) -> None:
    gt, root = golden
    from_list = evaluate(gt, read_predictions(root / "detections.json", gt))
    preds = read_predictions(root / "detections_dataset_form.json", gt)
    from_dict = evaluate(gt, preds)
    subset = SubsetEvaluator(gt, preds).evaluate()
    for name in COCO_FIGURES:
        assert getattr(from_dict, name) == getattr(from_list, name)
        assert getattr(subset, name) == pytest.approx(getattr(from_list, name), abs=1e-12)


WORKLOADS = {
    "mixed": Workload(),
    "tied-scores": Workload(tie_levels=4),
    "string-ids": Workload(str_ids=True, tie_levels=6),
    "crowded": Workload(images=12, p_crowded=0.6, crowded_gt=40, crowded_dets=140),
    "iscrowd-heavy": Workload(p_crowd=0.4, tie_levels=3),
    "many-classes": Workload(images=40, classes=40, classes_without_gt=5, max_gt=10, max_dets=40),
    "sparse": Workload(images=25, p_empty=0.3, p_no_dets=0.2, p_no_gt=0.3),
    "small-objects": Workload(size=96),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_random_workload_matches_pycocotools(name: str, seed: int) -> None:
    gt, preds = make_workload(seed, WORKLOADS[name])
    gt_dict, results, _ = coco_dicts(gt, preds)
    assert_matches_reference(evaluate(gt, preds), pycocotools_eval(gt_dict, results), gt)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    images=st.integers(1, 12),
    classes=st.integers(1, 5),
    tie_levels=st.sampled_from([0, 2, 7]),
    p_crowd=st.sampled_from([0.0, 0.3]),
    size=st.sampled_from([64, 400]),
)
def test_hypothesis_workloads_match_pycocotools(
    seed: int, images: int, classes: int, tie_levels: int, p_crowd: float, size: int
) -> None:
    cfg = Workload(
        images=images,
        classes=classes,
        tie_levels=tie_levels,
        p_crowd=p_crowd,
        size=size,
        max_dets=12,
        crowded_gt=8,
        crowded_dets=20,
    )
    gt, preds = make_workload(seed, cfg)
    gt_dict, results, _ = coco_dicts(gt, preds)
    assert_matches_reference(evaluate(gt, preds), pycocotools_eval(gt_dict, results), gt)


def test_image_ids_restrict_like_pycocotools_img_ids() -> None:
    gt, preds = make_workload(5, Workload(tie_levels=5))
    ids = list(gt.images)[::3]
    gt_dict, results, code = coco_dicts(gt, preds)
    ref = pycocotools_eval(gt_dict, results, img_ids=[code[i] for i in ids])
    assert_matches_reference(evaluate(gt, preds, image_ids=ids + ids[:2]), ref, gt)


def _tiny() -> Dataset:
    boxes = [[10, 10, 50, 50], [100, 100, 200, 180]]
    return Dataset(
        "/x",
        [Category(1, "a"), Category(2, "b")],
        [
            ImageRecord(7, "7.jpg", 300, 300, target=Target(boxes=boxes, labels=[1, 2])),
            ImageRecord(9, "9.jpg", 300, 300),
        ],
    )


def test_perfect_detections_score_one_and_classes_without_gt_are_nan() -> None:
    gt = _tiny()
    t = gt[7].target
    preds = {7: Detections(boxes=t.boxes, scores=[0.9, 0.8], labels=t.labels)}
    r = evaluate(gt, preds)
    assert r.mAP == pytest.approx(1.0) and r.mAP50 == pytest.approx(1.0) and r.AR100 == pytest.approx(1.0)
    assert math.isnan(r.mAP_small)  # no small objects: pycocotools' -1
    gt.categories.append(Category(5, "nobody"))
    r = evaluate(gt, preds)
    assert math.isnan(r.per_class["nobody"]) and r.mAP == pytest.approx(1.0)


def test_no_detections_and_no_images() -> None:
    gt = _tiny()
    r = evaluate(gt, {})
    assert r.mAP == 0.0 and r.AR100 == 0.0 and r.num_images == 2
    empty = evaluate(gt, {}, image_ids=[])
    assert empty.num_images == 0
    assert all(math.isnan(getattr(empty, name)) for name in COCO_FIGURES)
    assert all(math.isnan(v) for v in empty.per_class.values())
    assert all(v is None for k, v in empty.to_dict().items() if k in COCO_FIGURES)


def test_detections_only_on_images_without_gt() -> None:
    gt = _tiny()
    preds = {9: Detections(boxes=[[1, 1, 20, 20]], scores=[0.5], labels=[1])}
    gt_dict, results, _ = coco_dicts(gt, preds)
    assert_matches_reference(evaluate(gt, preds), pycocotools_eval(gt_dict, results), gt)


def test_refuses_predictions_it_cannot_evaluate() -> None:
    gt = _tiny()
    det = Detections(boxes=[[1, 1, 20, 20]], scores=[0.5], labels=[1])
    with pytest.raises(DatasetError, match="image 8.*not in the ground truth"):
        evaluate(gt, {8: det})
    with pytest.raises(DatasetError, match="label 3 is not a ground-truth category id"):
        evaluate(gt, {7: Detections(boxes=[[1, 1, 20, 20]], scores=[0.5], labels=[3])})
    with pytest.raises(DatasetError, match="non-finite"):
        evaluate(gt, {7: Detections(boxes=[[1, 1, np.nan, 20]], scores=[0.5], labels=[1])})
    with pytest.raises(DatasetError, match="image 'x' is not in the ground truth"):
        evaluate(gt, {}, image_ids=["x"])
    with pytest.raises(ValueError, match="unknown evaluation style"):
        evaluate(gt, {}, style="voc2007")
    with pytest.raises(DatasetError, match="image 8"):
        SubsetEvaluator(gt, {8: det})


def test_result_is_frozen_and_json_ready() -> None:
    gt, preds = make_workload(3)
    r = evaluate(gt, preds)
    with pytest.raises(AttributeError):
        r.mAP = 0.0  # type: ignore[misc]
    d = r.to_dict()
    assert {"mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "per_class", "style", "num_images"} <= set(
        d
    )
    assert isinstance(r, EvalResult)


def test_evaluation_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    gt, preds = make_workload(4)
    evaluate(gt, preds)
    SubsetEvaluator(gt, preds).bootstrap(3, seed=0)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_string_ids_keep_dataset_order_and_classes_follow_category_ids() -> None:
    gt, preds = make_workload(6, Workload(str_ids=True, images=8))
    evaluator = SubsetEvaluator(gt, preds)
    assert evaluator.image_ids == list(gt.images)
    assert evaluator.class_names == [c.name for c in sorted(gt.categories, key=lambda c: c.id)]
    assert list(evaluate(gt, preds).per_class) == evaluator.class_names
