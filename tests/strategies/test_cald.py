"""Known answers for CALD: box consistency, the views' box mapping, both stages, parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mgral.data.records import Category, Dataset, Detections, ImageRecord, Target
from mgral.errors import ConfigError
from mgral.strategies import SelectionContext, build_strategy
from mgral.strategies.cald import (
    VIEWS,
    box_consistency,
    class_diversity_order,
    labeled_class_counts,
    view_consistency,
)

CATS = [Category(1, "a"), Category(2, "b"), Category(3, "c")]
SIZE = 64


def probs_for(cols, confidence=0.9):
    """One row per box: ``confidence`` on its column, the rest spread over the other columns."""
    out = np.full((len(cols), len(CATS) + 1), (1 - confidence) / len(CATS))
    out[np.arange(len(cols)), cols] = confidence
    return out


def det(boxes, labels, scores=None) -> Detections:
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.full(len(labels), 0.9) if scores is None else np.asarray(scores)
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), scores, labels, probs=probs_for(labels))


# -- box consistency -----------------------------------------------------------------------


def test_identical_detections_are_maximally_consistent():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, size=(5, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 20, size=(5, 2))], axis=1)
    scores = rng.uniform(0.2, 1.0, size=5)
    probs = rng.dirichlet(np.ones(4), size=5)
    c = box_consistency(boxes, scores, probs, boxes[::-1], scores[::-1], probs[::-1])
    assert c == pytest.approx(1.0 + scores)  # IoU 1, JS 0, mean score s
    assert np.all(c <= 2.0)


def test_shifted_boxes_and_swapped_classes_are_less_consistent():
    box, s = np.array([[10.0, 10.0, 22.0, 22.0]]), np.array([0.9])
    p = probs_for([1])
    same = box_consistency(box, s, p, box, s, p)[0]
    shifted = box_consistency(box, s, p, box + [6, 0, 6, 0], s, p)[0]
    swapped = box_consistency(box, s, p, box, s, probs_for([2]))[0]
    assert same == pytest.approx(1.9)
    assert shifted == pytest.approx(1 / 3 + 0.9)  # 6 px of a 12 px box: IoU 72 / 216
    assert swapped < same
    assert box_consistency(box, s, p, box + [6, 0, 6, 0], s, probs_for([2]))[0] < min(shifted, swapped)


def test_each_box_is_matched_to_the_view_box_it_overlaps_most():
    ref = np.array([[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 40.0, 40.0]])
    aug = np.array([[30.0, 30.0, 40.0, 40.0], [0.0, 0.0, 10.0, 10.0]])
    p_ref = probs_for([1, 2])
    c = box_consistency(ref, [0.8, 0.6], p_ref, aug, [0.6, 0.8], p_ref[::-1])
    assert c == pytest.approx([1.8, 1.6])


def test_a_view_without_boxes_and_the_base_point():
    box, s, p = np.array([[0.0, 0.0, 5.0, 5.0]]), np.array([0.9]), probs_for([1])
    assert box_consistency(box, s, p, np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4))).tolist() == [0.0]
    assert view_consistency(np.array([1.9, 1.2, 0.1]), 1.3) == pytest.approx(0.1)
    assert view_consistency(np.array([1.9, 1.2, 0.1]), 0.0) == pytest.approx(0.1)
    assert view_consistency(np.zeros(0), 1.3) == 0.0


# -- views ---------------------------------------------------------------------------------


def square_box(image: torch.Tensor) -> np.ndarray:
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    return np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float32)


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_views_map_their_boxes_back_to_the_original_image(name):
    width, height, box = 64, 48, np.array([[10.0, 5.0, 30.0, 25.0]], dtype=np.float32)
    image = torch.full((3, height, width), 0.2)
    image[:, 5:25, 10:30] = 0.9
    view = VIEWS[name]
    seen = view.augment(image)
    assert seen.shape[0] == 3 and float(seen.min()) >= 0.0 and float(seen.max()) <= 1.0
    back = view.unmap(square_box(seen), width, height)
    np.testing.assert_allclose(back, box, atol=1.5 if name == "scale" else 0.0)


# -- the strategy --------------------------------------------------------------------------


class ShiftingDetector:
    """Sees through the view: returns ``truth`` in the view's coordinates, shifted right by
    ``shift[id]`` original pixels (0: a perfectly consistent detector)."""

    def __init__(self, truth: dict, shift: dict) -> None:
        self.truth, self.shift, self.calls = truth, shift, 0

    def predict(self, dataset, image_ids, *, embeddings=True, augment=None, **kwargs):
        self.calls += 1
        out = {}
        for i in image_ids:
            rec = dataset[i]
            image = torch.rand((3, rec.height, rec.width), generator=torch.Generator().manual_seed(1))
            seen = augment(image) if augment is not None else image
            d = self.truth[i]
            boxes = d.boxes + np.array([self.shift.get(i, 0), 0, self.shift.get(i, 0), 0], np.float32)
            if seen.shape != image.shape:
                sx, sy = seen.shape[-1] / rec.width, seen.shape[-2] / rec.height
                boxes = boxes * np.array([sx, sy, sx, sy], np.float32)
            elif torch.equal(seen, image.flip(-1)):
                boxes = np.stack([rec.width - boxes[:, 2], boxes[:, 1], rec.width - boxes[:, 0], boxes[:, 3]], 1)
            out[i] = Detections(boxes, d.scores, d.labels, probs=d.probs)
        return out


def cald_context(truth: dict, labeled: dict, shift: dict | None = None, seed: int = 0) -> SelectionContext:
    """Pool = ``truth``'s ids, labeled = ``labeled`` (id -> labels of its boxes)."""
    records = [ImageRecord(i, f"{i}.png", SIZE, SIZE, "train") for i in truth]
    records += [
        ImageRecord(i, f"{i}.png", SIZE, SIZE, "train", Target(np.tile([0, 0, 5, 5], (len(lab), 1)), lab))
        for i, lab in labeled.items()
    ]
    return SelectionContext(
        Dataset("/nonexistent", CATS, records),
        list(truth),
        list(labeled),
        np.random.default_rng(seed),
        predictions=truth,
        detector=ShiftingDetector(truth, shift or {}),
    )


