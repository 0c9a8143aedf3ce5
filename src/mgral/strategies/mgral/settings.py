"""MGRAL's settings, grouped by the stage that reads them (issue 19, step 7).

A config gives MGRAL flat parameters (``strategies: [{name: mgral, params: {...}}]``, the
names in :class:`~mgral.strategies.mgral.strategy.MGRAL`'s docstring); the strategy groups
them here, each group checked once, where it is built:

- :class:`Table`: the fine-tune estimator's look-up table (candidates, reward set, surrogate
  fine-tunes) and the reward's source;
- :class:`Reward`: the fine-tune estimator's reward model ``R(S)``;
- :class:`Agent`: the LSTM (fine-tune estimator: trained on ``R``; head estimator: the
  residual of the prior-tied policy) and how its scores are read;
- :class:`Head`: the estimator's route, the head estimator's cross-fitted table and the
  prior-tied policy with its safe selection.

Where the surrogate jobs run is not here: it is the experiment's ``jobs`` section
(:class:`mgral.executors.JobPlacement`).
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, dataclass, fields
from typing import Any

from mgral.errors import ConfigError

REWARD_SOURCES = ("surrogate", "labeled_simulation", "oracle")
ESTIMATORS = ("auto", "head", "finetune", "none")
OPTIMIZERS = ("agent", "greedy", "credits")
SAMPLINGS = ("plackett_luce", "bernoulli")


def check(name: str, ok: bool, expected: str, value: Any) -> None:
    """Refuse parameter ``name`` unless ``ok``, saying what was expected and what came."""
    if not ok:
        raise ConfigError(f"mgral parameter {name}: expected {expected}, got {value!r}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(group: Any, *names: str, allow_none: bool = False) -> None:
    for name in names:
        v = getattr(group, name)
        ok = (v is None and allow_none) or (_int(v) and v >= 1)
        check(name, ok, "a positive integer" + (" or null" if allow_none else ""), v)


def _number(group: Any, *names: str, low: float = 0.0, strict: bool = False) -> None:
    for name in names:
        v = getattr(group, name)
        ok = isinstance(v, int | float) and not isinstance(v, bool) and (v > low if strict else v >= low)
        check(name, ok, f"a number {'>' if strict else '>='} {low:g}", v)


def _one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    check(name, value in valid, f"one of {', '.join(valid)}", value)


@dataclass(frozen=True)
class Table:
    """The fine-tune estimator's table: ``combinations`` (M) random combinations of
    ``combination_size`` (B_c, default the budget) of the ``candidate_pool`` candidates
    (default 20 x budget; the head estimator's default is 4 x budget), each a surrogate
    fine-tune of ``steps`` (K) steps of ``surrogate_batch`` images at ``surrogate_lr``
    (default the detector's), with ``unsup_weight`` on the unsupervised term ramped over the
    first ``ramp`` of the steps and pseudo-labels over ``pseudo_threshold``, scored on a
    reward set of ``reward_fraction`` of the labeled images. ``reward_source``: surrogate
    (label-free), or the research ablations labeled_simulation and oracle."""

    combinations: int = 16
    steps: int = 30
    combination_size: int | None = None
    candidate_pool: int | None = None
    reward_fraction: float = 0.2
    surrogate_batch: int = 4
    surrogate_lr: float | None = None
    unsup_weight: float = 1.0
    ramp: float = 0.25
    pseudo_threshold: float = 0.5
    reward_source: str = "surrogate"

    def __post_init__(self) -> None:
        _positive(self, "combinations", "steps", "surrogate_batch")
        _positive(self, "combination_size", "candidate_pool", allow_none=True)
        rf, ramp, pt = self.reward_fraction, self.ramp, self.pseudo_threshold
        check("reward_fraction", isinstance(rf, int | float) and 0 < rf < 1, "a fraction in (0, 1)", rf)
        check("ramp", isinstance(ramp, int | float) and 0 <= ramp <= 1, "a fraction in [0, 1]", ramp)
        check("pseudo_threshold", isinstance(pt, int | float) and 0 <= pt <= 1, "a score in [0, 1]", pt)
        _number(self, "unsup_weight")
        if self.surrogate_lr is not None:
            _number(self, "surrogate_lr", strict=True)
        _one_of("reward_source", self.reward_source, REWARD_SOURCES)


@dataclass(frozen=True)
class Reward:
    """The fine-tune estimator's reward model: ``pca_components`` of the pooled embedding in
    the features, ``clusters`` k-means clusters (default min(B, |P|/2)) for the
    ``cluster_term``, ridge ``ridge_alpha``, earlier cycles' rows kept (``keep_history``)
    with weight ``history_decay ** age``."""

    pca_components: int = 8
    clusters: int | None = None
    cluster_term: bool = True
    keep_history: bool = True
    history_decay: float = 0.5
    ridge_alpha: float = 1.0

    def __post_init__(self) -> None:
        pc = self.pca_components
        check("pca_components", _int(pc) and pc >= 0, "an integer >= 0", pc)
        _positive(self, "clusters", allow_none=True)
        hd = self.history_decay
        check("history_decay", isinstance(hd, int | float) and 0 <= hd <= 1, "a weight in [0, 1]", hd)
        _number(self, "ridge_alpha")


@dataclass(frozen=True)
class Agent:
    """The LSTM: ``hidden`` units, reading candidates in chunks of ``chunk``, its scores the
    mean over ``orders`` fixed orders. Fine-tune estimator: ``optimizer`` (agent: REINFORCE
    on R for ``updates`` updates of ``samples`` batches drawn by ``sampling``, Adam at
    ``agent_lr``, entropy bonus ``entropy``, warm-started from the previous cycle with
    ``warm_start``; greedy or credits: ablations without the agent)."""

    optimizer: str = "agent"
    sampling: str = "plackett_luce"
    updates: int = 300
    samples: int = 8
    hidden: int = 256
    chunk: int = 64
    agent_lr: float = 1e-3
    entropy: float = 0.01
    orders: int = 4
    warm_start: bool = True

    def __post_init__(self) -> None:
        _positive(self, "updates", "samples", "hidden", "chunk", "orders")
        _number(self, "entropy")
        _number(self, "agent_lr", strict=True)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("sampling", self.sampling, SAMPLINGS)


@dataclass(frozen=True)
class Head:
    """The estimator (``auto``: none with the label-free reward, finetune with a research one)
    and the head estimator's settings: ``folds`` (K) cross-fitting folds, ``labelings`` (J)
    sampled labelings, ``head_iterations`` full-batch head steps, ``resamples`` bootstrap
    resamples for the SE; the prior-tied policy's ``policy_updates`` x ``policy_samples``,
    ``policy_lr`` and ``kl`` penalty; safe selection's ``safe_z``; ``patience`` updates
    without a sampled batch beating the prior's by ``safe_z`` paired SEs end training (null:
    never); ``score_batches``: each prior score's top batch is a table row too."""

    estimator: str = "auto"
    folds: int = 3
    labelings: int = 2
    head_iterations: int = 100
    resamples: int = 200
    policy_updates: int = 10
    policy_samples: int = 4
    policy_lr: float = 3e-2
    kl: float = 1.0
    safe_z: float = 2.0
    patience: int | None = 2
    score_batches: bool = False

    def __post_init__(self) -> None:
        _positive(self, "labelings", "head_iterations", "resamples", "policy_updates", "policy_samples")
        _positive(self, "patience", allow_none=True)
        _one_of("estimator", self.estimator, ESTIMATORS)
        check("folds", _int(self.folds) and self.folds >= 2, "an integer >= 2", self.folds)
        _number(self, "kl", "safe_z")
        _number(self, "policy_lr", strict=True)
        check("score_batches", isinstance(self.score_batches, bool), "true or false", self.score_batches)


GROUPS = (Table, Reward, Agent, Head)


def groups(params: dict[str, Any]) -> tuple[Table, Reward, Agent, Head]:
    """The flat ``params`` as their groups, each checked (each group takes the names it
    declares; the others keep their defaults).

    Raises:
        ConfigError: a name no group declares, or a bad value.
    """
    known = {f.name for cls in GROUPS for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"mgral has no parameter {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(known))}")
    table, reward, agent, head = (
        cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params}) for cls in GROUPS
    )
    return table, reward, agent, head


def signature() -> inspect.Signature:
    """``__init__(self, *, <every group's fields, with their defaults>)``: MGRAL's flat
    parameters as :func:`mgral.strategies.strategy_parameters` reads them, declared once here."""
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    keyword = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for cls in GROUPS
        for f in fields(cls)
        if f.default is not MISSING
    ]
    return inspect.Signature([self, *keyword], return_annotation=None)
