"""The results table (one row per strategy label) as CSV and Markdown, and the whole report."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mgral._io import atomic_write_text
from mgral.report.load import (
    Series,
    metric_name,
    planned,
    reference_map,
    run_title,
)
from mgral.report.metrics import (
    by_label,
    labels_to_reach,
    mean_interval,
    normalized_auc,
    sign_test,
    std_over_seeds,
)

PHASES = ("train", "evaluate", "predict", "select")
FRACTIONS = (0.9, 0.95)
"""Targets for "labels to reach": these fractions of the full-data mAP."""


@dataclass(frozen=True)
class Paired:
    """nAUC(a) - nAUC(b) paired by seed (same initial set, same cycle-0 model), on the cycles
    both series of a seed finished: ``mean``, sample ``std`` (NaN with one pair), ``wins`` (seeds
    where ``a`` is higher) of ``n`` paired, the 95% interval of the mean over seeds
    (:func:`~mgral.report.metrics.mean_interval`, Student t; ``low``, ``high``; NaN with one
    pair) and the two-sided sign test's ``sign_p``."""

    mean: float
    std: float
    wins: int
    n: int
    low: float = math.nan
    high: float = math.nan
    sign_p: float = math.nan

    @property
    def distinguishable(self) -> bool:
        """The interval excludes 0 (False where there is no interval)."""
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)


@dataclass(frozen=True, eq=False)
class Row:
    """One strategy label. Every number uses only the ``cycles`` cycles all its seeds finished.

    ``num_labeled``, ``map_mean``, ``map_std``: per cycle, mean labeled images and test
    mAP@[.5:.95] mean and sample std (ddof=1; NaN with one seed: no spread) over seeds. ``auc_*``:
    :func:`normalized_auc` of mAP vs labeled images per seed, mean and std over seeds.
    ``reach[f]``: (mean over the seeds that reach it of :func:`labels_to_reach` at
    ``f`` × full-data mAP, how many seeds reach it); ``(None, 0)`` without a reference.
    ``seconds[phase]``: mean wall seconds per cycle (NaN if never recorded).
    ``max_cycles``: the most cycles any of its seeds finished, or the cycles its run plans
    (``cycles + 1`` of the recorded config) if more. Its seeds are those that got furthest
    (:func:`~mgral.report.metrics.by_label`). ``planned_seeds``: the seeds its runs plan, or
    that have started, whichever is more (None if unknown). :attr:`in_progress`: more cycles
    or seeds are still to come.
    ``vs_random``: the nAUC minus the ``random`` label's nAUC on the same seed (same initial
    set, so the pairs share their cycle-0 model), a :class:`Paired`; None without a random
    row, for the random row itself, or with no seed in common. ``vs_best``: (the label of the
    highest mean nAUC among the other rows, this row's :class:`Paired` difference to it).
    """

    label: str
    strategy_name: str
    seeds: int
    cycles: int
    max_cycles: int
    num_labeled: np.ndarray
    map_mean: np.ndarray
    map_std: np.ndarray
    auc_mean: float
    auc_std: float
    reach: dict[float, tuple[float | None, int]]
    seconds: dict[str, float]
    vs_random: Paired | None = None
    vs_best: tuple[str, Paired | None] | None = None
    planned_seeds: int | None = None

    @property
    def select_per_train(self) -> float:
        """Selection seconds per training second (the cost of choosing, in trainings)."""
        train, select = self.seconds.get("train", math.nan), self.seconds.get("select", math.nan)
        return select / train if train > 0 else math.nan

    @property
    def in_progress(self) -> bool:
        return self.max_cycles > self.cycles or (self.planned_seeds is not None and self.seeds < self.planned_seeds)

    def progress(self) -> str:
        """What an in-progress row holds, e.g. ``2 of 6 cycles, 2 of 3 seeds``."""
        parts = [f"{self.cycles} of {self.max_cycles} cycles"] if self.max_cycles > self.cycles else []
        if self.planned_seeds is not None and self.seeds < self.planned_seeds:
            parts.append(f"{self.seeds} of {self.planned_seeds} seeds")
        return ", ".join(parts)


