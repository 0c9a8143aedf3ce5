"""The vectorized CALD, PPAL and CDAL give exactly (bit for bit) what their per-image versions
gave, and the same on one thread as on several. The reference functions below are the previous
implementations, kept verbatim (only renamed), so that any drift in a selection shows up here."""

from __future__ import annotations

import functools
import math
import threading
import time

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

import mgral.strategies._detection_math as math_module
import mgral.strategies.cald as cald_module
import mgral.strategies.cdal as cdal_module
import mgral.strategies.ppal as ppal_module
from mgral.data.records import Category, Dataset, Detections, ImageRecord, Target
from mgral.strategies import SelectionContext, build_strategy, select_top
from mgral.strategies._detection_math import (
    box_columns,
    box_distributions,
    canonical_order,
    category_columns,
    flatten_detections,
    ordered_map,
    thread_limit,
)
from mgral.strategies.cald import (
    VIEWS,
    box_consistency,
    class_diversity_order,
    class_vector,
    labeled_class_counts,
    view_consistencies,
    view_consistency,
)
from mgral.strategies.cdal import class_confusion, contextual_features
from mgral.strategies.ppal import (
    binary_entropy,
    class_quality,
    difficulty_weights,
    k_medoids,
    matching_distance,
)

CATS = [Category(3, "a"), Category(5, "b"), Category(8, "c"), Category(9, "d")]
COLUMNS = category_columns(CATS)
W, H = 96, 64


# -- a pool with the awkward cases: empty images, duplicate and degenerate boxes, ties --------


def detections(rng: np.random.Generator, n: int, *, probs: bool = True) -> Detections:
    xy = rng.uniform(0, [W - 4, H - 4], size=(n, 2)).round(0)
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, size=(n, 2)).round(0)], axis=1)
    if n > 2:
        boxes[1] = boxes[0]  # a duplicate: equal IoU with whatever matches the first
        boxes[2, 2:] = boxes[2, :2]  # zero area: 0 / 0 IoU with itself
    p = rng.dirichlet(np.full(len(CATS) + 1, 0.5), size=n).astype(np.float32)
    best = p[:, 1:].argmax(axis=1)
    labels = np.array([c.id for c in CATS])[best]
    scores = np.clip(p[np.arange(n), best + 1] + rng.uniform(0, 0.3, n), 0.0, 1.0).round(2)  # rounded: ties
    return Detections(boxes, scores, labels, probs=p if probs else None)


def view_of(rng: np.random.Generator, det: Detections, name: str) -> Detections:
    """The detector's answer on a view: boxes jittered (some copied exactly), some dropped, in the
    view's coordinates."""
    keep = rng.random(len(det)) < 0.8
    boxes = det.boxes[keep] + rng.normal(scale=2, size=(int(keep.sum()), 4)) * (rng.random((int(keep.sum()), 1)) < 0.7)
    if name == "flip":
        boxes = np.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], axis=1)
    elif name == "scale":
        sx, sy = round(W * 0.8) / W, round(H * 0.8) / H
        boxes = boxes * np.array([sx, sy, sx, sy])
    p = det.probs[keep] if det.probs is not None else None
    if p is not None:
        p = (0.7 * p + 0.3 * rng.dirichlet(np.ones(p.shape[1]), size=len(p))).astype(np.float32)
    return Detections(boxes, det.scores[keep], det.labels[keep], probs=p)


