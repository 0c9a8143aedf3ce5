"""Summary numbers of AL curves: normalized AUC, labels to reach a target, mean ± std over seeds,
and paired differences between strategies (t intervals over seeds, the sign test, per-cycle curves)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from mgral.report.load import Series


def _xy(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or not x.size:
        raise ValueError(f"x and y must be 1-D of one non-zero length, got shapes {x.shape} and {y.shape}")
    if np.any(np.diff(x) < 0):
        raise ValueError(f"x must not decrease (labels only accumulate), got {x.tolist()}")
    return x, y


def normalized_auc(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """The mean of ``y`` over the labeling range: trapezoid area under y(x) over ``x[-1] - x[0]``.

    With ``y`` = mAP (0..1) against ``x`` = labeled images, the result is in mAP units
    (0..1): a curve flat at 0.4 scores 0.4 whatever the budget. One point gives its ``y``;
    points that all share one ``x`` give the mean ``y``. A NaN in ``y`` gives NaN.

    Normalizing the area under the learning curve by the budget range is the usual
    one-number summary of an AL curve in benchmarks, e.g. the "area under the budget
    curve" of Zhan et al., "A Comparative Survey of Deep Active Learning" (2022); the
    Active Learning Challenge (Guyon et al., 2011) used a log-scaled ``x`` instead.

    Raises:
        ValueError: empty or mismatched arrays, or a decreasing ``x``.
    """
    x, y = _xy(x, y)
    span = x[-1] - x[0]
    if span == 0:
        return float(np.mean(y))
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / span)


def labels_to_reach(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, target: float) -> float | None:
    """The smallest ``x`` at which the curve, linear between points, first reaches ``target``.

    E.g. ``x`` = labeled images, ``y`` = mAP, ``target`` = 0.9 × full-data mAP. If the first
    point already reaches it, that is ``x[0]``. None if no point reaches it.

    Raises:
        ValueError: empty or mismatched arrays, or a decreasing ``x``.
    """
    x, y = _xy(x, y)
    hits = np.flatnonzero(y >= target)
    if not hits.size:
        return None
    i = int(hits[0])
    if i == 0:
        return float(x[0])
    # y[i - 1] < target <= y[i], so the slope is positive and the crossing lies in (x[i-1], x[i]]
    return float(x[i - 1] + (target - y[i - 1]) / (y[i] - y[i - 1]) * (x[i] - x[i - 1]))


@dataclass(frozen=True, eq=False)
class Curve:
    """The mean curve of one strategy label over its seeds, on the cycles all of them finished.

    ``x``, ``x_std``, ``mean``, ``std`` have one entry per common cycle. ``std`` is the
    sample standard deviation (ddof=1) over seeds, 0 with one seed. ``max_cycles`` >
    ``cycles`` means some series have more cycles (a run still in progress) that the mean leaves out.
    """

    label: str
    seeds: int
    cycles: int
    max_cycles: int
    x: np.ndarray
    x_std: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def std_over_seeds(values: np.ndarray) -> np.ndarray:
    """Sample std (ddof=1) along axis 0 when it has ≥ 2 rows, else zeros."""
    return np.std(values, axis=0, ddof=1) if len(values) >= 2 else np.zeros(values.shape[1:])


def by_label(series_list: Iterable[Series]) -> dict[str, list[Series]]:
    """The series grouped by strategy label, labels sorted; of each label only the seeds that
    got furthest (the most cycles). In a finished run that is every seed; in a run still in
    progress the longest curves are compared, not every seed cut to its shortest (one seed
    at cycle 0 would otherwise reduce the whole row to one point)."""
    groups: dict[str, list[Series]] = {}
    for s in series_list:
        groups.setdefault(s.label, []).append(s)
    furthest = {label: [s for s in g if len(s) == max(len(t) for t in g)] for label, g in groups.items()}
    return dict(sorted(furthest.items()))


def aggregate(series_list: Iterable[Series], x_key: str = "num_labeled", y_key: str = "mAP") -> dict[str, Curve]:
    """Per strategy label (sorted), the mean and std of ``y_key`` over seeds at each cycle.

    Seeds are aligned by cycle, not interpolated: cycle ``c`` of every seed was given the
    same query budget, and interpolating onto a union grid would extrapolate outside each
    seed's range. The ``x`` of a point is the mean ``x_key`` over seeds (exact for
    ``num_labeled`` when no annotator skipped; ``num_boxes_labeled`` varies with the images
    chosen, hence ``x_std``). Only the cycles every seed of the label finished are used.

    Raises:
        ValueError: an unknown ``x_key`` or ``y_key``.
    """
    curves = {}
    for label, group in by_label(series_list).items():
        n = min(len(s) for s in group)
        xs = np.stack([s.column(x_key)[:n] for s in group])
        ys = np.stack([s.column(y_key)[:n] for s in group])
        curves[label] = Curve(
            label=label,
            seeds=len(group),
            cycles=n,
            max_cycles=max(len(s) for s in group),
            x=xs.mean(axis=0),
            x_std=std_over_seeds(xs),
            mean=ys.mean(axis=0),
            std=std_over_seeds(ys),
        )
    return curves


def mean_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The Student-t interval of the mean of ``values`` (scipy.stats.ttest_1samp); NaN with
    fewer than 2 values, their mean when they are all equal (to rounding: no spread).

    Not a percentile bootstrap: over a handful of seeds a bootstrap interval cannot be wider
    than the seeds' own range (3 seeds that agree in sign always exclude 0), so it claims far
    more than 95%; the t interval widens as seeds get fewer (x 4.3 / sqrt(3) of the std at 3
    seeds, x 2.36 / sqrt(8) at 8)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return math.nan, math.nan
    if np.allclose(v, v.mean(), rtol=1e-9, atol=1e-12):  # equal but for rounding: no spread to speak of
        return float(v.mean()), float(v.mean())
    return t_interval(float(v.mean()), float(v.std(ddof=1)), len(v), confidence)


def t_interval(mean: float, std: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Student-t interval of a mean from its summary: ``mean``, sample ``std`` (ddof=1) and
    ``n`` values (a published table keeps only these); NaN with fewer than 2 values."""
    from scipy.stats import t

    if n < 2 or math.isnan(std):
        return math.nan, math.nan
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def sign_test(differences: Sequence[float] | np.ndarray) -> float:
    """Two-sided sign-test p-value of paired differences (scipy.stats.binomtest on the nonzero
    ones; 1 when every difference is 0)."""
    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    return sign_test_counts(int((d > 0).sum()), len(d))


