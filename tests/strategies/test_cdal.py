"""Known answers for CDAL: class-specific confusion, the contextual distance, core-set selection."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy

from mgral.data.records import Category, Dataset, Detections, ImageRecord
from mgral.errors import ConfigError
from mgral.strategies import SelectionContext, build_strategy
from mgral.strategies.cdal import class_confusion, contextual_distance, contextual_features

CATS = [Category(5, "a"), Category(6, "b"), Category(7, "c")]
COLUMNS = {5: 1, 6: 2, 7: 3}


def det(labels, probs) -> Detections:
    probs = np.asarray(probs, dtype=np.float64).reshape(len(labels), len(CATS) + 1)
    boxes = np.tile([0.0, 0.0, 10.0, 10.0], (len(labels), 1))
    return Detections(boxes, probs[:, 1:].max(axis=1), labels, probs=probs)


def peaked(label: int, confidence: float = 0.7) -> np.ndarray:
    p = np.full(len(CATS) + 1, (1 - confidence) / len(CATS))
    p[COLUMNS[label]] = confidence
    return p


def test_class_confusion_is_the_entropy_weighted_mean_per_class():
    p1, p2, p3 = np.array([0.1, 0.6, 0.2, 0.1]), np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.0, 0.0, 0.0, 1.0])
    conf, present = class_confusion(np.stack([p1, p2, p3]), np.array([1, 1, 3]), 3)
    h1, h2 = entropy(p1), entropy(p2)
    np.testing.assert_allclose(conf[0], (h1 * p1 + h2 * p2) / (h1 + h2))
    np.testing.assert_allclose(conf[1], 0.0)  # no box of the second class
    np.testing.assert_allclose(conf[2], p3)  # a certain box: entropy 0, plain mean
    assert present.tolist() == [True, False, True]


def test_distance_is_zero_for_identical_images_symmetric_and_known():
    preds = {
        "x": det([5, 6], [peaked(5), peaked(6, 0.5)]),
        "x_again": det([6, 5], [peaked(6, 0.5), peaked(5)]),
        "y": det([5], [peaked(5, 0.9)]),
        "z": det([7], [peaked(7)]),
        "empty": det([], np.zeros((0, 4))),
    }
    f = dict(zip(preds, contextual_features(preds, list(preds), COLUMNS), strict=True))
    assert contextual_distance(f["x"], f["x_again"]) == pytest.approx(0.0, abs=1e-6)
    for a in preds:
        for b in preds:
            assert contextual_distance(f[a], f[b]) == pytest.approx(contextual_distance(f[b], f[a]))
    # y vs x: class a compared by squared Hellinger, class b present only in x: 1/2
    hellinger = 0.5 * np.sum((np.sqrt(peaked(5, 0.9)) - np.sqrt(peaked(5))) ** 2)
    assert contextual_distance(f["x"], f["y"]) == pytest.approx(hellinger + 0.5, rel=1e-5)
    assert contextual_distance(f["y"], f["z"]) == pytest.approx(1.0, rel=1e-5)  # disjoint classes
    assert contextual_distance(f["empty"], f["z"]) == pytest.approx(0.5, rel=1e-5)


def test_min_score_drops_boxes():
    preds = {"p": Detections(np.tile([0, 0, 5, 5], (2, 1)), [0.9, 0.1], [5, 6], probs=[peaked(5), peaked(6)])}
    conf = contextual_features(preds, ["p"], COLUMNS, min_score=0.5).reshape(3, 4)
    assert conf[1].tolist() == [0.0] * 4 and conf[0].sum() > 0


class FixedDetector:
    """Returns the given detections (for the labeled images)."""

    def __init__(self, preds: dict) -> None:
        self.preds, self.asked = preds, []

    def predict(self, dataset, image_ids, *, embeddings=True, **kwargs):
        self.asked.extend(image_ids)
        return {i: self.preds[i] for i in image_ids}


def cdal_context(pool: dict, labeled: dict, seed: int = 0) -> SelectionContext:
    ids = list(pool) + list(labeled)
    dataset = Dataset("/nonexistent", CATS, [ImageRecord(i, f"{i}.png", 32, 32, "train") for i in ids])
    return SelectionContext(
        dataset,
        list(pool),
        list(labeled),
        np.random.default_rng(seed),
        predictions=pool,
        detector=FixedDetector(labeled),
    )


def test_core_set_skips_what_is_labeled_and_near_duplicates():
    labeled = {f"l{k}": det([5], [peaked(5, 0.6 + 0.1 * k)]) for k in range(3)}
    pool = {
        "dup1": det([6], [peaked(6)]),
        "dup2": det([6], [peaked(6) + [0.001, -0.001, 0, 0]]),
        "like_labeled": det([5], [peaked(5, 0.75)]),
        "c": det([7], [peaked(7)]),
    }
    for seed in range(8):
        ctx = cdal_context(pool, labeled, seed)
        sel = build_strategy("cdal").select(ctx, 2)
        assert "c" in sel.image_ids and len({"dup1", "dup2"} & set(sel.image_ids)) == 1
        assert sel.scores[0] == pytest.approx(1.0, rel=1e-4)  # disjoint classes from every labeled image
        assert sel.info == {"labeled_centers": 3}
        assert ctx.detector.asked == list(labeled)


def test_without_labeled_images_the_detector_is_not_asked():
    pool = {"a": det([5], [peaked(5)]), "b": det([6], [peaked(6)]), "c": det([5], [peaked(5, 0.8)])}
    ctx = cdal_context(pool, {})
    sel = build_strategy("cdal").select(ctx, 3)
    assert sorted(sel.image_ids) == ["a", "b", "c"] and ctx.detector.asked == []
    assert sel.info == {"labeled_centers": 0}


def test_runs_with_the_real_detector(make_context, for_strategy):
    strategy = build_strategy("cdal")
    ctx = for_strategy(make_context(num_pool=8, num_labeled=4), strategy)
    sel = strategy.select(ctx, 3)
    assert len(set(sel.image_ids)) == 3 and set(sel.image_ids) <= set(ctx.pool_ids)
    assert sel.info == {"labeled_centers": 4}
    assert np.all(np.diff(sel.scores) <= 1e-6)  # k-center greedy: non-increasing distances


def test_probs_of_the_wrong_width_name_the_image():
    pool = {"a": det([5], [peaked(5)]), "b": Detections([[0, 0, 4, 4]], [0.9], [5], probs=[[0.5, 0.5]])}
    with pytest.raises(ConfigError, match=r"image 'b': probs has 2 columns, expected 4"):
        build_strategy("cdal").select(cdal_context(pool, {}), 1)


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.2", float("nan")])
def test_bad_min_score_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"cdal: min_score must be a number in \[0, 1\]"):
        build_strategy("cdal", min_score=value)


def test_pool_order_does_not_matter_even_with_ties():
    labeled = {"l": det([5], [peaked(5)])}
    pool = {f"p{k}": det([6 + k % 2], [peaked(6 + k % 2, 0.5 + 0.04 * k)]) for k in range(8)}
    for seed in range(4):
        forward = build_strategy("cdal").select(cdal_context(pool, labeled, seed), 3)
        backward_ctx = cdal_context(pool, labeled, seed)
        backward_ctx.pool_ids = backward_ctx.pool_ids[::-1]
        backward = build_strategy("cdal").select(backward_ctx, 3)
        assert forward.image_ids == backward.image_ids and forward.scores == backward.scores


def test_picks_equal_the_plain_k_center_loop_even_with_duplicates_and_empty_images(reference_k_center):
    rng = np.random.default_rng(7)
    labels = [c.id for c in CATS]

    def image(boxes):
        chosen = rng.choice(labels, boxes)
        return det(chosen, [peaked(int(c), rng.uniform(0.4, 0.95)) for c in chosen])

    pool = {f"p{k:02d}": image(int(rng.integers(0, 4))) for k in range(40)}
    pool.update({f"q{k:02d}": pool[f"p{k:02d}"] for k in range(0, 40, 4)})  # duplicates, empty ones included
    labeled = {f"l{k}": image(int(rng.integers(1, 3))) for k in range(4)}
    ids = sorted(pool)  # CDAL's canonical order
    features = contextual_features(pool, ids, COLUMNS)
    labeled_features = contextual_features(labeled, list(labeled), COLUMNS)
    for seed in range(4):
        for budget in (5, len(pool)):
            sel = build_strategy("cdal").select(cdal_context(pool, labeled, seed), budget)
            picked, dist = reference_k_center(features, labeled_features, budget, np.random.default_rng(seed), False)
            assert sel.image_ids == [ids[i] for i in picked]
            assert sel.scores == pytest.approx(0.5 * dist**2, rel=1e-9, abs=1e-12)
