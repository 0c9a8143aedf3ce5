"""The batch reward ``R(S)`` fitted on look-up table rows.

``R(S) = sum_{x in S} c(x) + lam * sum_k sqrt(n_k(S))``:

* ``c(x) = w . phi(x) + b`` — a per-image credit, a linear (ridge) function of the image's
  compact label-free features ``phi``; fitted so that each row's summed credits match its
  ``dmAP``. Summing is linear, so a row is one ridge sample with features
  ``sum_{x in C_m} phi(x)`` and ``|C_m|`` (for ``b``): the credit extends to candidates no
  combination contained.
* the cluster term: ``n_k(S)`` images of ``S`` in embedding cluster ``k``; the square root
  makes a cluster's gain grow concavely (redundant batches earn less). ``lam`` is fitted
  with the credits and kept ``>= 0`` (a negative fit is refitted without the term).

Rows carry a weight (earlier cycles' rows down-weighted by age). Columns are scaled to unit
RMS before the ridge so the penalty does not depend on units. :func:`loo_spearman` reports
how well ``R`` predicts rows it did not see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr
from sklearn.linear_model import Ridge


@dataclass(frozen=True)
class TableRows:
    """Ridge samples: ``phi_sum [R, F]``, ``sizes [R]``, ``cluster [R]`` (the row's
    ``sum_k sqrt(n_k)``), ``dmap [R]``, ``weight [R]``."""

    phi_sum: np.ndarray
    sizes: np.ndarray
    cluster: np.ndarray
    dmap: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return len(self.dmap)

    def take(self, index: np.ndarray) -> TableRows:
        return TableRows(
            self.phi_sum[index], self.sizes[index], self.cluster[index], self.dmap[index], self.weight[index]
        )

    @staticmethod
    def concat(parts: Sequence[TableRows]) -> TableRows:
        return TableRows(*(np.concatenate([getattr(p, f) for p in parts]) for f in TableRows.__dataclass_fields__))


def cluster_term(cluster_ids: np.ndarray, num_clusters: int) -> float:
    """``sum_k sqrt(n_k)`` of one combination given its members' cluster ids."""
    return float(np.sqrt(np.bincount(cluster_ids, minlength=num_clusters)).sum())


@dataclass(frozen=True)
class RewardModel:
    """``R(S)``: per-feature credit weights, a per-image bias and the cluster coefficient."""

    weights: np.ndarray
    bias: float
    cluster_coef: float

    def credits(self, phi: np.ndarray) -> np.ndarray:
        """Per-image credits ``c(x)`` for rows of ``phi [N, F]``."""
        return phi @ self.weights + self.bias

    def batch_rewards(self, credits: np.ndarray, clusters: np.ndarray, batches: np.ndarray) -> np.ndarray:
        """``R(S)`` of each row of ``batches [G, B]`` (indices into ``credits``/``clusters``)."""
        reward = credits[batches].sum(axis=1)
        if self.cluster_coef:
            g = batches.shape[0]
            counts = np.zeros((g, int(clusters.max()) + 1))
            np.add.at(counts, (np.repeat(np.arange(g), batches.shape[1]), clusters[batches].ravel()), 1.0)
            reward = reward + self.cluster_coef * np.sqrt(counts).sum(axis=1)
        return reward

    def predict_rows(self, rows: TableRows) -> np.ndarray:
        return rows.phi_sum @ self.weights + self.bias * rows.sizes + self.cluster_coef * rows.cluster

    def to_dict(self, feature_names: Sequence[str] | None = None) -> dict:
        names = list(feature_names) if feature_names is not None else [f"f{k}" for k in range(len(self.weights))]
        return {
            "weights": dict(zip(names, map(float, self.weights), strict=True)),
            "bias": float(self.bias),
            "cluster_coef": float(self.cluster_coef),
        }


def _ridge(design: np.ndarray, y: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    scale = np.sqrt((design**2).mean(axis=0))
    scale = np.where(scale > 1e-12, scale, 1.0)
    model = Ridge(alpha=alpha, fit_intercept=False).fit(design / scale, y, sample_weight=weight)
    return model.coef_ / scale


def fit_reward_model(rows: TableRows, *, alpha: float = 1.0, use_cluster: bool = True) -> RewardModel:
    """Fit ``R`` on table rows (weighted ridge; see the module docstring)."""
    f = rows.phi_sum.shape[1]
    design = np.column_stack([rows.phi_sum, rows.sizes] + ([rows.cluster] if use_cluster else []))
    coef = _ridge(design, rows.dmap, rows.weight, alpha)
    if use_cluster and coef[-1] < 0:  # a concave coverage bonus cannot be negative: refit without it
        coef = np.append(_ridge(design[:, :-1], rows.dmap, rows.weight, alpha), 0.0)
    return RewardModel(coef[:f], float(coef[f]), float(coef[f + 1]) if use_cluster else 0.0)


def loo_spearman(
    rows: TableRows, held: np.ndarray, *, alpha: float = 1.0, use_cluster: bool = True
) -> tuple[float | None, np.ndarray]:
    """Leave-one-out Spearman over the rows marked by boolean ``held`` (the current cycle's):
    each is predicted by a model fitted on every other row (other cycles' rows included).

    Returns:
        (Spearman rank correlation of predictions vs dmAP, or None with fewer than 3 rows or
        a constant column; the LOO predictions ``[held.sum()]``).
    """
    index = np.flatnonzero(held)
    preds = np.empty(len(index))
    for j, i in enumerate(index):
        keep = np.ones(len(rows), dtype=bool)
        keep[i] = False
        preds[j] = fit_reward_model(rows.take(keep), alpha=alpha, use_cluster=use_cluster).predict_rows(
            rows.take(np.array([i]))
        )[0]
    truth = rows.dmap[index]
    if len(index) < 3 or np.ptp(truth) == 0 or np.ptp(preds) == 0:
        return None, preds
    return float(spearmanr(preds, truth).statistic), preds
