"""The contract every registered strategy passes (new strategies join automatically)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mgral.errors import ConfigError
from mgral.strategies import REQUIREMENTS, STRATEGIES, build_strategy, strategy_parameters

NAMES = STRATEGIES.names()


def build(name: str):
    """The strategy with its own micro settings (``micro_params``): the contract is about the
    answer's shape, not its quality, and the whole suite must stay fast on a CPU."""
    return build_strategy(name, **STRATEGIES.get(name).micro_params)


@pytest.fixture(params=NAMES)
def name(request) -> str:
    return request.param


@pytest.fixture
def select(name, make_context, for_strategy):
    """``select(budget, **context_options)`` with the strategy built from its defaults."""

    def run(budget, **options):
        strategy = build(name)
        return strategy.select(for_strategy(make_context(**options), strategy), budget)

    return run


def test_builtins_are_registered():
    assert {"random", "least_confidence", "margin", "entropy", "core_set"} <= set(NAMES)


@pytest.mark.parametrize("budget", [1, 7, 39])
def test_selects_budget_distinct_pool_ids_with_finite_scores(select, make_context, budget):
    ctx = make_context()
    sel = select(budget)
    assert len(sel.image_ids) == budget == len(set(sel.image_ids))
    assert set(sel.image_ids) <= set(ctx.pool_ids)
    assert not set(sel.image_ids) & set(ctx.labeled_ids)
    assert len(sel.scores) == budget
    assert all(isinstance(s, float) and math.isfinite(s) for s in sel.scores)
    json.dumps(sel.info)


def test_budget_larger_than_pool_selects_the_whole_pool(select, make_context):
    sel = select(1000, num_pool=12)
    assert sorted(map(str, sel.image_ids)) == sorted(map(str, make_context(num_pool=12).pool_ids))
    assert len(sel.scores) == 12


def test_single_image_pool(select):
    sel = select(3, num_pool=1)
    assert len(sel.image_ids) == 1 and len(sel.scores) == 1


def test_same_seed_same_selection(select):
    a, b = select(9, seed=5), select(9, seed=5)
    assert a.image_ids == b.image_ids
    assert a.scores == b.scores


def test_pool_order_matters_only_for_ties(name, make_context, for_strategy):
    strategy = build(name)

    def run(seed, reverse=False):
        ctx = for_strategy(make_context(seed=seed), strategy)
        if reverse:
            ctx.pool_ids = ctx.pool_ids[::-1]
        return strategy.select(ctx, 6)

    if not np.allclose(sorted(run(1).scores), sorted(run(2).scores), rtol=1e-6):
        pytest.skip(f"{name} scores depend on the seed beyond tie-breaking (a stochastic strategy)")
    a, b = run(1), run(1, reverse=True)
    assert set(a.image_ids) == set(b.image_ids)
    assert sorted(a.scores) == pytest.approx(sorted(b.scores))


def test_does_not_modify_the_context(name, make_context, for_strategy):
    strategy = build(name)
    ctx = for_strategy(make_context(), strategy)
    pool, labeled = list(ctx.pool_ids), list(ctx.labeled_ids)
    strategy.select(ctx, 5)
    assert ctx.pool_ids == pool and ctx.labeled_ids == labeled


def test_empty_pool_is_an_error(name, make_context, for_strategy):
    strategy = build(name)
    ctx = for_strategy(make_context(), strategy)
    ctx.pool_ids = []
    with pytest.raises(ConfigError, match="the pool is empty: every image is labeled or skipped; nothing to select"):
        strategy.select(ctx, 3)


def test_pool_with_repeats_or_labeled_images_is_an_error(name, make_context, for_strategy):
    strategy = build(name)
    ctx = for_strategy(make_context(), strategy)
    ctx.pool_ids = ctx.pool_ids + ctx.pool_ids[:1]
    with pytest.raises(ConfigError, match="pool_ids lists an image twice"):
        strategy.select(ctx, 3)
    ctx = for_strategy(make_context(), strategy)
    ctx.labeled_ids = ctx.labeled_ids + ctx.pool_ids[2:3]
    with pytest.raises(ConfigError, match=f"image {ctx.pool_ids[2]!r} is both in the pool and labeled"):
        strategy.select(ctx, 3)


@pytest.mark.parametrize("budget", [0, -2, 2.5, "3", True, None])
def test_bad_budget_is_an_error(name, make_context, for_strategy, budget):
    strategy = build(name)
    with pytest.raises(ConfigError, match="budget must be a positive integer"):
        strategy.select(for_strategy(make_context(), strategy), budget)


def test_numpy_integer_budget_is_accepted(select):
    assert len(select(np.int64(4)).image_ids) == 4


def test_requires_names_known_inputs(name):
    assert STRATEGIES.get(name).requires <= REQUIREMENTS


def test_missing_required_input_is_an_error_naming_the_image(name, make_context, for_strategy):
    strategy = build(name)
    if not strategy.requires:
        pytest.skip(f"{name} requires nothing")
    for what in strategy.requires:
        ctx = for_strategy(make_context(), strategy)
        setattr(ctx, "oracle_dataset" if what == "oracle" else what, None)
        with pytest.raises(ConfigError, match=f"requires .*{what}"):
            strategy.select(ctx, 3)
    for what in strategy.requires & {"predictions", "embeddings"}:
        ctx = for_strategy(make_context(), strategy)
        missing = ctx.pool_ids[3]
        setattr(ctx, what, {k: v for k, v in getattr(ctx, what).items() if k != missing})
        with pytest.raises(ConfigError, match=f"image {missing!r}"):
            strategy.select(ctx, 3)
    if "embeddings" in strategy.requires:
        ctx = for_strategy(make_context(), strategy)
        missing = ctx.labeled_ids[0]
        ctx.embeddings = {k: v for k, v in ctx.embeddings.items() if k != missing}
        with pytest.raises(ConfigError, match=f"labeled image, but image {missing!r}"):
            strategy.select(ctx, 3)


def test_unknown_parameter_lists_the_valid_ones(name):
    with pytest.raises(ConfigError, match=f"strategy '{name}' has no parameter 'no_such_param'") as err:
        build_strategy(name, no_such_param=1)
    for param in strategy_parameters(STRATEGIES.get(name)):
        assert param in str(err.value)


def test_parameters_are_keyword_only_with_defaults(name):
    for param in strategy_parameters(STRATEGIES.get(name)).values():
        assert param.default is not param.empty, f"{name}: parameter {param.name} has no default"


def test_registry_entry_has_a_one_line_summary(name):
    (entry,) = [e for e in STRATEGIES.entries() if e.name == name]
    assert entry.obj.name == name
    assert entry.summary.strip() and "\n" not in entry.summary and len(entry.summary) <= 100


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown strategy 'nope'; valid .*: .*random"):
        build_strategy("nope")


def test_micro_params_build_and_workload_is_a_nonnegative_count(name):
    strategy = build(name)
    for labeled, unlabeled, budget in ((0, 1, 1), (40, 400, 20), (5000, 100_000, 1000)):
        train, infer = strategy.workload(labeled=labeled, unlabeled=unlabeled, budget=budget)
        assert isinstance(train, float) and isinstance(infer, float) and train >= 0 and infer >= 0
