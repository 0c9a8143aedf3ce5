"""Core-set selection: k-center greedy on image embeddings.

Each step picks the pool image farthest (Euclidean) from its nearest center, where the
centers are the labeled images and those picked so far; the pick's score is that
distance. The selection thus covers the embedding space: far from what is labeled, and
spread out rather than piled on one dense region.

References:
    Sener and Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
    Approach", ICLR 2018 (algorithm 1, k-center greedy; the robust MIP variant is not
    implemented).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mgral.data.records import ImageId
from mgral.errors import ConfigError
from mgral.strategies.base import Selection, SelectionContext, Strategy, check_budget, register_strategy

CHUNK_ELEMENTS = 1 << 24
"""Largest distance block (pool rows x centers) held at once: 64 MiB of float32."""
BOUND_CENTERS = 1024
"""Labeled centers (evenly spaced) whose float32 distances bound every pool point's distance
from above; only points whose bound can still beat the picks are measured in float64."""
MEASURE_STEP = 1024
"""Points measured in float64 at least at a time (half as many more as are measured already)."""


def k_center_greedy(
    pool: np.ndarray, centers: np.ndarray, n: int, rng: np.random.Generator, *, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center selection of ``n`` pool points.

    Distances are float64 Euclidean distances between the (float32) embeddings; the picks are
    those of the textbook loop on them (each step the pool point farthest from its nearest
    center, ties to the first in a random order), computed without measuring every point:

    * an upper bound of every point's distance to the labeled centers, from float32 distances
      to :data:`BOUND_CENTERS` of them plus a rigorous rounding bound;
    * exact float64 distances (norm expansion, rounding below 1e-12 relative; near-ties
      within its rounding bound are settled on directly computed differences) for the points
      of largest bound only, as many as needed for the farthest one to beat every bound left.

    A point whose bound is below the farthest measured distance can never be picked, nor ever
    matter, since distances only shrink as centers are added.

    Args:
        pool: float ``[P, D]`` embeddings of the selectable points.
        centers: float ``[L, D]`` embeddings already covered (labeled); ``L`` may be 0, in
            which case the first pick is a pool point drawn by ``rng``.
        n: points to pick, ``1 <= n <= P``.
        rng: breaks ties (and draws the first point when ``L == 0``).
        normalize: L2-normalize every embedding first, so that distances compare
            directions (feature scale varies across images and training cycles).

    Returns:
        ``(indices, distances)``: int64 ``[n]`` rows of ``pool`` in pick order, and float64
        ``[n]`` the distance of each pick to its nearest center when picked
        (non-increasing). With ``L == 0`` the random first pick is scored with the largest
        distance from it to any other pool point, so scores stay finite.
    """
    x = prepare_embeddings(pool, normalize)
    c = prepare_embeddings(centers, normalize).reshape(-1, x.shape[1])
    perm = rng.permutation(len(x))  # the first-index rule below then breaks ties uniformly at random
    x = x[perm]
    cover = _Cover(x, c if len(c) else x[:1])
    picked = np.empty(n, dtype=np.int64)
    sq_dist = np.empty(n, dtype=np.float64)
    start = 0
    if not len(c):  # the first pick is the random pool point 0; its score is the radius it leaves
        cover.pick(0)
        picked[0], sq_dist[0], start = 0, cover.farthest()[1] if len(x) > 1 else 0.0, 1
    for t in range(start, n):
        picked[t], sq_dist[t] = cover.farthest()
        cover.pick(picked[t])
    # the float64 values are within 1e-12 of the exact ones, which never increase
    return perm[picked], np.sqrt(np.maximum(np.minimum.accumulate(sq_dist), 0.0))