BOX = [[10.0, 10.0, 22.0, 22.0]]


@pytest.mark.parametrize("base_point", [1.3, 0.0])
def test_stage_one_ranks_the_inconsistent_image_first(base_point):
    truth = {"steady": det(BOX, [1]), "shaky": det(BOX, [1]), 7: det(BOX, [1])}
    ctx = cald_context(truth, {"l": [1]}, shift={"shaky": 6})
    sel = build_strategy("cald", base_point=base_point, candidate_ratio=1.0).select(ctx, 1)
    assert sel.image_ids == ["shaky"]
    assert ctx.detector.calls == 3  # one prediction pass per view


def test_an_image_without_detections_is_the_most_informative():
    truth = {"steady": det(BOX, [1]), "empty": det(np.zeros((0, 4)), [])}
    sel = build_strategy("cald", candidate_ratio=1.0).select(cald_context(truth, {"l": [1]}), 1)
    assert sel.image_ids == ["empty"]


def test_with_equal_consistency_the_class_missing_from_the_labeled_set_wins():
    truth = {"common": det(BOX, [1]), "novel": det(BOX, [2])}
    labeled = {"l1": [1, 1, 1], "l2": [1, 1], "l3": [1, 3]}
    for seed in range(5):
        sel = build_strategy("cald", candidate_ratio=2.0).select(cald_context(truth, labeled, seed=seed), 1)
        assert sel.image_ids == ["novel"]
        assert sel.info["candidates"] == 2 and sel.info["labeled_boxes"] == 7


def test_picks_update_the_labeled_distribution():
    # labeled: all class a; two class-b candidates and one class-c: after a b, the c is farther than the other b
    vectors = np.array([[0.0, 0.9, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 0.9]])
    firsts = set()
    for seed in range(8):
        order, div = class_diversity_order(vectors, np.array([5.0, 0, 0]), 1.0, 2, np.random.default_rng(seed))
        assert 2 in order.tolist() and len({0, 1} & set(order.tolist())) == 1
        assert div[0] == pytest.approx(1.0)  # disjoint support: JS is 1 bit
        assert div[1] <= div[0]
        firsts.add(int(order[0]))
    assert len(firsts) > 1  # the tie at the first pick is broken at random


def test_labeled_class_counts_ignore_unknown_labels():
    ctx = cald_context({"p": det(BOX, [1])}, {"l1": [1, 2, 2], "l2": [3, 99]})
    counts = labeled_class_counts(ctx.dataset, ctx.labeled_ids, {1: 1, 2: 2, 3: 3})
    assert counts.tolist() == [1.0, 2.0, 1.0]


def test_runs_with_the_real_detector(make_context, for_strategy):
    strategy = build_strategy("cald", views=["flip", "scale"])
    ctx = for_strategy(make_context(num_pool=6, num_labeled=3), strategy)
    sel = strategy.select(ctx, 3)
    assert len(set(sel.image_ids)) == 3 and set(sel.image_ids) <= set(ctx.pool_ids)
    assert all(np.isfinite(sel.scores)) and sel.info["views"] == ["flip", "scale"]
    assert sel.info["candidates"] == 4  # ceil(1.2 * 3)
    assert 0.0 <= sel.info["mean_consistency"] <= 2.0


def test_each_view_pass_shows_a_named_bar_when_the_context_asks(make_context, for_strategy, capsys):
    strategy = build_strategy("cald", views=["flip", "scale"])
    ctx = for_strategy(make_context(num_pool=6, num_labeled=3), strategy)
    strategy.select(ctx, 3)
    assert capsys.readouterr().err == ""  # a library call is silent unless asked
    ctx.progress = True
    strategy.select(ctx, 3)
    err = capsys.readouterr().err  # not a terminal here: timestamped lines
    assert "CALD view 1/2 (flip): 6/6 (100%)" in err and "CALD view 2/2 (scale): 6/6 (100%)" in err


def test_probs_of_the_wrong_width_name_the_image():
    truth = {"a": det(BOX, [1]), "b": Detections(BOX, [0.9], [1], probs=np.full((1, 3), 1 / 3))}
    with pytest.raises(ConfigError, match=r"image 'b': probs has 3 columns, expected 4"):
        build_strategy("cald").select(cald_context(truth, {}), 1)


@pytest.mark.parametrize(
    ("param", "value", "message"),
    [
        ("candidate_ratio", 0.5, r"cald: candidate_ratio must be a number >= 1, got 0.5"),
        ("candidate_ratio", "2", r"candidate_ratio must be a number >= 1"),
        ("base_point", 2.5, r"base_point must be a number in \[0, 2\]"),
        ("min_score", -0.1, r"min_score must be a number in \[0, 1\]"),
        ("views", ["rotate"], r"views must be distinct names among flip, scale, color.*'rotate' is unknown"),
        ("views", ["flip", "flip"], r"views must be distinct .*repeated"),
        ("views", "flip", r"views must be a non-empty list"),
        ("views", [], r"views must be a non-empty list"),
    ],
)
def test_bad_parameters_are_config_errors(param, value, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy("cald", **{param: value})
