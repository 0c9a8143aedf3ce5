"""Known answers for PPAL: difficulty-calibrated uncertainty, matching distance, k-medoids, the strategy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mgral.data.records import Category, Dataset, Detections, ImageRecord
from mgral.errors import ConfigError
from mgral.strategies import SelectionContext, build_strategy
from mgral.strategies import ppal as ppal_module
from mgral.strategies.ppal import binary_entropy, class_quality, difficulty_weights, k_medoids, matching_distance

CATS = [Category(1, "a"), Category(2, "b"), Category(3, "c"), Category(4, "d")]


def det(labels, scores, probs=None) -> Detections:
    """Boxes of ``labels`` (category ids) with ``scores``; ``probs`` peaked on the label by default."""
    labels = np.asarray(labels, dtype=np.int64)
    if probs is None:
        probs = np.full((len(labels), len(CATS) + 1), 0.02)
        probs[np.arange(len(labels)), labels] = 1 - 0.02 * len(CATS)
    boxes = np.tile([0.0, 0.0, 10.0, 10.0], (len(labels), 1))
    return Detections(boxes, scores, labels, probs=probs)


def ppal_context(preds: dict, seed: int = 0) -> SelectionContext:
    dataset = Dataset("/nonexistent", CATS, [ImageRecord(i, f"{i}.png", 32, 32, "train") for i in preds])
    return SelectionContext(dataset, list(preds), [], np.random.default_rng(seed), predictions=preds)


def test_binary_entropy_known_values():
    assert binary_entropy(np.array([0.0, 0.5, 1.0, 0.1])) == pytest.approx(
        [0.0, math.log(2), 0.0, -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))]
    )


def test_difficulty_weights_run_from_one_to_one_plus_the_upper_bound():
    q = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
    w = difficulty_weights(q, upper=0.2, alpha=0.3)
    assert w[0] == pytest.approx(1.0) and w[-1] == pytest.approx(1.2)
    assert np.all(np.diff(w) > 0)  # harder (lower quality) -> heavier
    assert difficulty_weights(q, upper=0.0, alpha=0.3) == pytest.approx(np.ones(5))


def test_class_quality_is_the_mean_of_per_image_maxima_where_present():
    class_max = np.array([[0.9, 0.0, 0.0], [0.7, 0.2, 0.0], [0.0, 0.4, 0.0]])
    assert class_quality(class_max) == pytest.approx([0.8, 0.3, 0.0])


def test_the_uncertain_image_of_a_hard_category_scores_highest():
    # category a: confidently detected elsewhere (easy); category b: never confident (hard)
    preds = {f"easy{k}": det([1], [0.95]) for k in range(3)}
    preds |= {"x": det([1], [0.3]), "y": det([2], [0.3]), "z": det([2], [0.35]), "sure": det([1, 1], [0.99, 0.98])}
    sel = build_strategy("ppal", candidate_ratio=1.0).select(ppal_context(preds), len(preds))
    score = dict(zip(sel.image_ids, sel.scores, strict=True))
    weights = sel.info["class_weights"]
    assert weights[1] > weights[0] > 1.0  # b is the harder category
    assert score["y"] > score["x"]  # same entropy, harder category
    assert score["y"] == pytest.approx(weights[1] * binary_entropy(np.array([0.3]))[0])
    assert score["x"] > score["sure"]
    assert sel.scores == sorted(sel.scores, reverse=True)


def test_boxes_below_min_score_are_ignored():
    preds = {"a": det([1], [0.04]), "b": det([1], [0.9])}
    sel = build_strategy("ppal").select(ppal_context(preds), 2)
    assert dict(zip(sel.image_ids, sel.scores, strict=True))["a"] == 0.0


# -- matching distance -----------------------------------------------------------------------


def test_matching_distance_known_values():
    one = [np.array([[1.0, 0.0]])]
    feats = one + [np.array([[1.0, 1.0]])] + [np.array([[1.0, 0.0], [1.0, 0.0]])] + [np.zeros((0, 2))] * 2
    labels = [np.array([1]), np.array([1]), np.array([1, 2]), np.zeros(0, int), np.zeros(0, int)]
    weights = [np.array([1.0]), np.array([1.0]), np.array([1.0, 3.0]), np.zeros(0), np.zeros(0)]
    d = matching_distance(feats, labels, weights)
    assert d[0, 1] == pytest.approx(1 - 1 / math.sqrt(2))  # cosine distance of the matched boxes
    assert d[0, 2] == pytest.approx(0.5 * ((1 * 0 + 3 * 1) / 4 + 0))  # the category-2 box has no match in image 0
    assert d[0, 3] == d[3, 0] == 1.0  # an image without boxes is far from one with boxes
    assert d[3, 4] == 0.0  # two images without boxes are alike
    np.testing.assert_allclose(d, d.T)
    assert np.all(np.diag(d) == 0) and d.min() >= 0 and d.max() <= 1


def test_matching_distance_is_zero_for_identical_images_and_chunking_does_not_matter(monkeypatch):
    rng = np.random.default_rng(0)
    feats = [rng.dirichlet(np.ones(5), size=n) for n in (3, 4, 2, 5)]
    labels = [rng.integers(1, 4, size=len(f)) for f in feats]
    weights = [rng.uniform(0.1, 1, size=len(f)) for f in feats]
    feats.append(feats[0].copy())
    labels.append(labels[0].copy())
    weights.append(weights[0].copy())
    whole = matching_distance(feats, labels, weights)
    assert whole[0, 4] == pytest.approx(0.0, abs=1e-7)
    monkeypatch.setattr(ppal_module, "CHUNK_ELEMENTS", 1)
    np.testing.assert_allclose(matching_distance(feats, labels, weights), whole, atol=1e-12)


# -- k-medoids -------------------------------------------------------------------------------


def test_k_medoids_finds_the_centre_of_each_cluster():
    x = np.array([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    d = np.abs(x[:, None] - x[None, :])
    for seed in range(6):
        medoids, iterations = k_medoids(d, 2, np.random.default_rng(seed))
        assert sorted(medoids.tolist()) == [1, 4]
        assert 1 <= iterations <= 100


def test_k_medoids_with_as_many_medoids_as_points_takes_them_all():
    d = np.ones((3, 3)) - np.eye(3)
    assert sorted(k_medoids(d, 3, np.random.default_rng(0))[0].tolist()) == [0, 1, 2]


# -- diversity ---------------------------------------------------------------------------


def test_near_duplicates_are_not_both_picked():
    base = np.full((3, 5), 0.05)
    base[:, 1] = 0.8
    preds = {
        "dup1": det([1, 1, 1], [0.5, 0.5, 0.5], base),
        "dup2": det([1, 1, 1], [0.5, 0.49, 0.5], base + [0.001, -0.001, 0, 0, 0]),
        "b": det([2], [0.4]),
        "c": det([3], [0.4]),
        "d": det([4], [0.4]),
        "ab": det([1, 2], [0.8, 0.4]),
    }
    # uncertainty alone takes both duplicates ...
    alone = build_strategy("ppal", candidate_ratio=1.0).select(ppal_context(preds), 2)
    assert sorted(alone.image_ids) == ["dup1", "dup2"]
    # ... the matching-similarity stage does not
    for seed in range(10):
        sel = build_strategy("ppal").select(ppal_context(preds, seed), 2)
        assert len(sel.image_ids) == 2
        assert not {"dup1", "dup2"} <= set(sel.image_ids)
        assert sel.info["candidates"] == 6


@pytest.mark.parametrize(
    ("param", "value", "message"),
    [
        ("candidate_ratio", 0.5, r"ppal: candidate_ratio must be a number >= 1, got 0.5"),
        ("candidate_ratio", float("inf"), r"candidate_ratio must be a number >= 1"),
        ("min_score", 1.5, r"min_score must be a number in \[0, 1\]"),
        ("class_weight_ub", -0.1, r"class_weight_ub must be a number >= 0"),
        ("class_weight_alpha", 0.0, r"class_weight_alpha must be a number in \[0.01, 100\]"),
        ("max_iter", 0, r"max_iter must be an integer >= 1"),
        ("max_iter", 2.0, r"max_iter must be an integer >= 1"),
    ],
)
def test_bad_parameters_are_config_errors(param, value, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy("ppal", **{param: value})


def test_pool_order_does_not_matter_even_with_ties():
    preds = {f"p{k}": det([1 + k % 3], [0.5]) for k in range(9)}
    for seed in range(4):
        forward = build_strategy("ppal").select(ppal_context(preds, seed), 2)
        backward_ctx = ppal_context(preds, seed)
        backward_ctx.pool_ids = backward_ctx.pool_ids[::-1]
        assert build_strategy("ppal").select(backward_ctx, 2).image_ids == forward.image_ids


def plain_matching_distance(features, labels, weights):
    """The matching distance pair by pair and box by box, as the module doc states it."""
    features = [np.asarray(f, dtype=np.float64) for f in features]
    weights = [np.asarray(w, dtype=np.float64) for w in weights]

    def one_way(a, b):
        total = 0.0
        for f, lab, w in zip(features[a], labels[a], weights[a], strict=True):
            same = [g for g, lab_b in zip(features[b], labels[b], strict=True) if lab_b == lab]
            cos = max((f @ g / (np.linalg.norm(f) * np.linalg.norm(g)) for g in same), default=None)
            total += w * (1.0 if cos is None else min(max(1.0 - cos, 0.0), 1.0))
        return total / weights[a].sum()

    m = len(features)
    empty = [w.sum() <= 0 for w in weights]
    d = np.zeros((m, m))
    for a in range(m):
        for b in range(m):
            if a != b and not (empty[a] and empty[b]):
                ab = 1.0 if empty[a] else one_way(a, b)
                ba = 1.0 if empty[b] else one_way(b, a)
                d[a, b] = min(max(0.5 * (ab + ba), 0.0), 1.0)
    return d


def plain_rows(features, labels, weights, *, rows=None, dtype=None):
    """:func:`plain_matching_distance` (whatever the dtype), the given rows or all."""
    d = plain_matching_distance(features, labels, weights)
    return d if rows is None else d[rows]


def tied_pool(seed):
    """Random images with up to 6 boxes (empty ones too); a quarter repeated exactly, and repeated
    boxes inside images."""
    rng = np.random.default_rng(seed)
    preds = {}
    for k in range(24):
        n = int(rng.integers(0, 7))
        labels = rng.integers(1, 5, size=n)
        probs = rng.dirichlet(np.ones(len(CATS) + 1), size=n)
        if n > 2:
            labels[1], probs[1] = labels[0], probs[0]
        preds[f"p{k:02d}"] = det(labels, rng.uniform(0.05, 0.95, size=n), probs)
    preds.update({f"q{k:02d}": preds[f"p{k:02d}"] for k in range(0, 24, 4)})
    return preds


@pytest.mark.parametrize("seed", range(4))
def test_matching_distance_and_picks_equal_the_plain_pairwise_loop_even_with_ties(monkeypatch, seed):
    preds = tied_pool(seed)
    dets = [preds[i] for i in sorted(preds)]
    args = ([d.probs for d in dets], [d.labels for d in dets], [d.scores for d in dets])
    np.testing.assert_allclose(matching_distance(*args), plain_matching_distance(*args), rtol=0, atol=1e-12)
    monkeypatch.setattr(ppal_module, "CHUNK_ELEMENTS", 7)  # blocks of a few boxes
    np.testing.assert_allclose(matching_distance(*args), plain_matching_distance(*args), rtol=0, atol=1e-12)
    monkeypatch.undo()
    fast = build_strategy("ppal", min_score=0.0).select(ppal_context(preds, seed), 6)
    monkeypatch.setattr(ppal_module, "matching_distance", plain_rows)
    plain = build_strategy("ppal", min_score=0.0).select(ppal_context(preds, seed), 6)
    assert fast.image_ids == plain.image_ids and fast.scores == plain.scores


def random_boxes(seed, images=40, dim=6):
    """Images of 0-9 boxes in 4 categories, with exact copies and near-copies of boxes and images."""
    rng = np.random.default_rng(seed)
    counts = rng.choice([0, 1, 2, 5, 9], size=images)
    feats = [rng.dirichlet(np.ones(dim), size=n) for n in counts]
    labels = [rng.integers(1, 5, size=n) for n in counts]
    weights = [rng.uniform(0.05, 1.0, size=n) for n in counts]
    for k in range(0, images, 5):  # an exact copy of an image, and one with a box nudged by 1e-9
        feats[k + 1], labels[k + 1], weights[k + 1] = feats[k].copy(), labels[k].copy(), weights[k].copy()
        if len(feats[k]):
            feats[k + 2], labels[k + 2], weights[k + 2] = feats[k] + 1e-9, labels[k].copy(), weights[k].copy()
    return feats, labels, weights


@pytest.mark.parametrize("seed", range(3))
def test_rows_are_the_matrix_rows_and_symmetric_among_themselves(seed):
    distances = ppal_module.MatchingDistance(*random_boxes(seed))
    whole = distances.matrix()
    rows = np.array([3, 0, 17, 1, 2, 39])
    part = distances.rows(rows)
    np.testing.assert_allclose(part, whole[rows], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(part[:, rows], part[:, rows].T)
    assert np.all(part[np.arange(len(rows)), rows] == 0)


@pytest.mark.parametrize("seed", range(3))
def test_float32_entries_are_within_the_error_bound(seed):
    distances = ppal_module.MatchingDistance(*random_boxes(seed, dim=21))
    gap = np.abs(distances.matrix(np.float32) - distances.matrix())
    assert 0 < gap.max() <= distances.error(np.float32)


def near_tied_distances(seed, m=60):
    """A symmetric matrix whose distances come in few values, each repeated with offsets of
    1e-9 (far below the float32 error), so that most k-medoids decisions are near-ties."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, size=(m, 2)).astype(float)
    d = np.abs(x[:, None, :] - x[None, :, :]).sum(axis=2) / 8 + 1e-9 * rng.integers(0, 3, size=(m, m))
    d = np.triu(d, 1) + np.triu(d, 1).T
    return d


@pytest.mark.parametrize("seed", range(8))
def test_k_medoids_on_inexact_distances_settles_every_near_tie_on_exact_rows(seed):
    exact = near_tied_distances(seed)
    error = 1e-6
    noise = np.random.default_rng(seed + 100).uniform(-error, error, size=exact.shape)
    noisy = np.clip(exact + np.triu(noise, 1) + np.triu(noise, 1).T, 0.0, None)
    settled = []

    def exact_rows(rows):
        settled.append(len(rows))
        return exact[rows]

    want = k_medoids(exact, 7, np.random.default_rng(seed))
    got = k_medoids(noisy, 7, np.random.default_rng(seed), error=error, exact_rows=exact_rows)
    assert np.array_equal(got[0], want[0]) and got[1] == want[1]
    assert settled  # near-ties were met, and settled
