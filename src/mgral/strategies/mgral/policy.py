"""MGRAL's policy tied to a prior, its memoised look-up table, and safe selection.

The published MGRAL agent learned from scratch, on a reward estimate that was mostly noise,
and lost to cheaper baselines. Here the agent can only *improve on* those baselines:

- **Prior.** ``z`` holds, per candidate, standardised scores of the baselines (least
  confidence, CALD consistency, core-set distance, class rarity: whatever the caller has);
  the prior's logits are ``z @ beta0``. Its top-B is a strong batch on its own.
- **Policy.** ``logits = z @ beta + residual``, the residual being the LSTM sampling agent
  (:class:`~mgral.strategies.mgral.agent.SamplingAgent`) whose output layer starts at zero,
  and ``beta`` starting at ``beta0``: before any update the policy *is* the prior.
- **Training** (:func:`train_policy`): REINFORCE over Plackett–Luce batches, the advantage
  standardised within each update's samples (no running baseline to drift), plus a penalty
  ``kl * KL(softmax(logits) || softmax(prior logits))`` on the first-draw distributions that
  keeps the policy near the prior unless the reward says otherwise.
- **Look-up table** (:class:`BatchMemo`): every batch the agent samples is evaluated by the
  caller's estimator and memoised by its set of items; no reward is extrapolated.
- **Safe selection** (:func:`safe_choice`): the learned batch replaces the prior's top-B only
  when its estimated gain beats the prior's by more than ``z`` paired standard errors; the
  decision and its reason are recorded every cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mgral.strategies.mgral.agent import SamplingAgent, gumbel_top_b, logits_in_order, plackett_luce_log_prob


def standardise(scores: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """The prior's inputs: each score column as z-scores over the candidates (higher = more
    wanted; a constant or non-finite column becomes 0). Returns ``[N, P]`` and the names."""
    names = list(scores)
    if not names:
        raise ValueError("the prior needs at least one score")
    columns = []
    for name in names:
        col = np.asarray(scores[name], dtype=np.float64)
        finite = np.isfinite(col)
        mean = col[finite].mean() if finite.any() else 0.0
        std = col[finite].std() if finite.any() else 0.0
        columns.append(np.where(finite, (col - mean) / std, 0.0) if std > 0 else np.zeros_like(col))
    return np.stack(columns, axis=1), names


class PriorTiedAgent(nn.Module):
    """``logits = z @ beta + residual(features)``; at construction ``beta = beta0`` and the
    residual is exactly zero, so the untrained policy is the prior. The residual's initial
    weights come from ``seed`` (the global torch generator is left as it was)."""

    def __init__(
        self, num_features: int, beta0: Sequence[float], *, seed: int = 0, hidden: int = 64, proj: int = 32
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.residual = SamplingAgent(num_features, hidden=hidden, proj=proj)
        last = self.residual.head[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.register_buffer("beta0", torch.as_tensor(np.asarray(beta0, dtype=np.float32)))
        self.beta = nn.Parameter(self.beta0.clone())

    def prior_logits(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.beta0

    def logits(self, features: torch.Tensor, z: torch.Tensor, order: np.ndarray, chunk: int) -> torch.Tensor:
        """``[N]`` logits indexed like ``features`` / ``z`` (the residual reads ``order``)."""
        return z @ self.beta + logits_in_order(self.residual, features, order, chunk)


@dataclass(frozen=True)
class PolicySettings:
    """``updates`` REINFORCE steps of ``samples`` batches each; ``kl``: weight of the KL
    penalty to the prior; ``orders``: fixed reading orders averaged at selection."""

    updates: int = 150
    samples: int = 16
    lr: float = 3e-3
    kl: float = 1.0
    grad_clip: float = 1.0
    chunk: int = 64
    orders: int = 4


def _kl_to_prior(logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, 0)
    return (logp.exp() * (logp - torch.log_softmax(prior, 0))).sum()


def train_policy(
    agent: PriorTiedAgent,
    features: np.ndarray,
    z: np.ndarray,
    budget: int,
    reward_fn: Callable[[np.ndarray], np.ndarray],
    settings: PolicySettings,
    *,
    seed: int,
    on_update: Callable[[dict[str, float]], object] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[dict[str, float]]:
    """REINFORCE of ``agent`` on ``reward_fn(batches [G, B] of candidate indices) -> [G]``.
    Returns one record per update (``update``, ``reward_mean``, ``reward_max``, ``kl``,
    ``entropy``), each also passed to ``on_update``; ``stop()``, asked after each update, ends
    training early when it returns True. Seeded: nothing draws from the global torch or numpy
    generators."""
    x = torch.as_tensor(features, dtype=torch.float32)
    zt = torch.as_tensor(z, dtype=torch.float32)
    n, b = x.shape[0], min(budget, x.shape[0])
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    optimizer = torch.optim.Adam(agent.parameters(), lr=settings.lr)
    prior = agent.prior_logits(zt).detach()
    curve: list[dict[str, float]] = []
    agent.train()
    for update in range(settings.updates):
        logits = agent.logits(x, zt, rng.permutation(n), settings.chunk)
        picks = gumbel_top_b(logits, b, settings.samples, gen)
        rewards = np.asarray(reward_fn(picks.numpy()), dtype=np.float64)
        spread = rewards.std()
        adv = torch.as_tensor((rewards - rewards.mean()) / spread if spread > 0 else 0 * rewards, dtype=torch.float32)
        kl = _kl_to_prior(logits, prior)
        loss = -(adv * plackett_luce_log_prob(logits, picks)).mean() + settings.kl * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(agent.parameters(), settings.grad_clip)
        optimizer.step()
        probs = torch.softmax(logits.detach(), 0)
        curve.append(
            {
                "update": update,
                "reward_mean": float(rewards.mean()),
                "reward_max": float(rewards.max()),
                "kl": float(kl.detach()),
                "entropy": float(-(probs * torch.log(probs + 1e-12)).sum() / math.log(max(n, 2))),
            }
        )
        if on_update is not None:
            on_update(curve[-1])
        if stop is not None and stop():
            break
    return curve


@torch.no_grad()
def policy_scores(agent: PriorTiedAgent, features: np.ndarray, z: np.ndarray, settings: PolicySettings, *, seed: int):
    """The trained policy's logits ``[N]``, averaged over ``settings.orders`` seeded reading
    orders (the first is the identity)."""
    agent.eval()
    x = torch.as_tensor(features, dtype=torch.float32)
    zt = torch.as_tensor(z, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    orders = [np.arange(len(x))] + [rng.permutation(len(x)) for _ in range(settings.orders - 1)]
    return np.mean([agent.logits(x, zt, order, settings.chunk).numpy() for order in orders], axis=0)


def top_b(scores: np.ndarray, budget: int) -> np.ndarray:
    """Indices of the ``budget`` highest scores, ties to the lower index."""
    return np.argsort(-np.asarray(scores), kind="stable")[:budget]


class BatchMemo:
    """The look-up table: ``estimate(batch)`` for each distinct set of candidate indices,
    computed once. Call it with batches ``[G, B]``; :attr:`rows` lists (sorted batch, value)
    in the order they were first evaluated."""

    def __init__(self, estimate: Callable[[tuple[int, ...]], float]) -> None:
        self._estimate = estimate
        self._values: dict[tuple[int, ...], float] = {}

    def value(self, batch: Sequence[int]) -> float:
        key = tuple(sorted(int(i) for i in batch))
        if key not in self._values:
            self._values[key] = float(self._estimate(key))
        return self._values[key]

    def __call__(self, batches: np.ndarray) -> np.ndarray:
        return np.array([self.value(batch) for batch in np.asarray(batches)])

    @property
    def rows(self) -> list[tuple[tuple[int, ...], float]]:
        return list(self._values.items())


@dataclass(frozen=True)
class SafeChoice:
    """Which batch a cycle takes: ``learned`` (another than the prior's top-B: the policy's,
    or the one named by ``batch``) or the prior's, the estimated gain difference to the
    prior's, its paired standard error, and why."""

    learned: bool
    diff: float
    se: float
    reason: str
    batch: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "batch": self.batch or ("learned" if self.learned else "prior"),
            "diff": self.diff,
            "se": self.se,
            "reason": self.reason,
        }


def safe_choice(diff: float, se: float, *, z: float = 2.0, same: bool = False, name: str = "learned") -> SafeChoice:
    """Take another batch (``name``: the policy's by default) only when its estimated gain beats
    the prior's by more than ``z`` paired standard errors (``diff`` = it − prior, ``se`` the
    standard error of that difference); ``same``: the two batches are the same set."""
    label = None if name == "learned" else name
    if same:
        return SafeChoice(False, 0.0, 0.0, f"the {'policy' if label is None else name}'s batch is the prior's")
    if not (math.isfinite(diff) and math.isfinite(se)):
        return SafeChoice(False, diff, se, "the estimate is not finite: the prior's batch")
    if diff > z * se:
        return SafeChoice(True, diff, se, f"{name} beats the prior by {diff:.4g} > {z:g} x SE {se:.4g}", label)
    return SafeChoice(False, diff, se, f"{name} - prior = {diff:.4g} is within {z:g} x SE {se:.4g}: the prior's batch")
