"""PPAL: difficulty-calibrated uncertainty, then category-conditioned matching diversity.

Stage 1, difficulty calibrated uncertainty sampling (DCUS). Each box with ``score >=
min_score`` has the binary entropy of its score, ``u = H(s) = -s ln s - (1 - s) ln(1 - s)``
(the official code's ``cls_uncertainty``), multiplied by its category's difficulty weight

    w_k = 1 + class_weight_alpha * class_weight_ub * ln(b (1 - q_k) + 1),   b = e^(1 / alpha) - 1

which runs from 1 (quality ``q_k = 1``: an easy category) to ``1 + class_weight_ub``
(``q_k = 0``). An image's score is the sum of its boxes' weighted entropies (0 without
boxes). The ``ceil(candidate_ratio * budget)`` highest-scoring images form the candidate
pool.

The category quality ``q_k`` here is a label-free proxy computed from the pool's
predictions: the mean, over the pool images with a box of category ``k`` scoring at least
``min_score``, of that image's highest score for ``k``. Categories the detector is rarely
sure of count as difficult. (The paper keeps, during training, a running average of each
category's detection quality on the labeled images; that needs a training hook this
strategy does not have.)

Stage 2, category conditioned matching similarity (CCMS). The distance from image ``A`` to
image ``B`` is the score-weighted mean, over ``A``'s boxes, of the cosine distance from
the box to the nearest box of the same category in ``B`` (1, the largest, when ``B`` has
none); it is symmetrized as ``(d(A, B) + d(B, A)) / 2``. Two images without boxes are at
distance 0, one without boxes is at distance 1 from every other. The batch is the
``budget`` medoids of a k-medoids clustering of the candidates under that distance,
seeded by greedy k-center (farthest-first from a random candidate) and refined for at most
``max_iter`` iterations, as in the official code. The selection's scores are the picks'
stage-1 scores, highest first. (The matrix is computed from float32 dot products; every
k-medoids decision that their proven error bound leaves open is settled on float64 rows,
so the medoids are those of the float64 matrix.)

Departures from the paper and the official code (``ChenhongyiYang/PPAL``):

* boxes are compared by their class-probability vectors (``Detections.probs``) instead of
  RoI features sampled from the FPN: our detections carry class distributions, not
  region features. Same-category boxes thus differ only in how their probability is
  spread, so CCMS mostly measures which categories two images share and how confidently.
* the difficulty coefficient uses the proxy above, not the training-time class quality.
* an image without boxes is at distance 1 from images with boxes (the official code gives
  0 there, a case its comments flag as a potential bug).
* any detector's predictions, e.g. this project's single-stage FCOS; the paper used
  RetinaNet (and Faster R-CNN). Nothing is retrained inside the strategy.
* ``candidate_ratio`` defaults to 3 (the official configs expand the budget 4 times).

References:
    Yang, Huang, Crowley, "Plug and Play Active Learning for Object Detection", CVPR
    2024; arXiv:2211.11612.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import entr

from mgral.data.records import Detections
from mgral.strategies._detection_math import (
    canonical_order,
    category_columns,
    check_int,
    check_number,
    flatten_detections,
    ordered_map,
)
from mgral.strategies.base import Selection, SelectionContext, Strategy, check_budget, register_strategy, select_top

CHUNK_ELEMENTS = 1 << 22
"""Largest box-distance block (boxes x boxes of one category) held at once."""
SETTLE_ROWS = 64
"""Exact distance rows computed at a time by :func:`k_medoids`."""


def binary_entropy(scores: np.ndarray) -> np.ndarray:
    """float64 ``H(s) = -s ln s - (1 - s) ln(1 - s)`` in nats, ``[0, ln 2]``."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    return entr(s) + entr(1.0 - s)


def class_quality(class_max: np.ndarray) -> np.ndarray:
    """float64 ``[K]``: per category, the mean over images of its highest score there.

    Args:
        class_max: ``[P, K]`` highest score of a box of each category in each image, 0 where
            the image has none; images without the category do not count. A category no
            image has gets quality 0.
    """
    c = np.asarray(class_max, dtype=np.float64)
    present = (c > 0).sum(axis=0)
    return np.where(present > 0, c.sum(axis=0) / np.maximum(present, 1), 0.0)


