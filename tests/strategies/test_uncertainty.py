"""Known answers for least confidence, margin and entropy, their aggregation, and the strategies."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mgral.data.records import Detections
from mgral.errors import ConfigError
from mgral.strategies import build_strategy
from mgral.strategies.uncertainty import AGGREGATIONS, aggregate, box_uncertainty, uncertainty_scores

KINDS = ("least_confidence", "margin", "entropy")

PROBS = np.array(
    [
        [1.0, 0.0, 0.0],  # certain
        [0.5, 0.5, 0.0],  # a coin flip between background and class 1
        [0.2, 0.3, 0.5],
        [1 / 3, 1 / 3, 1 / 3],  # uniform
    ]
)
EXPECTED = {
    "least_confidence": [0.0, 0.5, 0.5, 2 / 3],
    "margin": [0.0, 1.0, 0.8, 1.0],
    "entropy": [0.0, math.log(2), -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5)), math.log(3)],
}


@pytest.mark.parametrize("kind", KINDS)
def test_box_uncertainty_known_values(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0 log 0 must not warn
        u = box_uncertainty(PROBS, kind)
    assert u.dtype == np.float64
    assert u == pytest.approx(EXPECTED[kind], abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_box_uncertainty_float32_and_empty(kind):
    assert box_uncertainty(PROBS.astype(np.float32), kind) == pytest.approx(EXPECTED[kind], abs=1e-6)
    assert box_uncertainty(np.zeros((0, 4), np.float32), kind).shape == (0,)


def test_box_uncertainty_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown uncertainty kind"):
        box_uncertainty(PROBS, "variance")
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        box_uncertainty(np.ones(3), "entropy")


VALUES = np.array([0.1, 0.9, 0.5, 0.3])


@pytest.mark.parametrize(
    ("how", "topk", "expected"),
    [("max", 3, 0.9), ("mean", 3, 0.45), ("sum", 3, 1.8), ("topk_mean", 3, 1.7 / 3), ("topk_mean", 1, 0.9)],
)
def test_aggregate_known_values(how, topk, expected):
    assert aggregate(VALUES, how, topk) == pytest.approx(expected)


def test_topk_mean_with_fewer_boxes_than_k_averages_all_of_them():
    assert aggregate(VALUES, "topk_mean", topk=10) == pytest.approx(0.45)


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_image_without_boxes_scores_empty_score(how):
    assert aggregate(np.zeros(0), how) == 0.0
    assert aggregate(np.zeros(0), how, empty_score=1.0) == 1.0


def det(probs=None, scores=None) -> Detections:
    """Detections with the given per-box ``probs`` (or only ``scores``)."""
    n = len(probs) if probs is not None else len(scores)
    scores = np.full(n, 0.9) if scores is None else scores
    return Detections(np.tile([0, 0, 10, 10], (n, 1)), scores, np.ones(n), probs=probs)


def test_scores_without_probs_use_the_box_score_as_a_two_way_distribution():
    preds = {"a": det(scores=[0.5]), "b": det(scores=[0.9])}
    for kind, expected in [("least_confidence", [0.5, 0.1]), ("margin", [1.0, 0.2]), ("entropy", [math.log(2), None])]:
        got = uncertainty_scores(preds, ["a", "b"], kind)
        assert got[0] == pytest.approx(expected[0], abs=1e-6)
        if expected[1] is not None:
            assert got[1] == pytest.approx(expected[1], abs=1e-6)
    assert uncertainty_scores(preds, ["b"], "entropy")[0] == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))


def test_min_score_ignores_low_scoring_boxes_and_may_empty_an_image():
    preds = {1: det(PROBS[1:3], scores=[0.04, 0.8]), 2: det(PROBS[1:2], scores=[0.04])}
    assert uncertainty_scores(preds, [1, 2], "margin", "max").tolist() == pytest.approx([1.0, 1.0])
    got = uncertainty_scores(preds, [1, 2], "margin", "max", min_score=0.05, empty_score=-1.0)
    assert got.tolist() == pytest.approx([0.8, -1.0])


def reference_scores(preds, ids, kind, how, topk, empty_score, min_score):
    out = []
    for i in ids:
        d = preds[i]
        probs = d.probs if d.probs is not None else np.stack([1 - d.scores, d.scores], axis=1)
        values = box_uncertainty(probs, kind)[d.scores >= min_score]
        out.append(aggregate(values, how, topk, empty_score))
    return np.array(out)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=12),
    without_probs=st.lists(st.booleans(), min_size=12, max_size=12),
    kind=st.sampled_from(KINDS),
    how=st.sampled_from(AGGREGATIONS),
    topk=st.integers(1, 4),
    min_score=st.sampled_from([0.0, 0.3]),
    chunk_size=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_vectorized_scores_equal_the_per_image_definition(
    counts, without_probs, kind, how, topk, min_score, chunk_size, seed
):
    rng = np.random.default_rng(seed)
    preds = {}
    for i, n in enumerate(counts):
        probs = rng.dirichlet(np.ones(4), size=n)
        preds[i] = det(None if without_probs[i] else probs, scores=rng.random(n))
    ids = list(preds)[::-1]
    got = uncertainty_scores(
        preds, ids, kind, how, topk=topk, empty_score=-0.5, min_score=min_score, chunk_size=chunk_size
    )
    expected = reference_scores(preds, ids, kind, how, topk, -0.5, min_score)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def context_of(make_context, preds):
    ctx = make_context(num_pool=len(preds), num_classes=2)
    ctx.pool_ids, ctx.labeled_ids = list(preds), []
    ctx.predictions = preds
    ctx.embeddings = None
    return ctx


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", AGGREGATIONS)
def test_the_uncertain_image_is_picked_before_the_certain_one(make_context, kind, how):
    certain = det(np.array([[0.02, 0.96, 0.02], [0.01, 0.01, 0.98]]))
    uncertain = det(np.array([[0.3, 0.35, 0.35], [0.4, 0.5, 0.1]]))
    preds = {"certain": certain, 7: uncertain, "empty": det(np.zeros((0, 3)))}
    sel = build_strategy(kind, aggregation=how).select(context_of(make_context, preds), 3)
    assert sel.image_ids == [7, "certain", "empty"]
    assert sel.scores[0] > sel.scores[1] > sel.scores[2] == 0.0


def test_empty_score_can_make_empty_images_come_first(make_context):
    preds = {"empty": det(np.zeros((0, 3))), "unsure": det(np.array([[1 / 3, 1 / 3, 1 / 3]]))}
    sel = build_strategy("least_confidence", empty_score=1.0).select(context_of(make_context, preds), 1)
    assert sel.image_ids == ["empty"] and sel.scores == [1.0]


def test_ties_are_broken_by_the_generator(make_context):
    preds = {i: det(np.array([[0.5, 0.25, 0.25]])) for i in range(20)}
    picks = set()
    for seed in range(8):
        ctx = context_of(make_context, preds)
        ctx.rng = np.random.default_rng(seed)
        sel = build_strategy("entropy").select(ctx, 3)
        ctx.rng = np.random.default_rng(seed)
        assert build_strategy("entropy").select(ctx, 3).image_ids == sel.image_ids
        picks.add(tuple(sel.image_ids))
    assert len(picks) > 1


def test_probs_of_the_wrong_width_name_the_image(make_context):
    preds = {"a": det(PROBS[:1]), "b": det(np.full((1, 4), 0.25))}
    with pytest.raises(ConfigError, match=r"image 'b': probs has 4 columns, expected 3"):
        build_strategy("margin").select(context_of(make_context, preds), 1)


def test_nan_probs_name_the_image(make_context):
    preds = {"a": det(PROBS[:1]), "b": det(np.array([[np.nan, 0.5, 0.5]]))}
    with pytest.raises(ConfigError, match=r"score of image 'b' is nan"):
        build_strategy("least_confidence").select(context_of(make_context, preds), 1)


def test_info_counts_images_without_probs(make_context):
    preds = {"a": det(PROBS[:1]), "b": det(scores=[0.5]), "c": det(np.zeros((0, 3)))}
    assert build_strategy("entropy").select(context_of(make_context, preds), 2).info == {"images_without_probs": 1}


@pytest.mark.parametrize(
    ("param", "value", "message"),
    [
        ("aggregation", "median", "aggregation must be one of max, mean, sum, topk_mean"),
        ("topk", 0, "topk must be a positive integer"),
        ("topk", 2.0, "topk must be a positive integer"),
        ("empty_score", float("nan"), "empty_score must be a finite number"),
        ("min_score", 1.5, r"min_score must be a number in \[0, 1\]"),
    ],
)
def test_bad_parameters_are_config_errors(param, value, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy("entropy", **{param: value})