class ViewDetector:
    def __init__(self, pool: dict, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.outs = {id(v.augment): {i: view_of(rng, d, name) for i, d in pool.items()} for name, v in VIEWS.items()}
        self.plain = pool

    def predict(self, dataset, image_ids, *, embeddings=True, augment=None, **kwargs):
        store = self.plain if augment is None else self.outs[id(augment)]
        return {i: store[i] for i in image_ids if i in store}


def pool_context(
    seed: int, *, num_pool: int = 60, num_labeled: int = 8, probs: bool = True, sizes: int = 1
) -> SelectionContext:
    """``sizes``: how many image sizes the pool has (``W x H`` and larger ones)."""
    rng = np.random.default_rng(seed)
    ids = [f"p{k:03d}" if k % 3 else k for k in range(num_pool)]
    counts = rng.choice([0, 1, 2, 3, 5, 8, 13], size=num_pool)
    pool = {i: detections(rng, int(n), probs=probs) for i, n in zip(ids, counts, strict=True)}
    labeled = {f"l{k}": rng.choice([c.id for c in CATS], size=int(rng.integers(0, 4))) for k in range(num_labeled)}
    records = [ImageRecord(i, f"{i}.png", W + 7 * (k % sizes), H + 5 * (k % sizes), "train") for k, i in enumerate(ids)]
    records += [
        ImageRecord(i, f"{i}.png", W, H, "train", Target(np.tile([0, 0, 5, 5], (len(v), 1)), v))
        for i, v in labeled.items()
    ]
    emb = {i: rng.normal(size=4).astype(np.float32) for i in [*ids, *labeled]}
    return SelectionContext(
        Dataset("/nonexistent", CATS, records),
        ids,
        list(labeled),
        np.random.default_rng(seed + 100),
        predictions=pool,
        embeddings=emb,
        detector=ViewDetector({**pool, **{i: detections(rng, 3) for i in labeled}}, seed),
    )


# -- CALD ------------------------------------------------------------------------------------


def reference_cald_select(self, context, budget):  # the per-image Cald.select it replaced
    n = min(budget, len(context.pool_ids))
    pool, dataset = canonical_order(context.pool_ids), context.dataset
    columns = category_columns(dataset.categories)
    refs = [context.predictions[i] for i in pool]
    ref_probs = [box_distributions(d, columns, i) for d, i in zip(refs, pool, strict=True)]
    vectors = [class_vector(d, columns, i, self.min_score) for d, i in zip(refs, pool, strict=True)]
    consistency = np.zeros((len(pool), len(self.views)))
    for v, view_name in enumerate(self.views):
        view = VIEWS[view_name]
        outs = context.detector.predict(dataset, pool, embeddings=False, augment=view.augment)
        for k, image_id in enumerate(pool):
            ref = refs[k]
            aug = outs.get(image_id, Detections())
            vectors[k] = vectors[k] + class_vector(aug, columns, image_id, self.min_score)
            keep = ref.scores >= self.min_score
            if not keep.any() or len(aug) == 0:
                continue
            rec = dataset[image_id]
            values = box_consistency(
                ref.boxes[keep],
                ref.scores[keep],
                ref_probs[k][keep],
                view.unmap(aug.boxes, rec.width, rec.height),
                aug.scores,
                box_distributions(aug, columns, image_id),
            )
            consistency[k, v] = view_consistency(values, self.base_point)
    scores = 2.0 - consistency.mean(axis=1)
    m = min(len(pool), max(n, math.ceil(self.candidate_ratio * n - 1e-9)))
    candidates = select_top(pool, scores, m, context.rng)
    index = {image_id: k for k, image_id in enumerate(pool)}
    rows = np.array([index[i] for i in candidates.image_ids], dtype=np.int64)
    counts = labeled_class_counts(dataset, context.labeled_ids, columns)
    per_image = counts.sum() / len(context.labeled_ids) if counts.sum() > 0 else 1.0
    class_vectors = np.stack([vectors[r] for r in rows]) / (1 + len(self.views))
    order, div = class_diversity_order(class_vectors, counts, per_image, n, context.rng)
    return [pool[r] for r in rows[order]], div.tolist(), float(consistency.mean())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "params", [{}, {"min_score": 0.4}, {"base_point": 0.0, "views": ["scale", "flip"]}, {"candidate_ratio": 3.0}]
)
def test_cald_selects_exactly_what_the_per_image_version_did(seed, params):
    strategy = build_strategy("cald", **params)
    budget = 1 + seed % 7
    new = strategy.select(pool_context(seed), budget)
    ids, scores, mean = reference_cald_select(strategy, pool_context(seed), budget)
    assert new.image_ids == ids and new.scores == scores and new.info["mean_consistency"] == mean