def difficulty_weights(quality: np.ndarray, upper: float, alpha: float) -> np.ndarray:
    """``1 + alpha * upper * ln(b (1 - q) + 1)`` with ``b = e^(1/alpha) - 1``: 1 at ``q = 1``,
    ``1 + upper`` at ``q = 0`` (the official DCUS class weight)."""
    b = math.expm1(1.0 / alpha)
    return 1.0 + alpha * upper * np.log1p(b * (1.0 - np.clip(quality, 0.0, 1.0)))


def matching_distance(
    features: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    *,
    dtype: type = np.float64,
) -> np.ndarray:
    """Category-conditioned matching distance between images, float64 ``[M, M]``, symmetric,
    zero diagonal, in ``[0, 1]`` (:meth:`MatchingDistance.matrix`).

    Args:
        features: per image, ``[n_i, D]`` non-negative box feature vectors (compared by cosine).
        labels: per image, ``[n_i]`` box categories (only equal categories are matched).
        weights: per image, ``[n_i]`` box weights (scores) of the weighted mean.
        dtype: of the cosine dot products (see :meth:`MatchingDistance.matrix`).

    ``d(A, B)`` is the weighted mean over ``A``'s boxes of the cosine distance to the nearest
    same-category box of ``B`` (1 without one); the result is ``(d(A, B) + d(B, A)) / 2``.
    """
    return MatchingDistance(features, labels, weights).matrix(dtype)