@dataclass(frozen=True, eq=False)
class Table:
    """The rows (labels sorted) and what the header needs; ``num_labeled[c]`` is the mean
    labeled images at cycle ``c`` over the rows that have it (the column headings)."""

    rows: list[Row]
    num_labeled: np.ndarray
    reference_map: float | None
    reference_seeds: int
    run_dirs: list[Path]
    seed_list: list[int]
    metric: str = "mAP@[.5:.95]"
    """What ``mAP`` is (:func:`~mgral.report.load.metric_name`)."""


def _spread(values: np.ndarray) -> np.ndarray:
    """Sample std over seeds (axis 0, ddof=1); NaN with one seed, where there is no spread."""
    return std_over_seeds(values) if len(values) > 1 else np.full(values.shape[1:], math.nan)


def mean_std(mean: float, std: float, fmt: str = ".4f") -> str:
    """``mean ± std`` as the tables print it; the mean alone where ``std`` is NaN (one seed)."""
    return format(mean, fmt) + ("" if math.isnan(std) else f" ± {std:.4f}")


def _mean_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _row(group: list[Series], full: float | None) -> Row:
    n = min(len(s) for s in group)
    labeled = np.stack([s.num_labeled[:n] for s in group])
    maps = np.stack([s.mAP[:n] for s in group])
    aucs = np.array([normalized_auc(x, y) for x, y in zip(labeled, maps, strict=True)])
    reach: dict[float, tuple[float | None, int]] = {}
    for f in FRACTIONS:
        hits = [] if full is None else [labels_to_reach(x, y, f * full) for x, y in zip(labeled, maps, strict=True)]
        hits = [h for h in hits if h is not None]
        reach[f] = (float(np.mean(hits)) if hits else None, len(hits))
    seconds = {
        p: _mean_finite(np.concatenate([s.seconds.get(p, np.full(n, math.nan))[:n] for s in group])) for p in PHASES
    }
    return Row(
        label=group[0].label,
        strategy_name=group[0].strategy_name,
        seeds=len(group),
        cycles=n,
        max_cycles=max(len(s) for s in group),
        num_labeled=labeled.mean(axis=0),
        map_mean=maps.mean(axis=0),
        map_std=_spread(maps),
        auc_mean=float(aucs.mean()),
        auc_std=float(_spread(aucs[:, None])[0]),
        reach=reach,
        seconds=seconds,
    )


RANDOM_LABEL = "random"
"""The label of the baseline every strategy is paired with (``vs_random``)."""


def paired_difference(group: list[Series], other: list[Series]) -> Paired | None:
    """nAUC(group) - nAUC(other), paired by seed on the cycles both series of a seed finished
    (:class:`Paired`), or None with no common seed."""
    baseline = {s.seed: s for s in other}
    diffs = []
    for s in group:
        r = baseline.get(s.seed)
        if r is None:
            continue
        n = min(len(s), len(r))
        diffs.append(normalized_auc(s.num_labeled[:n], s.mAP[:n]) - normalized_auc(r.num_labeled[:n], r.mAP[:n]))
    if not diffs:
        return None
    d = np.array(diffs)
    low, high = mean_interval(d)
    return Paired(float(d.mean()), float(_spread(d[:, None])[0]), int((d > 0).sum()), len(d), low, high, sign_test(d))


def results_table(series_list: Sequence[Series], reference: dict[int, dict[str, Any]] | None = None) -> Table:
    """One :class:`Row` per strategy label; ``reference`` as :func:`load_reference` gives it.

    Raises:
        ValueError: no series.
    """
    if not series_list:
        raise ValueError("no series to tabulate")
    full = reference_map(reference)
    groups = by_label(series_list)
    rows = [_row(group, full) for group in groups.values()]
    cycles, seeds = planned(list(dict.fromkeys(s.run_dir for s in series_list)))
    started = Counter(s.label for s in series_list)  # with the seeds by_label left out (not as far yet)
    rows = [
        replace(r, max_cycles=max(r.max_cycles, cycles or 0), planned_seeds=max(seeds or 0, started[r.label]) or None)
        for r in rows
    ]
    if RANDOM_LABEL in groups:
        baseline = groups[RANDOM_LABEL]
        rows = [
            r if r.label == RANDOM_LABEL else replace(r, vs_random=paired_difference(groups[r.label], baseline))
            for r in rows
        ]
    if len(rows) > 1:
        best = {}
        for r in rows:
            rival = max((o for o in rows if o.label != r.label), key=lambda o: o.auc_mean)
            best[r.label] = (rival.label, paired_difference(groups[r.label], groups[rival.label]))
        rows = [replace(r, vs_best=best[r.label]) for r in rows]
    width = max(r.cycles for r in rows)
    headings = np.array([np.mean([r.num_labeled[c] for r in rows if c < r.cycles]) for c in range(width)])
    return Table(
        rows=rows,
        num_labeled=headings,
        reference_map=full,
        reference_seeds=len(reference or {}),
        run_dirs=list(dict.fromkeys(s.run_dir for s in series_list)),
        seed_list=sorted({s.seed for s in series_list}),
        metric=metric_name(list(dict.fromkeys(s.run_dir for s in series_list))),
    )