@pytest.mark.parametrize("seed", range(3))
def test_cald_on_images_of_several_sizes_selects_what_the_per_image_version_did(seed):
    strategy = build_strategy("cald")
    new = strategy.select(pool_context(seed, sizes=3), 5)
    ids, scores, mean = reference_cald_select(strategy, pool_context(seed, sizes=3), 5)
    assert new.image_ids == ids and new.scores == scores and new.info["mean_consistency"] == mean


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the rows of JS NaN
@pytest.mark.parametrize("probs", [True, False])
def test_view_consistencies_equal_the_per_image_values(probs):
    """Including rows whose JS is not a number (an all-zero and a NaN distribution), where the
    pruning by bounds must stand aside, and blocks of a few pairs."""
    rng = np.random.default_rng(3)
    ctx = pool_context(11, num_pool=80, probs=probs)
    pool = list(ctx.pool_ids)
    refs = [ctx.predictions[i] for i in pool]
    if probs:
        a, b = [k for k, d in enumerate(refs) if len(d) >= 2][:2]
        refs[a].probs[0] = 0.0
        refs[b].probs[-1, 2] = np.nan
    augs = [view_of(rng, d, "color") for d in refs]
    expected = []
    for d, a, i in zip(refs, augs, pool, strict=True):
        if len(d) == 0 or len(a) == 0:
            expected.append(0.0)
            continue
        c = box_consistency(
            d.boxes, d.scores, box_distributions(d, COLUMNS, i), a.boxes, a.scores, box_distributions(a, COLUMNS, i)
        )
        expected.append(view_consistency(c, 1.3))
    ref_flat, aug_flat = flatten_detections(refs, pool, COLUMNS), flatten_detections(augs, pool, COLUMNS)
    for max_pairs in (1, 7, 1 << 18):
        got = view_consistencies(ref_flat, aug_flat, 1.3, max_pairs)
        np.testing.assert_array_equal(got, np.array(expected))


# -- PPAL ------------------------------------------------------------------------------------