class MatchingDistance:
    """The boxes of ``M`` images prepared for :func:`matching_distance`: the whole matrix, or
    some of its rows (same arguments)."""

    def __init__(self, features: Sequence[np.ndarray], labels: Sequence[np.ndarray], weights: Sequence[np.ndarray]):
        m = len(features)
        counts = np.fromiter((len(f) for f in features), dtype=np.int64, count=m)
        self.dim = next((np.shape(f)[1] for f in features if np.ndim(f) == 2), 0)
        feats = np.concatenate([np.asarray(f, dtype=np.float64).reshape(-1, self.dim) for f in features]) if m else None
        all_labels = np.concatenate([np.asarray(lab, dtype=np.int64) for lab in labels]) if m else np.zeros(0, np.int64)
        all_w = np.concatenate([np.asarray(w, dtype=np.float64) for w in weights]) if m else np.zeros(0)
        owner_all = np.repeat(np.arange(m), counts)
        self.m = m
        self.sums = np.array([np.asarray(w, dtype=np.float64).sum() for w in weights])
        self.categories = []  # per category: unit features, weights, owners (grouped in image order), images, starts
        for cat in np.unique(all_labels):
            sel = all_labels == cat
            owner, f, w = owner_all[sel], feats[sel], all_w[sel]
            norm = np.linalg.norm(f, axis=1, keepdims=True)
            images, starts, boxes = np.unique(owner, return_index=True, return_counts=True)
            self.categories.append((f / np.where(norm > 0, norm, 1.0), w, owner, images, starts, boxes))

    def matrix(self, dtype: type = np.float64) -> np.ndarray:
        """float64 ``[M, M]``. ``dtype``: of the cosine dot products; with ``np.float32`` every entry
        is within :meth:`error` of the float64 one (sums and weights stay float64). The categories
        are computed on the run's threads (:func:`ordered_map`) and added in their order."""
        m, sums = self.m, self.sums
        num = np.repeat(sums[:, None], m, axis=1)  # every box unmatched (distance 1) until a same-category box is found
        parts = ordered_map(lambda category: self._matched(category, dtype), self.categories, len(self.categories))
        for images, matched in parts:
            if images is None:
                num -= matched
            else:
                num[np.ix_(images, images)] -= matched
        return self._symmetric(num, num, np.arange(m))

    def _matched(self, category: tuple, dtype: type) -> tuple[np.ndarray | None, np.ndarray]:
        """One category's ``(images, mass - acc)``: its images and, per pair of them, how much their
        matches take off the unmatched sum (the box weights, less the weighted distances). A category
        of at least half the images gives ``(None, [M, M])``, 0 for the pairs it does not have (``x - 0``
        is ``x``): one pass over the matrix takes it off, instead of a scatter on the calling thread."""
        f, w, owner, images, starts, boxes = category
        f = f.astype(dtype, copy=False)
        by_count = np.argsort(boxes, kind="stable")
        images, starts, boxes = images[by_count], starts[by_count], boxes[by_count]
        acc = np.zeros((len(images), len(images)))  # [box's image, other image]: sum of w * distance
        blocks = _slot_blocks(starts, boxes, max(1, math.isqrt(CHUNK_ELEMENTS)))
        feats_of = [f[rows] for _, rows in blocks]
        for k, (a, a_rows) in enumerate(blocks):
            f_a, w_a = feats_of[k], w[a_rows]
            for (b, b_rows), f_b in zip(blocks[k:], feats_of[k:], strict=True):
                # the dot products are symmetric: one block gives both images' nearest boxes;
                # clip(1 - x, 0, 1) does not increase with x, so the nearest box of an image
                # (the smallest distance) is the one of largest dot product: reduce, then map
                dots = f_b @ f_a.T  # [b's boxes, a's boxes], both slot by slot
                slots_b, slots_a = len(b_rows) // (b.stop - b.start), len(a_rows) // (a.stop - a.start)
                nearest = dots.reshape(slots_b, b.stop - b.start, -1).max(axis=0)  # [b images, a's boxes]
                acc[a, b] += _sum_slots(w_a * _distance(nearest), slots_a, axis=1).T
                if b != a:
                    nearest = dots.reshape(len(b_rows), slots_a, -1).max(axis=1)  # [b's boxes, a images]
                    acc[b, a] += _sum_slots(w[b_rows, None] * _distance(nearest), slots_b, axis=0)
        mass = np.bincount(owner, weights=w, minlength=self.m)[images]
        if 2 * len(images) < self.m:
            return images, mass[:, None] - acc
        matched = np.zeros((self.m, self.m))
        matched[np.ix_(images, images)] = mass[:, None] - acc
        return None, matched

    def rows(self, rows: Sequence[int]) -> np.ndarray:
        """float64 ``[len(rows), M]``: the rows of the (float64) :meth:`matrix` of these distinct
        images, up to float64 rounding (sums in another order); their block is symmetric."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        m, sums = self.m, self.sums
        num = np.repeat(sums[rows, None], m, axis=1)  # [row, image]: the row's boxes, sum of w * distance
        num_in = np.repeat(sums[:, None], len(rows), axis=1)  # [image, row]: the image's boxes to the row
        position = np.full(m, -1)
        position[rows] = np.arange(len(rows))

        def matched(category: tuple) -> tuple | None:  # as in matrix: what the category's matches take off
            f, w, owner, images, starts, _ = category
            mine = np.flatnonzero(position[owner] >= 0)  # boxes of the rows, grouped by image
            if not len(mine):
                return None
            row_images, row_starts = np.unique(owner[mine], return_index=True)
            dots = f[mine] @ f.T  # [rows' boxes, boxes]
            nearest = _distance(np.maximum.reduceat(dots, starts, axis=1))  # [rows' boxes, images]
            to = np.add.reduceat(w[mine, None] * nearest, row_starts, axis=0)  # [row images, images]
            nearest = _distance(np.maximum.reduceat(dots, row_starts, axis=0))  # [row images, boxes]
            back = np.add.reduceat(w[None, :] * nearest, starts, axis=1)  # [row images, images]
            mass = np.bincount(owner, weights=w, minlength=m)
            return position[row_images], images, mass[row_images, None] - to, (mass[None, images] - back).T

        for part in ordered_map(matched, self.categories, len(self.categories)):
            if part is not None:
                at, images, taken_out, taken_in = part
                num[np.ix_(at, images)] -= taken_out
                num_in[np.ix_(images, at)] -= taken_in
        num_in[rows] = num[:, rows]  # among the rows, both ways from the same sums
        return self._symmetric(num, num_in, rows)

    def _symmetric(self, num: np.ndarray, num_in: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``(d(A, B) + d(B, A)) / 2`` for ``A`` in ``rows``, from the weighted sums both ways."""
        empty = self.sums <= 0
        total = np.where(empty, 1.0, self.sums)
        one_way = np.where(empty[rows, None], 1.0, num / total[rows, None])
        other_way = np.where(empty[None, :], 1.0, num_in.T / total[None, :])
        d = np.clip(0.5 * (one_way + other_way), 0.0, 1.0)
        d[np.ix_(empty[rows], empty)] = 0.0
        d[np.arange(len(rows)), rows] = 0.0
        return d

    def error(self, dtype: type = np.float32) -> float:
        """A bound on ``|d - d64|`` for every entry ``d`` of :meth:`matrix` computed with ``dtype``
        dot products against ``d64`` from float64 ones. A cosine of non-negative unit vectors is
        off by at most ``(D + 2) u`` (``u`` the unit roundoff of ``dtype``: the rounding of the
        features, then of a ``D``-term sum of products in any order, Higham's ``gamma_D``),
        ``1 - x`` adds ``u``; the maximum, clip, weighted mean and symmetrization do not increase
        it. One more ``u`` and 1e-12 cover the float64 roundings of both."""
        return (self.dim + 4) * float(np.finfo(dtype).eps) / 2 + 1e-12