def sign_test_counts(wins: int, n: int) -> float:
    """Two-sided sign-test p-value of ``wins`` positive among ``n`` nonzero paired differences
    (scipy.stats.binomtest; 1 with none)."""
    from scipy.stats import binomtest

    return 1.0 if n == 0 else float(binomtest(wins, n, 0.5).pvalue)


@dataclass(frozen=True, eq=False)
class PairedCurve:
    """Per cycle, a strategy's ``y`` minus the baseline's on the same seed (same initial set,
    same cycle-0 model), over the seeds both have, on the cycles all those pairs finished:
    ``x`` (mean over the pairs), ``mean``, and the 95% interval of the mean over seeds
    (:func:`mean_interval`; ``low``, ``high``; NaN with one pair)."""

    label: str
    seeds: int
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def paired_curves(
    series_list: Iterable[Series], baseline: str, x_key: str = "num_labeled", y_key: str = "mAP"
) -> dict[str, PairedCurve]:
    """:class:`PairedCurve` of every label but ``baseline`` that shares a seed with it (sorted)."""
    groups = by_label(series_list)
    base = {s.seed: s for s in groups.get(baseline, [])}
    curves = {}
    for label, group in groups.items():
        pairs = [(s, base[s.seed]) for s in group if s.seed in base and label != baseline]
        if not pairs:
            continue
        n = min(min(len(s), len(b)) for s, b in pairs)
        d = np.stack([s.column(y_key)[:n] - b.column(y_key)[:n] for s, b in pairs])
        intervals = np.array([mean_interval(d[:, c]) for c in range(n)]).reshape(n, 2)
        curves[label] = PairedCurve(
            label=label,
            seeds=len(pairs),
            x=np.stack([s.column(x_key)[:n] for s, _ in pairs]).mean(axis=0),
            mean=d.mean(axis=0),
            low=intervals[:, 0],
            high=intervals[:, 1],
        )
    return curves