def reference_matching_distance(features, labels, weights):  # the previous matching_distance
    m = len(features)
    feats = [np.asarray(f, dtype=np.float64) for f in features]
    sums = np.array([np.asarray(w, dtype=np.float64).sum() for w in weights])
    num = np.repeat(sums[:, None], m, axis=1)
    all_labels = np.concatenate([np.asarray(lab, dtype=np.int64) for lab in labels]) if m else np.zeros(0, np.int64)
    for cat in np.unique(all_labels):
        owner_list, f_list, w_list = [], [], []
        for i in range(m):
            sel = np.asarray(labels[i]) == cat
            if sel.any():
                owner_list.append(np.full(int(sel.sum()), i))
                f_list.append(feats[i][sel])
                w_list.append(np.asarray(weights[i], dtype=np.float64)[sel])
        owner, f, w = np.concatenate(owner_list), np.concatenate(f_list), np.concatenate(w_list)
        norm = np.linalg.norm(f, axis=1, keepdims=True)
        f = f / np.where(norm > 0, norm, 1.0)
        images, starts = np.unique(owner, return_index=True)
        acc = np.zeros((m, len(images)))
        rows = max(1, ppal_module.CHUNK_ELEMENTS // len(f))
        for lo in range(0, len(f), rows):
            dist = np.clip(1.0 - f[lo : lo + rows] @ f.T, 0.0, 1.0)
            nearest = np.minimum.reduceat(dist, starts, axis=1)
            np.add.at(acc, owner[lo : lo + rows], w[lo : lo + rows, None] * nearest)
        mass = np.bincount(owner, weights=w, minlength=m)
        num[:, images] -= mass[:, None] - acc
    empty = sums <= 0
    d = np.where(empty[:, None], 1.0, num / np.where(empty, 1.0, sums)[:, None])
    d = np.clip(0.5 * (d + d.T), 0.0, 1.0)
    d[np.ix_(empty, empty)] = 0.0
    np.fill_diagonal(d, 0.0)
    return d


@pytest.mark.parametrize("chunk", [1, 37, 1 << 22])
def test_matching_distance_equals_the_previous_one(monkeypatch, chunk):
    monkeypatch.setattr(ppal_module, "CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(chunk)
    counts = rng.choice([0, 1, 2, 4, 9, 20], size=70)
    feats = [rng.dirichlet(np.ones(6), size=n) * (rng.random((n, 1)) < 0.9) for n in counts]  # some all-zero rows
    labels = [rng.integers(1, 5, size=n) for n in counts]
    weights = [rng.random(n).round(1) for n in counts]
    # the dot products come from other BLAS blocks (a pair of image blocks gives both directions),
    # which may round the last bit differently; the rest is the same arithmetic in the same order
    np.testing.assert_allclose(
        matching_distance(feats, labels, weights),
        reference_matching_distance(feats, labels, weights),
        rtol=0,
        atol=1e-15,
    )


def reference_ppal_select(self, context, budget):  # the per-image Ppal.select it replaced
    n = min(budget, len(context.pool_ids))
    pool = canonical_order(context.pool_ids)
    columns = category_columns(context.dataset.categories)
    dets = [context.predictions[i] for i in pool]
    probs = [box_distributions(d, columns, i) for d, i in zip(dets, pool, strict=True)]
    cols = [box_columns(d, columns, i) for d, i in zip(dets, pool, strict=True)]
    class_max = np.zeros((len(pool), len(columns)))
    for k, (det, c) in enumerate(zip(dets, cols, strict=True)):
        keep = det.scores >= self.min_score
        np.maximum.at(class_max[k], c[keep] - 1, det.scores[keep].astype(np.float64))
    weights = difficulty_weights(class_quality(class_max), self.class_weight_ub, self.class_weight_alpha)
    scores = np.zeros(len(dets))
    for k, (det, c) in enumerate(zip(dets, cols, strict=True)):
        keep = det.scores >= self.min_score
        scores[k] = float((weights[c[keep] - 1] * binary_entropy(det.scores[keep])).sum())
    m = min(len(pool), max(n, math.ceil(self.candidate_ratio * n - 1e-9)))
    candidates = select_top(pool, scores, m, context.rng)
    index = {image_id: k for k, image_id in enumerate(pool)}
    rows = np.array([index[i] for i in candidates.image_ids], dtype=np.int64)
    keeps = [dets[r].scores >= self.min_score for r in rows]
    distance = reference_matching_distance(
        [probs[r][keep] for r, keep in zip(rows, keeps, strict=True)],
        [cols[r][keep] for r, keep in zip(rows, keeps, strict=True)],
        [dets[r].scores[keep] for r, keep in zip(rows, keeps, strict=True)],
    )
    medoids, _ = k_medoids(distance, n, context.rng, self.max_iter)
    picked = rows[medoids]
    picked = picked[np.argsort(-scores[picked], kind="stable")]
    return [pool[r] for r in picked], scores[picked].tolist()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("params", [{}, {"min_score": 0.3}, {"candidate_ratio": 1.0}])
def test_ppal_selects_exactly_what_the_per_image_version_did(seed, params):
    strategy = build_strategy("ppal", **params)
    budget = 1 + seed % 9
    new = strategy.select(pool_context(seed, probs=seed % 2 == 0), budget)
    ids, scores = reference_ppal_select(strategy, pool_context(seed, probs=seed % 2 == 0), budget)
    assert new.image_ids == ids and new.scores == scores


# -- CDAL ------------------------------------------------------------------------------------


def reference_contextual_features(predictions, image_ids, columns, min_score=0.0):  # the previous version
    k = len(columns)
    out = np.zeros((len(image_ids), k * (k + 1)), dtype=np.float32)
    for row, image_id in enumerate(image_ids):
        det = predictions[image_id]
        keep = det.scores >= min_score
        probs = box_distributions(det, columns, image_id)[keep]
        conf, _ = class_confusion(probs, box_columns(det, columns, image_id)[keep], k)
        out[row] = np.sqrt(np.clip(conf, 0.0, None)).reshape(-1)
    return out


@pytest.mark.parametrize("min_score", [0.0, 0.35])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_contextual_features_equal_the_per_image_ones(min_score, chunk):
    ctx = pool_context(int(100 * min_score) + chunk, num_pool=90, probs=chunk != 5)
    ids = list(ctx.pool_ids)
    got = contextual_features(ctx.predictions, ids, COLUMNS, min_score, chunk=chunk)
    np.testing.assert_array_equal(got, reference_contextual_features(ctx.predictions, ids, COLUMNS, min_score))


@pytest.mark.parametrize("seed", range(4))
def test_cdal_selects_what_it_selected_before(monkeypatch, seed):
    strategy = build_strategy("cdal")
    new = strategy.select(pool_context(seed), 5)
    monkeypatch.setattr(cdal_module, "contextual_features", reference_contextual_features)
    old = strategy.select(pool_context(seed), 5)
    assert new.image_ids == old.image_ids and new.scores == old.scores and new.info == old.info


# -- threads ---------------------------------------------------------------------------------


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_ordered_map_is_serial_on_one_thread_and_ordered_and_lazy_on_several(monkeypatch, torch_threads):
    torch_threads(1)  # the run's threads setting (1 in the process executor's workers)
    assert thread_limit() == 1
    ran_on = []

    def square(x: int) -> int:
        ran_on.append(threading.get_ident())
        time.sleep(0.002 * (6 - x))  # the first items finish last
        return x * x

    assert list(ordered_map(square, range(6), 6)) == [0, 1, 4, 9, 16, 25]
    assert set(ran_on) == {threading.get_ident()}  # no pool
    monkeypatch.setattr(math_module, "thread_limit", lambda: 2)
    ran_on.clear()
    pulled = []

    def items():
        for x in range(6):
            pulled.append(x)
            yield x

    results = ordered_map(square, items(), 6)
    assert next(results) == 0 and len(pulled) <= 3  # 2 threads: at most one item more taken than they run
    assert list(results) == [1, 4, 9, 16, 25]
    assert threading.get_ident() not in ran_on and len(set(ran_on)) == 2


def _select_on(monkeypatch, threads: int, name: str, seed: int):
    monkeypatch.setattr(math_module, "thread_limit", lambda: threads)
    selection = build_strategy(name).select(pool_context(seed, num_pool=90), 6)
    return selection.image_ids, selection.scores, selection.info


@pytest.mark.parametrize("seed", range(3))
def test_threads_change_no_number(monkeypatch, seed):
    """CALD's blocks of images and PPAL's categories computed on 1 and on 3 threads: the same
    picks, scores and matrices bit for bit. (OpenBLAS rounds float32 products differently with
    its own thread count, whatever this code does; the threaded path uses one BLAS thread, so
    the serial one here does too.)"""
    monkeypatch.setattr(cald_module, "view_consistencies", functools.partial(view_consistencies, max_pairs=40))
    ctx = pool_context(seed, num_pool=90)
    refs = [ctx.predictions[i] for i in ctx.pool_ids]
    augs = [view_of(np.random.default_rng(seed), d, "scale") for d in refs]
    ref, aug = flatten_detections(refs, ctx.pool_ids, COLUMNS), flatten_detections(augs, ctx.pool_ids, COLUMNS)
    rng = np.random.default_rng(seed)
    counts = rng.choice([0, 1, 2, 4, 9], size=70)
    distances = ppal_module.MatchingDistance(
        [rng.dirichlet(np.ones(6), size=n) for n in counts],
        [rng.choice(5, size=n, p=[0.5, 0.3, 0.1, 0.07, 0.03]) for n in counts],  # common and rare categories
        [rng.random(n).round(1) for n in counts],
    )
    rows = rng.choice(70, 9, replace=False)
    with threadpool_limits(1, user_api="blas"):
        serial, threaded = [
            (
                _select_on(monkeypatch, threads, "cald", seed),
                _select_on(monkeypatch, threads, "ppal", seed),
                view_consistencies(ref, aug, 1.3, max_pairs=25),
                distances.matrix(),
                distances.matrix(np.float32),
                distances.rows(rows),
            )
            for threads in (1, 3)
        ]
    assert serial[:2] == threaded[:2]
    for a, b in zip(serial[2:], threaded[2:], strict=True):
        np.testing.assert_array_equal(a, b)


# -- the subset option of the k-center strategies -------------------------------------------


@pytest.mark.parametrize("name", ["core_set", "cdal"])
def test_subset_bounds_the_search_and_covering_it_changes_nothing(name):
    whole = build_strategy(name).select(pool_context(1), 6)
    covering = build_strategy(name, subset=1000).select(pool_context(1), 6)
    assert covering.image_ids == whole.image_ids and "searched" not in whole.info
    part = build_strategy(name, subset=20).select(pool_context(1), 6)
    assert len(set(part.image_ids)) == 6 and set(part.image_ids) <= set(pool_context(1).pool_ids)
    assert part.info["searched"] == 20
    assert build_strategy(name, subset=2).select(pool_context(1), 6).info["searched"] == 6  # at least the budget
    assert part.image_ids == build_strategy(name, subset=20).select(pool_context(1), 6).image_ids


@pytest.mark.parametrize("name", ["core_set", "cdal"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True, "10"])
def test_bad_subset_is_a_config_error(name, value):
    from mgral.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{name}: subset must be a positive integer or null"):
        build_strategy(name, subset=value)
