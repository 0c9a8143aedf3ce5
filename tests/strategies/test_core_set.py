"""Known answers for k-center greedy and the core_set strategy."""

from __future__ import annotations

import numpy as np
import pytest

from mgral.errors import ConfigError
from mgral.strategies import build_strategy
from mgral.strategies import core_set as core_set_module
from mgral.strategies.core_set import k_center_greedy


def brute_force_k_center(pool, centers, n):
    """Textbook k-center greedy in float64 with explicit distances (no tie handling)."""
    pool, centers = np.asarray(pool, np.float64), np.asarray(centers, np.float64)
    min_d = np.linalg.norm(pool[:, None] - centers[None], axis=2).min(axis=1)
    picked, dist = [], []
    for _ in range(n):
        i = int(np.argmax(min_d))
        picked.append(i)
        dist.append(min_d[i])
        min_d = np.minimum(min_d, np.linalg.norm(pool - pool[i], axis=1))
    return picked, dist


def tied_inputs(seed):
    """Pools with exact ties: integer points (many duplicates, many equal distances), some equal
    to a labeled point; and Gaussian points, some repeated exactly."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 4, size=(80, 3)).astype(np.float64)
    yield grid, grid[rng.choice(80, 3)], False
    yield grid, np.zeros((0, 3)), False
    gauss = rng.normal(size=(60, 8))
    gauss = np.concatenate([gauss, gauss[:15], gauss[:5]])
    yield gauss, rng.normal(size=(6, 8)), True
    yield gauss + 50.0, np.concatenate([gauss[:3], rng.normal(size=(4, 8))]) + 50.0, False


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("bound_centers", "measure_step"), [(1024, 1024), (2, 5)])
def test_picks_equal_the_plain_float64_loop_even_with_ties(
    monkeypatch, reference_k_center, seed, bound_centers, measure_step
):
    # small bound sets and measuring steps make the lazy search prune and grow on small pools
    monkeypatch.setattr(core_set_module, "BOUND_CENTERS", bound_centers)
    monkeypatch.setattr(core_set_module, "MEASURE_STEP", measure_step)
    for pool, labeled, normalize in tied_inputs(seed):
        for n in (1, 17, len(pool)):
            picked, dist = k_center_greedy(pool, labeled, n, np.random.default_rng(seed), normalize=normalize)
            ref_picked, ref_dist = reference_k_center(pool, labeled, n, np.random.default_rng(seed), normalize)
            assert picked.tolist() == ref_picked.tolist()
            assert dist == pytest.approx(ref_dist, rel=1e-9, abs=1e-9)
            assert np.all(np.diff(dist) <= 0)


def test_a_point_far_from_every_bound_center_is_still_found(monkeypatch, reference_k_center):
    # the bound uses 2 of the 40 labeled points: the upper bounds are loose, the picks exact
    monkeypatch.setattr(core_set_module, "BOUND_CENTERS", 2)
    monkeypatch.setattr(core_set_module, "MEASURE_STEP", 3)
    rng = np.random.default_rng(9)
    labeled = rng.normal(size=(40, 4))
    pool = np.concatenate([labeled[5:25] + 0.01 * rng.normal(size=(20, 4)), [[9.0, 9.0, 9.0, 9.0]]])
    picked, _ = k_center_greedy(pool, labeled, 5, np.random.default_rng(0), normalize=False)
    assert picked.tolist() == reference_k_center(pool, labeled, 5, np.random.default_rng(0), False)[0].tolist()
    assert picked[0] == 20


def test_farthest_first_then_a_distinct_point_not_a_near_duplicate():
    labeled = np.zeros((1, 2))
    pool = np.array([[10.0, 0.0], [10.0, 0.5], [0.0, 6.0], [1.0, 1.0]])
    picked, dist = k_center_greedy(pool, labeled, 2, np.random.default_rng(0), normalize=False)
    assert picked.tolist() == [1, 2]
    assert dist.tolist() == pytest.approx([np.hypot(10, 0.5), 6.0], rel=1e-5)


def test_scores_are_the_distances_when_picked_and_non_increasing():
    rng = np.random.default_rng(3)
    pool, labeled = rng.normal(size=(200, 16)), rng.normal(size=(20, 16))
    picked, dist = k_center_greedy(pool, labeled, 30, np.random.default_rng(0), normalize=False)
    ref_picked, ref_dist = brute_force_k_center(pool, labeled, 30)
    assert picked.tolist() == ref_picked
    assert dist == pytest.approx(ref_dist, rel=1e-4)
    assert np.all(np.diff(dist) <= 0)


def test_embeddings_far_from_the_origin_keep_their_precision():
    rng = np.random.default_rng(5)
    pool, labeled = 1000.0 + rng.normal(size=(100, 32)), 1000.0 + rng.normal(size=(10, 32))
    picked, dist = k_center_greedy(pool, labeled, 20, np.random.default_rng(0), normalize=False)
    ref_picked, ref_dist = brute_force_k_center(pool, labeled, 20)
    assert picked.tolist() == ref_picked
    assert dist == pytest.approx(ref_dist, rel=1e-3)


def test_chunked_initial_distances_match(monkeypatch):
    rng = np.random.default_rng(4)
    pool, labeled = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
    whole = k_center_greedy(pool, labeled, 10, np.random.default_rng(0))
    monkeypatch.setattr(core_set_module, "CHUNK_ELEMENTS", 10)  # 1 pool row per block
    chunked = k_center_greedy(pool, labeled, 10, np.random.default_rng(0))
    assert whole[0].tolist() == chunked[0].tolist()
    assert whole[1] == pytest.approx(chunked[1])


def test_normalize_compares_directions_not_lengths():
    labeled = np.array([[5.0, 0.0]])
    pool = np.array([[100.0, 0.0], [0.0, 1.0]])
    assert k_center_greedy(pool, labeled, 1, np.random.default_rng(0), normalize=True)[0].tolist() == [1]
    assert k_center_greedy(pool, labeled, 1, np.random.default_rng(0), normalize=False)[0].tolist() == [0]


def test_without_labeled_images_the_first_pick_is_random_and_scored_finitely():
    pool = np.array([[0.0], [1.0], [3.0], [7.0]])
    firsts = set()
    for seed in range(12):
        picked, dist = k_center_greedy(pool, np.zeros((0, 1)), 4, np.random.default_rng(seed), normalize=False)
        assert sorted(picked.tolist()) == [0, 1, 2, 3]
        assert np.all(np.isfinite(dist)) and np.all(np.diff(dist) <= 0)
        # the first pick's score is the radius it leaves: its distance to the farthest pool point
        assert dist[0] == pytest.approx(np.abs(pool[:, 0] - pool[picked[0], 0]).max())
        firsts.add(int(picked[0]))
    assert len(firsts) > 1
    assert k_center_greedy(pool[:1], np.zeros((0, 1)), 1, np.random.default_rng(0))[1].tolist() == [0.0]


def test_identical_points_are_picked_in_random_order_without_repeats():
    pool, labeled = np.ones((10, 3)), np.zeros((1, 3))
    orders = set()
    for seed in range(6):
        picked, _ = k_center_greedy(pool, labeled, 10, np.random.default_rng(seed))
        assert sorted(picked.tolist()) == list(range(10))
        again, _ = k_center_greedy(pool, labeled, 10, np.random.default_rng(seed))
        assert again.tolist() == picked.tolist()
        orders.add(tuple(picked.tolist()))
    assert len(orders) > 1


def core_set_context(make_context, pool_points, labeled_points):
    ctx = make_context(num_pool=len(pool_points), num_labeled=len(labeled_points), dim=2)
    points = dict(zip(ctx.labeled_ids + ctx.pool_ids, list(labeled_points) + list(pool_points), strict=True))
    ctx.embeddings = {k: np.asarray(v, np.float32) for k, v in points.items()}
    ctx.predictions = None
    return ctx


def test_strategy_returns_ids_in_pick_order(make_context):
    ctx = core_set_context(make_context, [[10, 0], [10, 0.5], [0, 6], [1, 1]], [[0, 0]])
    sel = build_strategy("core_set", normalize=False).select(ctx, 2)
    assert sel.image_ids == [ctx.pool_ids[1], ctx.pool_ids[2]]
    assert sel.scores == pytest.approx([np.hypot(10, 0.5), 6.0], rel=1e-5)
    assert sel.info == {"labeled_centers": 1}


def test_strategy_without_labeled_images(make_context):
    ctx = core_set_context(make_context, [[0, 0], [1, 0], [5, 5]], [])
    sel = build_strategy("core_set").select(ctx, 5)
    assert sorted(map(str, sel.image_ids)) == sorted(map(str, ctx.pool_ids))


def test_embedding_of_another_dimension_names_the_image(make_context):
    ctx = core_set_context(make_context, [[0, 0], [1, 0]], [[3, 3]])
    ctx.embeddings[ctx.pool_ids[1]] = np.zeros(3, np.float32)
    with pytest.raises(ConfigError, match=rf"image {ctx.pool_ids[1]!r} has 3 values, expected 2"):
        build_strategy("core_set").select(ctx, 1)


def test_nan_embedding_names_the_image(make_context):
    ctx = core_set_context(make_context, [[0, 0], [1, 0]], [[3, np.nan]])
    with pytest.raises(ConfigError, match=rf"image {ctx.labeled_ids[0]!r} has NaN"):
        build_strategy("core_set").select(ctx, 1)


def test_normalize_must_be_a_bool():
    with pytest.raises(ConfigError, match="normalize must be true or false"):
        build_strategy("core_set", normalize="yes")
