"""SubsetEvaluator: exact subset / weighted mAP without re-matching, and the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from evalkit import (
    COCO_FIGURES,
    Workload,
    assert_matches_reference,
    assert_same_per_class,
    coco_dicts,
    duplicate,
    make_workload,
    pycocotools_eval,
    reference_voc,
    unique_scores,
)

from mgral.errors import DatasetError
from mgral.evaluation import SubsetEvaluator, evaluate


@pytest.fixture(scope="module", params=[0, 1, 2], ids=["mixed", "tied-str-ids", "crowded"])
def workload(request: pytest.FixtureRequest):
    cfg = {
        0: Workload(images=40),
        1: Workload(images=40, tie_levels=5, str_ids=True, p_crowd=0.25),
        2: Workload(images=20, p_crowded=0.5, classes=3),
    }[request.param]
    gt, preds = make_workload(100 + request.param, cfg)
    return gt, preds, SubsetEvaluator(gt, preds)


def _subsets(ids: list, seed: int) -> list[list]:
    rng = np.random.default_rng(seed)
    pick = np.array(ids, dtype=object)
    out = [[ids[0]], [ids[-1]], list(ids)]
    out += [list(rng.choice(pick, size=int(rng.integers(2, len(ids))), replace=False)) for _ in range(4)]
    return out


def test_subsets_equal_a_fresh_pycocotools_evaluation(workload) -> None:
    gt, preds, evaluator = workload
    gt_dict, results, code = coco_dicts(gt, preds)
    for subset in _subsets(list(gt.images), seed=len(gt)):
        ref = pycocotools_eval(gt_dict, results, img_ids=[code[i] for i in subset])
        ours = evaluator.evaluate(subset)
        assert_matches_reference(ours, ref, gt)
        assert ours.num_images == len(subset)
        quick = evaluator.average_precision(subset)
        for name in ("mAP", "mAP50", "mAP75"):
            assert quick.__getattribute__(name) == pytest.approx(getattr(ours, name), abs=1e-12, nan_ok=True)
        np.testing.assert_allclose(quick.per_class, list(ours.per_class.values()), atol=1e-12)


def test_full_set_equals_evaluate(workload) -> None:
    gt, preds, evaluator = workload
    full, direct = evaluator.evaluate(), evaluate(gt, preds)
    for name in COCO_FIGURES:
        assert getattr(full, name) == pytest.approx(getattr(direct, name), abs=1e-12, nan_ok=True)


def test_empty_subset_is_undefined(workload) -> None:
    _, _, evaluator = workload
    r = evaluator.evaluate([])
    assert r.num_images == 0 and all(math.isnan(getattr(r, n)) for n in COCO_FIGURES)
    quick = evaluator.average_precision(weights=np.zeros(len(evaluator.image_ids), dtype=int))
    assert math.isnan(quick.mAP) and np.isnan(quick.per_class).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_equal_physically_duplicated_images(seed: int) -> None:
    gt, preds = make_workload(200 + seed, Workload(images=25, p_crowd=0.2, str_ids=seed == 1))
    preds = unique_scores(preds, seed)  # ties would order copies differently (module docstring)
    evaluator = SubsetEvaluator(gt, preds)
    ids = evaluator.image_ids
    weights = np.random.default_rng(seed).integers(0, 4, size=len(ids))
    dup_gt, dup_preds = duplicate(gt, preds, ids, weights)
    gt_dict, results, _ = coco_dicts(dup_gt, dup_preds)
    ours = evaluator.evaluate(weights=weights)
    assert_matches_reference(ours, pycocotools_eval(gt_dict, results), gt)
    assert ours.num_images == weights.sum()
    as_mapping = evaluator.evaluate(weights={i: int(w) for i, w in zip(ids, weights, strict=True) if w})
    assert as_mapping.to_dict() == ours.to_dict()


@pytest.mark.parametrize("style", ["voc07", "voc12"])
def test_voc_subsets_and_weights(style: str) -> None:
    gt, preds = make_workload(300, Workload(images=30, tie_levels=0))
    preds = unique_scores(preds, 3)
    use_07 = style == "voc07"
    evaluator = SubsetEvaluator(gt, preds, style=style)
    for subset in _subsets(list(gt.images), seed=3):
        ours = evaluator.evaluate(subset)
        assert_same_per_class(ours.per_class, reference_voc(gt, preds, use_07, image_ids=subset))
        direct = evaluate(gt, preds, style=style, image_ids=subset).mAP
        assert ours.mAP == pytest.approx(direct, abs=1e-12, nan_ok=True)
        assert evaluator.average_precision(subset).mAP == pytest.approx(ours.mAP, abs=1e-12, nan_ok=True)
    weights = np.random.default_rng(3).integers(0, 4, size=len(evaluator.image_ids))
    dup_gt, dup_preds = duplicate(gt, preds, evaluator.image_ids, weights)
    assert_same_per_class(evaluator.evaluate(weights=weights).per_class, reference_voc(dup_gt, dup_preds, use_07))


def test_weights_arguments_are_checked() -> None:
    gt, preds = make_workload(7, Workload(images=5))
    evaluator = SubsetEvaluator(gt, preds)
    n = len(evaluator.image_ids)
    with pytest.raises(ValueError, match="not both"):
        evaluator.evaluate(evaluator.image_ids[:1], weights=[1] * n)
    with pytest.raises(ValueError, match=f"expected {n} counts"):
        evaluator.evaluate(weights=[1, 2])
    with pytest.raises(ValueError, match="non-negative integer"):
        evaluator.evaluate(weights=[-1] + [1] * (n - 1))
    with pytest.raises(ValueError, match="non-negative integer"):
        evaluator.evaluate(weights=[0.5] * n)
    with pytest.raises(ValueError, match="non-negative integer count"):
        evaluator.evaluate(weights={evaluator.image_ids[0]: 1.5})
    with pytest.raises(DatasetError, match="not in the ground truth"):
        evaluator.evaluate(["nope"])
    with pytest.raises(DatasetError, match="not in the ground truth"):
        evaluator.evaluate(weights={"nope": 1})
    twice, once = evaluator.evaluate(evaluator.image_ids[:2] * 3), evaluator.evaluate(evaluator.image_ids[:2])
    assert twice.to_dict() == once.to_dict()


def test_bootstrap_is_deterministic_and_brackets_the_estimate() -> None:
    gt, preds = make_workload(11, Workload(images=60, p_empty=0.0, p_no_dets=0.0, p_no_gt=0.0, classes=4))
    evaluator = SubsetEvaluator(gt, preds)
    a = evaluator.bootstrap(200, seed=5)
    assert a == evaluator.bootstrap(200, seed=5)
    assert a == evaluator.bootstrap(200, seed=np.random.default_rng(5)) | {"seed": 5}
    assert a != evaluator.bootstrap(200, seed=6)
    full = evaluator.evaluate()
    for name in ("mAP", "mAP50"):
        ci = a[name]
        assert ci["estimate"] == pytest.approx(getattr(full, name), abs=1e-12)
        assert ci["low"] < ci["estimate"] < ci["high"]
        assert ci["high"] - ci["low"] < 0.5 and ci["confidence"] == 0.95
    assert a["n"] == 200 and a["seed"] == 5
    narrow = evaluator.bootstrap(200, seed=5, confidence=0.5)["mAP"]
    assert a["mAP"]["low"] <= narrow["low"] <= narrow["high"] <= a["mAP"]["high"]


def test_bootstrap_arguments_are_checked() -> None:
    gt, preds = make_workload(7, Workload(images=5))
    evaluator = SubsetEvaluator(gt, preds, style="voc12")
    with pytest.raises(ValueError, match="n >= 1"):
        evaluator.bootstrap(0, seed=0)
    with pytest.raises(ValueError, match="confidence"):
        evaluator.bootstrap(10, seed=0, confidence=1.0)
    out = evaluator.bootstrap(20, seed=1)
    assert set(out) == {"mAP", "mAP50", "n", "seed"} and out["mAP"] == out["mAP50"]
