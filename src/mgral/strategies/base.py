"""The strategy contract: what a strategy sees, what it returns, and how it is built.

A strategy ranks the unlabeled pool and returns image ids with one score each; higher
score = more informative. It declares in ``requires`` which expensive inputs it needs
(``"predictions"``, ``"embeddings"``, ``"detector"``) and the loop computes only those.

Every strategy follows the same rules, enforced by :func:`check_budget` and
:func:`select_top` and checked for every registered strategy by the contract suite:

* ``budget`` is a positive int; ``min(budget, len(pool_ids))`` ids come back, unique,
  all from ``pool_ids``; a budget larger than the pool selects the whole pool.
* An empty pool is an error, and so is a required input that is missing.
* Ties in score are broken at random by ``context.rng``; the same generator state and
  inputs give the same selection.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mgral.data.records import Dataset, Detections, ImageId
from mgral.errors import ConfigError
from mgral.executors import JobPlacement
from mgral.registry import Registry

REQUIREMENTS = frozenset({"predictions", "embeddings", "detector", "oracle"})
"""Inputs a strategy may ask the loop for (``"oracle"``: the true labels of every image, for
research-only ablations; a strategy meant for real use never asks for it)."""


def selection_rng(seed: int, cycle: int) -> np.random.Generator:
    """The generator of the selection after ``cycle`` of a series seeded ``seed``: the loop, the
    human loop's cold start and :func:`mgral.selection.select_batch` draw from this one stream,
    so a one-shot selection reproduces the loop's."""
    return np.random.default_rng([seed, cycle, 5])


@dataclass
class SelectionContext:
    """What a strategy may see when it selects. The loop fills only what ``requires`` names.

    Attributes:
        dataset: the whole dataset (categories, image records).
        pool_ids: unlabeled, selectable images, in the loop's order. Results name images by
            id, never by position in this list.
        labeled_ids: images labeled so far.
        rng: generator derived by the loop from (experiment seed, cycle); the only source
            of randomness a strategy may use.
        cycle: the active-learning cycle (0 = first selection).
        predictions: image id -> detections, for every pool image (``"predictions"``).
        embeddings: image id -> float ``[D]``, for every pool and labeled image
            (``"embeddings"``).
        detector: the trained detector handle (``"detector"``).
        work_dir: a per-cycle directory a strategy may write diagnostics to.
        oracle_dataset: the dataset with every image's true labels (``"oracle"``; research
            ablations only).
        progress: whether a slow strategy shows bars for its stages
            (:func:`mgral.progress.bar`); the loop sets it from its own ``progress``.
        jobs: where the strategy's own independent jobs run (the experiment's ``jobs``
            section; default inline, on the task detector's device).
    """

    dataset: Dataset
    pool_ids: list[ImageId]
    labeled_ids: list[ImageId]
    rng: np.random.Generator
    cycle: int = 0
    predictions: Mapping[ImageId, Detections] | None = None
    embeddings: Mapping[ImageId, np.ndarray] | None = None
    detector: Any | None = None
    work_dir: Path | None = None
    oracle_dataset: Dataset | None = None
    progress: bool = False
    jobs: JobPlacement = field(default_factory=JobPlacement)

    @property
    def num_classes(self) -> int:
        """Number of object categories K (background not counted)."""
        return len(self.dataset.categories)


@dataclass(frozen=True)
class Selection:
    """A strategy's answer.

    Attributes:
        image_ids: the chosen images, in order of choice (descending score).
        scores: one per image, same length; higher = more informative; what the strategy
            ranked by.
        info: optional JSON-able diagnostics.
    """

    image_ids: list[ImageId]
    scores: list[float]
    info: dict = field(default_factory=dict)