def _slot_blocks(starts: np.ndarray, boxes: np.ndarray, size: int) -> list[tuple[slice, np.ndarray]]:
    """Images (sorted by box count) in blocks of equal count ``k`` and at most ``size`` boxes
    (or one image), each with its boxes' rows slot by slot: every image's first box, then every
    second box, ..., so that a maximum over an image's boxes is one over ``k`` slabs."""
    out = []
    first = np.flatnonzero(np.r_[True, boxes[1:] != boxes[:-1]]).tolist()
    for lo, hi in zip(first, [*first[1:], len(boxes)], strict=True) if len(boxes) else ():
        k = int(boxes[lo])
        step = max(1, size // k)
        for a in range(lo, hi, step):
            sl = slice(a, min(a + step, hi))
            out.append((sl, (starts[sl] + np.arange(k)[:, None]).reshape(-1)))
    return out


def _distance(dots: np.ndarray) -> np.ndarray:
    """``clip(1 - dots, 0, 1)``, in place."""
    np.subtract(1.0, dots, out=dots)
    return np.clip(dots, 0.0, 1.0, out=dots)


def _sum_slots(values: np.ndarray, slots: int, axis: int) -> np.ndarray:
    """Sum of the ``slots`` equal slabs of ``values`` along ``axis``, added one after the other
    from zero (an image's boxes in their order: the same sums, rounding included, as adding the
    boxes' terms one by one)."""
    slabs = values.reshape(values.shape[:axis] + (slots, -1) + values.shape[axis + 1 :])
    at = (slice(None),) * axis
    out = np.zeros_like(slabs[at + (0,)])
    for slot in range(slots):
        out += slabs[at + (slot,)]
    return out


def k_medoids(
    distance: np.ndarray,
    k: int,
    rng: np.random.Generator,
    max_iter: int = 100,
    *,
    error: float = 0.0,
    exact_rows: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, int]:
    """``k`` medoids of a precomputed distance matrix.

    Seeded by greedy k-center (a random first point, then each time the point farthest from
    the chosen ones), then Voronoi iteration: assign every point to its nearest medoid,
    move each medoid to the member with the least total distance to its cluster (keeping
    the current one on ties), until nothing moves or ``max_iter`` iterations.

    Args:
        distance: float ``[M, M]`` symmetric; with ``error > 0`` each entry may be off by up to
            ``error`` from the exact one.
        error: bound on the entries' error. A decision (farthest point, nearest medoid, least
            total distance) that the bound leaves open is settled on the exact rows of the
            points involved, so the result is that of the exact matrix.
        exact_rows: the exact rows of the given points, float64 ``[len(rows), M]``, symmetric among
            them (needed when ``error > 0``).

    Returns:
        ``(medoids, iterations)``: int64 ``[k]`` row indices and the iterations run.
    """
    m = len(distance)
    perm = rng.permutation(m)  # first-index rules below then break ties at random
    d = _Distances(np.asarray(distance, dtype=np.float64)[np.ix_(perm, perm)], error, exact_rows, perm)
    medoids = [0]
    min_d = d.d[:, 0].copy()
    min_d[0] = -np.inf
    for _ in range(1, k):
        while True:
            slack = d.slack(np.arange(m))
            near = np.flatnonzero(min_d + slack >= (min_d - slack).max())  # the farthest is one of these
            if len(near) == 1 or d.exact[near].all():
                break
            d.settle(near)
            min_d = d.d[:, medoids].min(axis=1)
            min_d[medoids] = -np.inf
        i = int(np.argmax(min_d))
        medoids.append(i)
        np.minimum(min_d, d.d[:, i], out=min_d)
        min_d[medoids] = -np.inf
    meds = np.array(medoids, dtype=np.int64)
    it = 0
    while it < max_iter:
        it += 1
        to_meds, slack = d.d[:, meds], d.slack(np.arange(m), meds)
        open_ = ((to_meds - slack) <= (to_meds + slack).min(axis=1, keepdims=True)).sum(axis=1) > 1
        open_[meds] = False
        if open_.any():  # a nearest medoid within the error of another
            d.settle(np.flatnonzero(open_))
            to_meds = d.d[:, meds]
        assign = np.argmin(to_meds, axis=1)
        assign[meds] = np.arange(k)  # a medoid belongs to its own cluster, even if a duplicate is nearer
        new = meds.copy()
        for c in range(k):
            members = np.flatnonzero(assign == c)
            if len(members) <= 2:  # the two costs are the same entry: the medoid stays
                continue
            cost = d.d[np.ix_(members, members)].sum(axis=1)
            slack = d.slack(members, members).sum(axis=1)
            if slack.any():  # float64 sums of other terms round differently too
                slack += 2.0 * len(members) ** 2 * float(np.finfo(np.float64).eps)
                if ((cost - slack) <= (cost + slack).min()).sum() > 1:
                    d.settle(members)
                    cost = d.d[np.ix_(members, members)].sum(axis=1)
            best = int(np.argmin(cost))
            if cost[best] < cost[members == meds[c]][0]:
                new[c] = members[best]
        if np.array_equal(new, meds):
            break
        meds = new
    return perm[meds], it


class _Distances:
    """A distance matrix (in ``perm`` order) whose entries are within ``error`` of the exact ones
    until their row or column is settled: replaced by ``exact_rows``."""

    def __init__(self, d: np.ndarray, error: float, exact_rows, perm: np.ndarray) -> None:
        self.d, self.error, self.exact_rows, self.perm = d, error, exact_rows, perm
        self.exact = np.full(len(d), error <= 0)

    def slack(self, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """The error bound of ``d[rows]`` (``cols`` given: ``d[rows][:, cols]``)."""
        if cols is None:
            return np.where(self.exact[rows], 0.0, self.error)
        return self.error * (~self.exact[rows, None] & ~self.exact[None, cols])

    def settle(self, rows: np.ndarray) -> None:
        """Make the rows (and columns) ``rows`` exact; entries already exact are kept."""
        rows = rows[~self.exact[rows]]
        for lo in range(0, len(rows), SETTLE_ROWS):
            part = rows[lo : lo + SETTLE_ROWS]
            new = self.exact_rows(self.perm[part])[:, self.perm]
            new[:, self.exact] = self.d[np.ix_(part, np.flatnonzero(self.exact))]
            self.d[part] = new
            self.d[:, part] = new.T
            self.exact[part] = True


def dcus_scores(
    dets: Sequence[Detections], cols: Sequence[np.ndarray], weights: np.ndarray, min_score: float
) -> np.ndarray:
    """float64 ``[P]``: sum over each image's boxes (``score >= min_score``) of the category's
    difficulty weight times the binary entropy of the score."""
    out = np.zeros(len(dets))
    for k, (det, c) in enumerate(zip(dets, cols, strict=True)):
        keep = det.scores >= min_score
        out[k] = float((weights[c[keep] - 1] * binary_entropy(det.scores[keep])).sum())
    return out


@register_strategy("PPAL: difficulty-calibrated uncertainty, then k-medoids on category-matched box similarity")
class Ppal(Strategy):
    """Plug-and-play active learning for detection (see the module doc).

    Args:
        candidate_ratio: the uncertainty stage keeps ``ceil(candidate_ratio * budget)``
            images for the diversity stage; at least 1.
        min_score: boxes scoring below it are ignored (official ``score_thr``: 0.05).
        class_weight_ub: the most a category's difficulty adds to its weight (official: 0.2).
        class_weight_alpha: shape of the difficulty weight, in ``[0.01, 100]`` (official: 0.3).
        max_iter: k-medoids iterations at most (official: 100).

    Raises:
        ConfigError: a parameter out of range.
    """

    name = "ppal"
    requires = frozenset({"predictions"})

    def __init__(
        self,
        *,
        candidate_ratio: float = 3.0,
        min_score: float = 0.05,
        class_weight_ub: float = 0.2,
        class_weight_alpha: float = 0.3,
        max_iter: int = 100,
    ) -> None:
        self.candidate_ratio = check_number("ppal", "candidate_ratio", candidate_ratio, 1.0)
        self.min_score = check_number("ppal", "min_score", min_score, 0.0, 1.0)
        self.class_weight_ub = check_number("ppal", "class_weight_ub", class_weight_ub, 0.0)
        self.class_weight_alpha = check_number("ppal", "class_weight_alpha", class_weight_alpha, 0.01, 100.0)
        self.max_iter = check_int("ppal", "max_iter", max_iter, 1)

    def select(self, context: SelectionContext, budget: int) -> Selection:
        n = check_budget(context, budget, self.requires)
        pool = canonical_order(context.pool_ids)  # pool order never matters, ties go to rng
        columns = category_columns(context.dataset.categories)
        flat = flatten_detections([context.predictions[i] for i in pool], pool, columns)
        keep = flat.scores >= self.min_score
        class_max = np.zeros((len(pool), len(columns)))
        np.maximum.at(class_max, (flat.image[keep], flat.cols[keep] - 1), flat.scores[keep].astype(np.float64))
        weights = difficulty_weights(class_quality(class_max), self.class_weight_ub, self.class_weight_alpha)
        # dcus_scores of every image: each image's weighted entropies summed on their own, as it does
        values = (weights[flat.cols - 1] * binary_entropy(flat.scores))[keep]
        ends = np.cumsum(np.bincount(flat.image[keep], minlength=len(pool))).tolist()
        scores = np.array([float(values[a:b].sum()) for a, b in zip([0, *ends[:-1]], ends, strict=True)])
        m = min(len(pool), max(n, math.ceil(self.candidate_ratio * n - 1e-9)))
        candidates = select_top(pool, scores, m, context.rng)
        index = {image_id: k for k, image_id in enumerate(pool)}
        rows = np.array([index[i] for i in candidates.image_ids], dtype=np.int64)
        spans = [slice(a, a + c) for a, c in zip(flat.starts[rows].tolist(), flat.counts[rows].tolist(), strict=True)]
        keeps = [keep[s] for s in spans]
        distances = MatchingDistance(
            [flat.probs[s][k] for s, k in zip(spans, keeps, strict=True)],
            [flat.cols[s][k] for s, k in zip(spans, keeps, strict=True)],
            [flat.scores[s][k] for s, k in zip(spans, keeps, strict=True)],
        )
        # float32 dot products, and float64 rows wherever their rounding could change a decision
        medoids, iterations = k_medoids(
            distances.matrix(np.float32),
            n,
            context.rng,
            self.max_iter,
            error=distances.error(np.float32),
            exact_rows=distances.rows,
        )
        picked = rows[medoids]
        picked = picked[np.argsort(-scores[picked], kind="stable")]
        info = {"candidates": m, "class_weights": weights.tolist(), "kmedoids_iterations": iterations}
        return Selection([pool[r] for r in picked], scores[picked].tolist(), info)
