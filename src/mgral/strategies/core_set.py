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


def k_center_greedy(
    pool: np.ndarray, centers: np.ndarray, n: int, rng: np.random.Generator, *, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center selection of ``n`` pool points.

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
    x = _prepare(pool, normalize)
    c = _prepare(centers, normalize).reshape(-1, x.shape[1])
    # Distances do not change under translation; centring keeps the float32 norm expansion
    # below from cancelling large norms (e.g. non-negative ReLU features far from the origin).
    mean = x.mean(axis=0)
    # Permuting once makes argmax's first-index rule break ties uniformly at random.
    perm = rng.permutation(len(x))
    x, c = x[perm] - mean, c - mean
    sq = np.einsum("ij,ij->i", x, x)
    min_d = np.full(len(x), np.inf, dtype=np.float32)
    if len(c):
        c_sq = np.einsum("ij,ij->i", c, c)
        rows = max(1, CHUNK_ELEMENTS // len(c))
        for lo in range(0, len(x), rows):
            d = sq[lo : lo + rows, None] + c_sq[None, :] - 2.0 * (x[lo : lo + rows] @ c.T)
            min_d[lo : lo + rows] = d.min(axis=1)
    picked = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float64)
    for t in range(n):
        i = 0 if (t == 0 and not len(c)) else int(np.argmax(min_d))
        picked[t], dist[t] = i, np.sqrt(max(float(min_d[i]), 0.0))
        # Squared distances via the norm expansion: one matrix-vector product per step.
        np.minimum(min_d, sq + sq[i] - 2.0 * (x @ x[i]), out=min_d)
        min_d[i] = -np.inf  # never picked twice, even if rounding leaves its self-distance above 0
        if t == 0 and not len(c):
            dist[0] = np.sqrt(max(float(min_d.max()), 0.0)) if len(x) > 1 else 0.0
    return perm[picked], dist


def _prepare(emb: np.ndarray, normalize: bool) -> np.ndarray:
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