class _Cover:
    """Squared distances of pool points to their nearest center, measured lazily (see
    :func:`k_center_greedy`): ``farthest`` and ``pick`` drive the greedy loop."""

    def __init__(self, x: np.ndarray, centers: np.ndarray) -> None:
        self.x, self.centers = x, centers
        self.done = np.zeros(len(x), dtype=bool)
        # Distances do not change under translation; centring keeps the norm expansion from
        # cancelling large norms (e.g. non-negative ReLU features far from the origin).
        self.mean = x.mean(axis=0, dtype=np.float64)
        dim = x.shape[1]
        # the largest centred norm, with room for the float32 rounding of the mean
        norm = max(_max_norm(x - self.mean), _max_norm(centers - self.mean)) + float(np.linalg.norm(self.mean)) * 2**-22
        norm = norm * (1 + 1e-6) + 1e-30
        self.slack32 = _rounding_bound(dim, np.finfo(np.float32).eps / 2, norm)
        self.slack = _rounding_bound(dim, np.finfo(np.float64).eps / 2, norm)
        self.bound = self._upper_bounds()
        self.order = np.argsort(-self.bound, kind="stable")  # measured in this order
        self.active = np.zeros(0, dtype=np.int64)  # pool rows measured in float64: order[:k]
        self.rows = np.zeros((0, dim))  # their centred float64 rows, squared norms and distances
        self.sq = np.zeros(0)
        self.dist = np.zeros(0)
        self.center_rows = [centers]  # float32: the labeled, then one per pick

    def _upper_bounds(self) -> np.ndarray:
        """float64 ``[P]``: each point's squared distance to its nearest center is at most this."""
        step = max(1, len(self.centers) // BOUND_CENTERS)
        mean = self.mean.astype(np.float32)
        c = self.centers[::step][:BOUND_CENTERS] - mean
        c_sq = np.einsum("ij,ij->i", c, c)
        out = np.empty(len(self.x))
        rows = max(1, CHUNK_ELEMENTS // len(c))
        for lo in range(0, len(self.x), rows):
            xb = self.x[lo : lo + rows] - mean
            d = np.einsum("ij,ij->i", xb, xb)[:, None] + c_sq[None, :] - 2.0 * (xb @ c.T)
            out[lo : lo + rows] = d.min(axis=1)
        return out + self.slack32

    def _grow(self) -> None:
        """Measure the next points in bound order against every center so far."""
        k = len(self.active)
        new = self.order[k : k + max(MEASURE_STEP, k // 2)]
        rows = self.x[new].astype(np.float64) - self.mean
        sq = np.einsum("ij,ij->i", rows, rows)
        dist = np.full(len(new), np.inf)
        centers = np.concatenate(self.center_rows).astype(np.float64) - self.mean
        c_sq = np.einsum("ij,ij->i", centers, centers)
        step = max(1, CHUNK_ELEMENTS // 2 // len(rows))
        for lo in range(0, len(centers), step):
            d = sq[:, None] + c_sq[None, lo : lo + step] - 2.0 * (rows @ centers[lo : lo + step].T)
            np.minimum(dist, d.min(axis=1), out=dist)
        dist[self.done[new]] = -np.inf
        self.active = np.concatenate([self.active, new])
        self.rows = np.concatenate([self.rows, rows])
        self.sq = np.concatenate([self.sq, sq])
        self.dist = np.concatenate([self.dist, dist])

    def farthest(self) -> tuple[int, float]:
        """The point not picked farthest from its nearest center (the first in pool order among
        equals) and that squared distance."""
        while True:
            top = self.dist.max(initial=-np.inf)
            k = len(self.active)
            if k == len(self.x) or top - self.slack > self.bound[self.order[k]]:
                break  # no point left unmeasured can reach the farthest measured one
            self._grow()
        near = np.flatnonzero(self.dist >= top - 2.0 * self.slack)
        if len(near) == 1:
            return int(self.active[near[0]]), float(top)
        # a near-tie within rounding: settle it on directly computed distances, once per distinct row
        idx = self.active[near]
        _, first, inverse = np.unique(self.x[idx], axis=0, return_index=True, return_inverse=True)
        exact = np.array([self._exact(self.x[idx[f]]) for f in first])[inverse.reshape(-1)]
        best = exact.max()
        return int(idx[exact == best].min()), float(best)

    def _exact(self, row: np.ndarray) -> float:
        """Squared distance of ``row`` to its nearest center, summed from the differences."""
        diff = row.astype(np.float64) - np.concatenate(self.center_rows).astype(np.float64)
        return float(np.einsum("ij,ij->i", diff, diff).min())

    def pick(self, i: int) -> None:
        """Make pool point ``i`` a center."""
        self.done[i] = True
        self.center_rows.append(self.x[i : i + 1])
        row = self.x[i].astype(np.float64) - self.mean
        np.minimum(self.dist, self.sq + row @ row - 2.0 * (self.rows @ row), out=self.dist)
        self.dist[self.active == i] = -np.inf


def _max_norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64).max(initial=0.0)))


def _rounding_bound(dim: int, unit: float, norm: float) -> float:
    """A bound on the rounding error of a squared distance ``|a|^2 + |b|^2 - 2 a.b`` of two
    ``dim``-vectors of norm at most ``norm``, centred and summed at unit roundoff ``unit`` in
    any order, against the exact squared distance of the uncentred vectors (the standard
    ``gamma_n`` bounds, doubled for margin)."""
    return 16.0 * (dim + 8) * unit * norm * norm


def prepare_embeddings(emb: np.ndarray, normalize: bool) -> np.ndarray:
    """float32 embeddings, each L2-normalised when ``normalize`` (an all-zero one stays at 0)."""
    x = np.asarray(emb, dtype=np.float32)
    if normalize and len(x):
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norm > 0, norm, 1.0)  # an all-zero embedding stays at the origin
    return x


def stack_embeddings(
    embeddings: Mapping[ImageId, np.ndarray], image_ids: Sequence[ImageId], dim: int | None = None
) -> np.ndarray:
    """float32 ``[len(image_ids), D]`` from per-image ``[D]`` vectors.

    Raises:
        ConfigError: an embedding of another dimension or with NaN / infinite values,
            naming the image.
    """
    rows = [np.asarray(embeddings[i], dtype=np.float32).reshape(-1) for i in image_ids]
    for image_id, row in zip(image_ids, rows, strict=True):
        if dim is None:
            dim = row.size
        if row.size != dim:
            raise ConfigError(f"embedding of image {image_id!r} has {row.size} values, expected {dim} like the others")
    out = np.stack(rows) if rows else np.zeros((0, dim or 0), dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if bad.size:
        raise ConfigError(f"embedding of image {image_ids[bad[0]]!r} has NaN or infinite values")
    return out


@register_strategy("core-set: k-center greedy on image embeddings, far from labeled and from each other")
class CoreSet(Strategy):
    """Core-set selection by k-center greedy (see the module doc).

    Args:
        normalize: L2-normalize embeddings before measuring Euclidean distances.
        subset: run on a random subset of this many pool images (drawn with ``context.rng``;
            at least the budget) instead of the whole pool: the cost of k-center greedy is
            pool x budget distance evaluations, so this bounds it on large pools, at the price
            of an approximate cover. None (default): the whole pool, exactly.

    References:
        Sener and Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set
        Approach", ICLR 2018.
    """

    name = "core_set"
    requires = frozenset({"embeddings"})

    def __init__(self, *, normalize: bool = True, subset: int | None = None) -> None:
        if not isinstance(normalize, bool):
            raise ConfigError(f"core_set: normalize must be true or false, got {normalize!r}")
        if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
            raise ConfigError(f"core_set: subset must be a positive integer or null, got {subset!r}")
        self.normalize = normalize
        self.subset = subset

    def select(self, context: SelectionContext, budget: int) -> Selection:
        n = check_budget(context, budget, self.requires)
        pool_ids = random_subset(context.pool_ids, self.subset, n, context.rng)
        pool = stack_embeddings(context.embeddings, pool_ids)
        labeled = stack_embeddings(context.embeddings, context.labeled_ids, dim=pool.shape[1])
        picked, dist = k_center_greedy(pool, labeled, n, context.rng, normalize=self.normalize)
        info = {"labeled_centers": len(labeled)}
        if self.subset is not None:
            info["searched"] = len(pool_ids)
        return Selection([pool_ids[i] for i in picked], dist.tolist(), info)


def random_subset(
    image_ids: Sequence[ImageId], size: int | None, budget: int, rng: np.random.Generator
) -> list[ImageId]:
    """``image_ids`` itself when ``size`` is None or covers them; else ``max(size, budget)`` of
    them drawn by ``rng``, in their order."""
    if size is None or len(image_ids) <= max(size, budget):
        return list(image_ids)
    take = np.sort(rng.choice(len(image_ids), max(size, budget), replace=False))
    return [image_ids[k] for k in take]
