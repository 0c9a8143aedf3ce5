"""Selection strategies: one contract (:mod:`mgral.strategies.base`) and the registered zoo.

Importing this package registers every built-in strategy in :data:`STRATEGIES`; build one
with ``build_strategy(name, **params)``.
"""

from mgral.strategies import cald, cdal, core_set, mgral, ppal, random, uncertainty  # noqa: F401  (registers the strategies)
from mgral.strategies.base import (
    REQUIREMENTS,
    STRATEGIES,
    Selection,
    SelectionContext,
    Strategy,
    build_strategy,
    check_budget,
    register_strategy,
    select_top,
    selection_rng,
    strategy_parameters,
)

__all__ = [
    "REQUIREMENTS",
    "STRATEGIES",
    "Selection",
    "SelectionContext",
    "Strategy",
    "build_strategy",
    "check_budget",
    "register_strategy",
    "select_top",
    "selection_rng",
    "strategy_parameters",
]