class Strategy(ABC):
    """Base class of every selection strategy.

    Subclasses set ``name`` (the registry name) and ``requires`` (a subset of
    :data:`REQUIREMENTS`), take their parameters keyword-only in ``__init__`` and
    implement :meth:`select`. A strategy whose selection is slow sets ``selection_cost``.
    """

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()
    # What the strategy asks of ``context.detector`` beyond the Detector protocol (names of
    # mgral.detectors.base.CAPABILITIES); a run whose detector lacks one is refused up front.
    detector_needs: ClassVar[frozenset[str]] = frozenset()
    # Rough cost of one selection, in detector trainings of a cycle (0: negligible). Used only
    # to schedule: parallel runs start the costliest series first, so that a run does not end
    # with one long series running alone on an otherwise idle machine.
    selection_cost: ClassVar[float] = 0.0
    # Parameters a dry run or a smoke test lays over the configured ones so that every stage
    # of the strategy runs, small (e.g. MGRAL's table of two one-step rows).
    micro_params: ClassVar[Mapping[str, Any]] = {}
    # Parameters that became settings elsewhere: old name -> where it is now (build_strategy's
    # error for a config written before the move).
    moved_params: ClassVar[Mapping[str, str]] = {}

    def workload(self, *, labeled: int, unlabeled: int, budget: int) -> tuple[float, float]:
        """What one selection pushes through the detector beyond the pool predictions the
        loop makes for it, as (training images, inferred images); used to plan a run
        (:mod:`mgral.planning`), never to run one. Default: nothing."""
        return 0.0, 0.0

    @abstractmethod
    def select(self, context: SelectionContext, budget: int) -> Selection:
        """Choose up to ``budget`` images of ``context.pool_ids`` to label next.

        Returns exactly ``min(budget, len(context.pool_ids))`` distinct pool ids: a budget
        larger than the pool selects the whole pool (ranked). Ties in score are broken
        at random with ``context.rng``; the same generator state and inputs give the
        same selection.

        Raises:
            ConfigError: ``budget`` is not a positive int; the pool is empty; an input
                named in ``requires`` is missing or lacks an image.
        """

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register_strategy(summary: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: register a strategy under its ``name`` with a one-line summary."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        unknown = set(cls.requires) - REQUIREMENTS
        if unknown:
            raise ValueError(
                f"strategy {cls.name!r} requires unknown inputs {sorted(unknown)}; known: {sorted(REQUIREMENTS)}"
            )
        STRATEGIES.add(cls.name, cls, summary)
        return cls

    return deco


def strategy_parameters(cls: type[Strategy]) -> dict[str, inspect.Parameter]:
    """The keyword parameters a strategy's ``__init__`` accepts (``self`` excluded)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_strategy(name: str, **params: Any) -> Strategy:
    """Build registered strategy ``name`` from flat keyword parameters.

    Raises:
        ConfigError: unknown strategy (valid names listed), unknown parameter (the
            strategy's valid parameters listed), or a bad parameter value.
    """
    cls = STRATEGIES.get(name)
    valid = strategy_parameters(cls)
    unknown = sorted(set(params) - set(valid))
    moved = [k for k in unknown if k in cls.moved_params]
    if moved:
        where = "; ".join(f"{k} -> {cls.moved_params[k]}" for k in moved)
        raise ConfigError(f"strategy {name!r}: parameters moved out of its params, set them there instead: {where}")
    if unknown:
        listed = ", ".join(sorted(valid)) or "(none)"
        raise ConfigError(
            f"strategy {name!r} has no parameter {', '.join(map(repr, unknown))}; valid parameters: {listed}"
        )
    return cls(**params)


def check_budget(context: SelectionContext, budget: int, requires: frozenset[str] = frozenset()) -> int:
    """Validate a selection request and return how many images to select.

    Checks the budget, the pool, and that each input in ``requires`` is present and
    covers the images it must (predictions: the pool; embeddings: pool and labeled).

    Returns:
        ``min(budget, len(context.pool_ids))``: a budget larger than the pool selects the
        whole pool.

    Raises:
        ConfigError: with what was expected and what came.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ConfigError(f"budget must be a positive integer (images to select), got {budget!r}")
    pool = context.pool_ids
    if not pool:
        raise ConfigError("the pool is empty: every image is labeled or skipped; nothing to select")
    if len(set(pool)) != len(pool):
        raise ConfigError(f"pool_ids lists an image twice ({len(pool)} ids, {len(set(pool))} distinct)")
    both = set(pool).intersection(context.labeled_ids)
    if both:
        raise ConfigError(f"image {next(iter(both))!r} is both in the pool and labeled ({len(both)} such images)")
    if "predictions" in requires:
        _check_covers(context.predictions, "predictions", pool, "pool")
    if "embeddings" in requires:
        _check_covers(context.embeddings, "embeddings", pool, "pool")
        _check_covers(context.embeddings, "embeddings", context.labeled_ids, "labeled")
    if "detector" in requires and context.detector is None:
        raise ConfigError("this strategy requires the trained detector, but context.detector is None")
    if "oracle" in requires and context.oracle_dataset is None:
        raise ConfigError("this strategy requires the true labels (oracle_dataset), but context.oracle_dataset is None")
    return min(int(budget), len(pool))


def _check_covers(mapping: Mapping[ImageId, Any] | None, what: str, ids: Sequence[ImageId], role: str) -> None:
    if mapping is None:
        raise ConfigError(f"this strategy requires {what}, but context.{what} is None (the loop must compute them)")
    for image_id in ids:
        if image_id not in mapping:
            raise ConfigError(f"this strategy requires {what} for every {role} image, but image {image_id!r} has none")


def select_top(
    pool_ids: Sequence[ImageId], scores: np.ndarray, n: int, rng: np.random.Generator, info: dict | None = None
) -> Selection:
    """The ``n`` highest-scoring pool images, ties broken at random by ``rng``.

    Args:
        pool_ids: ``[P]`` image ids.
        scores: float ``[P]``, aligned with ``pool_ids``; higher = more informative.
        n: how many to select, ``1 <= n <= P``.

    Raises:
        ConfigError: a score is NaN or infinite (naming the image).
    """
    scores = np.asarray(scores, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ConfigError(
            f"score of image {pool_ids[bad[0]]!r} is {scores[bad[0]]} ({bad.size} non-finite in all); "
            "check its predictions or embeddings for NaN or infinite values"
        )
    # A random permutation followed by a stable sort breaks ties uniformly at random.
    perm = rng.permutation(len(scores))
    order = perm[np.argsort(-scores[perm], kind="stable")[:n]]
    return Selection([pool_ids[i] for i in order], scores[order].tolist(), dict(info or {}))