def _pct(f: float) -> str:
    return f"{round(f * 100)}pct"


def write_csv(table: Table, path: str | Path) -> None:
    """Write ``table`` as CSV: plain numbers at full precision, mean and std in separate
    columns, an empty cell for a missing value (a std over one seed among them); cycle columns ``c<k>_num_labeled``,
    ``c<k>_mAP_mean``, ``c<k>_mAP_std``; ``nauc_vs_random_*`` (paired by seed, see :class:`Row`);
    ``labels_to_<p>pct`` with ``..._seeds`` (how many reached)."""
    width = len(table.num_labeled)
    header = ["label", "strategy_name", "seeds", "cycles", "max_cycles", "in_progress"]
    header += [f"c{c}_{k}" for c in range(width) for k in ("num_labeled", "mAP_mean", "mAP_std")]
    header += ["nauc_mean", "nauc_std", "nauc_vs_random_mean", "nauc_vs_random_std", "wins_vs_random", "paired_seeds"]
    header += ["nauc_vs_random_low", "nauc_vs_random_high", "sign_p_vs_random", "distinguishable_from_random"]
    header += ["best_other", "nauc_vs_best_mean", "nauc_vs_best_low", "nauc_vs_best_high", "wins_vs_best"]
    header += ["paired_seeds_vs_best", "sign_p_vs_best"]
    header += [f"labels_to_{_pct(f)}{k}" for f in FRACTIONS for k in ("", "_seeds")]
    header += [f"seconds_{p}" for p in PHASES] + ["select_per_train"]

    def cell(v: float | None) -> str:
        return "" if v is None or math.isnan(v) else repr(float(v))

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in table.rows:
        line: list[Any] = [r.label, r.strategy_name, r.seeds, r.cycles, r.max_cycles, int(r.in_progress)]
        for c in range(width):
            line += [cell(a[c]) if c < r.cycles else "" for a in (r.num_labeled, r.map_mean, r.map_std)]
        line += [cell(r.auc_mean), cell(r.auc_std)]
        v = r.vs_random
        line += ["", "", "", ""] if v is None else [cell(v.mean), cell(v.std), v.wins, v.n]
        line += ["", "", "", ""] if v is None else [cell(v.low), cell(v.high), cell(v.sign_p), int(v.distinguishable)]
        rival, b = r.vs_best if r.vs_best is not None else ("", None)
        line += [rival] + (
            ["", "", "", "", "", ""]
            if b is None
            else [cell(b.mean), cell(b.low), cell(b.high), b.wins, b.n, cell(b.sign_p)]
        )
        line += [v for f in FRACTIONS for v in (cell(r.reach[f][0]), r.reach[f][1])]
        line += [cell(r.seconds[p]) for p in PHASES] + [cell(r.select_per_train)]
        writer.writerow(line)
    atomic_write_text(path, buffer.getvalue())


def interval_text(low: float, high: float) -> str:
    """A 95% interval as the tables print it, e.g. ``[+0.0050, +0.0200]``; empty without one."""
    return "" if math.isnan(low) else f" [{low:+.4f}, {high:+.4f}]"


def _p_text(v: Paired) -> str:
    """``, p 0.25``: the sign test's p, where there are at least 2 pairs."""
    return "" if math.isnan(v.sign_p) or v.n < 2 else f", p {v.sign_p:.2g}"


def vs_random_text(v: Paired | None) -> str:
    """A :class:`Paired` difference as the tables print it, e.g. ``+0.0450 ± 0.0100 [+0.0330, +0.0560]
    (3/3, p 0.25)``, with ``not distinguishable`` where the interval covers 0; — without one."""
    if v is None:
        return "—"
    flag = "" if v.distinguishable or math.isnan(v.low) else ", not distinguishable"
    return f"{mean_std(v.mean, v.std, '+.4f')}{interval_text(v.low, v.high)} ({v.wins}/{v.n}{_p_text(v)}{flag})"


def vs_best_text(best: tuple[str, Paired | None] | None) -> str:
    """:attr:`Row.vs_best` as the tables print it: the rival's label, then the difference."""
    if best is None:
        return "—"
    rival, v = best
    if v is None:
        return f"{rival}: —"
    return f"{rival}: {v.mean:+.4f}{interval_text(v.low, v.high)} ({v.wins}/{v.n}{_p_text(v)})"


def markdown_text(table: Table) -> str:
    partial = [r for r in table.rows if r.in_progress]
    runs = ", ".join(f"`{d}`" for d in table.run_dirs)
    names = ", ".join(r.label if r.label == r.strategy_name else f"{r.label} ({r.strategy_name})" for r in table.rows)
    full = "none"
    if table.reference_map is not None:
        full = f"test {table.metric} {table.reference_map:.4f} (mean over {table.reference_seeds} seed(s))"
    lines = [
        f"# Active-learning results: {run_title(table.run_dirs)}",
        "",
        f"- Runs: {runs}",
        f"- Strategies: {names}; seeds: {', '.join(map(str, table.seed_list))}",
        f"- Full-data reference: {full}",
        f"- `cK (N imgs)`: test {table.metric} after cycle K (N labeled images, mean), as mean ± sample std "
        "over seeds (ddof=1); the mean alone with 1 seed (no spread).",
        "- nAUC: normalized area under the curve of mAP vs labeled images: trapezoid area divided by "
        "(last - first labeled count), i.e. the mean mAP over the labeling range (0..1); mean ± std over seeds "
        "(the value alone with 1 seed).",
        "- vs random: nAUC minus random's nAUC on the same seed (same initial set), mean ± std over the paired "
        "seeds (the value alone with 1 pair), the 95% interval of that mean over seeds [low, high] (Student t), on how "
        "many seeds it is higher and the two-sided sign test's p; *not distinguishable* where the interval "
        "covers 0. vs best other: the same difference to the other strategy of the highest mean nAUC.",
        "- imgs to P%: labeled images at which a seed's curve (linear between cycles) first reaches P% of the "
        "full-data mAP; mean over the seeds that reach it ((k/n) when only k of n do); — if none or no reference.",
        "- Timings: mean wall seconds per cycle; select / train: selection seconds per training second.",
    ]
    if partial:
        lines.append(
            "- `*` still in progress (a seed has not finished every cycle): every number in the row uses "
            "only the seeds that got furthest, on the cycles they finished ("
            + "; ".join(f"{r.label}: {r.progress()}" for r in partial)
            + ")."
        )
    heads = ["strategy", "seeds"] + [f"c{c} ({n:.0f} imgs)" for c, n in enumerate(table.num_labeled)]
    heads += ["nAUC", "vs random", "vs best other"] + [f"imgs to {round(f * 100)}%" for f in FRACTIONS]
    heads += [f"{p} s" for p in PHASES] + ["select / train"]
    lines += ["", "| " + " | ".join(heads) + " |", "|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|"]
    for r in table.rows:
        cells = [r.label + ("*" if r.in_progress else ""), str(r.seeds)]
        cells += [mean_std(r.map_mean[c], r.map_std[c]) if c < r.cycles else "" for c in range(len(table.num_labeled))]
        cells += [mean_std(r.auc_mean, r.auc_std), vs_random_text(r.vs_random), vs_best_text(r.vs_best)]
        for f in FRACTIONS:
            value, k = r.reach[f]
            cells.append("—" if value is None else f"{value:.1f}" + ("" if k == r.seeds else f" ({k}/{r.seeds})"))
        cells += ["—" if math.isnan(r.seconds[p]) else f"{r.seconds[p]:.2f}" for p in PHASES]
        cells.append("—" if math.isnan(r.select_per_train) else f"{r.select_per_train:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(table: Table, path: str | Path) -> None:
    """Write ``table`` as Markdown: a header saying what the numbers mean, then a pipe table."""
    atomic_write_text(path, markdown_text(table))
