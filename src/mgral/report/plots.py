"""AL-curve plots (mean test mAP over seeds against labels spent, one line per strategy) and
MGRAL's diagnostics (the agent's reward per update, the reward model's accuracy per cycle)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mgral._io import atomic_write_bytes
from mgral.report.load import X_KEYS, Y_KEYS, MgralCycle, Series, reference_map
from mgral.report.metrics import aggregate, paired_curves
from mgral.runs import REWARD_WINDOW, reward_trend

X_LABELS = {"num_labeled": "labeled images", "num_boxes_labeled": "labeled boxes", "labeling_cost": "labeling cost"}
Y_LABELS = {"mAP": "test mAP@[.5:.95]", "mAP50": "test mAP50"}
_STEMS = {"num_labeled": "images", "num_boxes_labeled": "boxes", "labeling_cost": "cost"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_RC = {
    "svg.hashsalt": "mgral",  # SVG element ids come from this salt, not uuid4: same data, same bytes
    "svg.fonttype": "none",  # text stays <text> (searchable, small) instead of glyph paths
}


def plot_curves(
    series_list: Sequence[Series],
    out_dir: str | Path,
    *,
    x_key: str = "num_labeled",
    metric: str = "mAP",
    reference: dict[int, dict[str, Any]] | None = None,
    title: str | None = None,
    formats: Sequence[str] = ("png", "svg"),
    y_label: str | None = None,
) -> list[Path]:
    """Draw the AL curves and write ``curves_<images|boxes|cost>[_<metric>].<format>`` to ``out_dir``.

    One line per strategy label (:func:`~mgral.report.metrics.aggregate`: mean over seeds
    on the cycles all seeds finished) with markers at cycles and a shaded ±1 std band;
    against labeled images, with a ``random`` series beside others, a second panel draws each
    strategy's paired difference to random per cycle (:func:`~mgral.report.metrics.paired_curves`:
    same seed, same initial set) with the 95% interval of its mean over seeds. The full-data
    reference (:func:`~mgral.report.load.load_reference`), if given, is a dashed horizontal
    line at its mean ``metric`` over seeds. Colours and markers follow the sorted labels, so plots
    of the same strategies match. PNG at 150 dpi; SVG bytes are
    reproducible (fixed id salt, no date). Only Figure objects are used (no pyplot state);
    matplotlib's rcParams are changed inside an ``rc_context`` and restored on exit.

    Returns:
        The written paths, in ``formats`` order.

    Raises:
        ValueError: no series, an unknown ``x_key``/``metric``/format.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not series_list:
        raise ValueError("no series to plot")
    if x_key not in X_KEYS or metric not in Y_KEYS:
        raise ValueError(f"x_key must be one of {X_KEYS} and metric one of {Y_KEYS}, got {x_key!r}, {metric!r}")
    if bad := [f for f in formats if f not in ("png", "svg")]:
        raise ValueError(f"unsupported formats {bad}; use png and/or svg")
    curves = aggregate(series_list, x_key, metric)
    palette = matplotlib.colormaps["tab10" if len(curves) <= 10 else "tab20"].colors
    with matplotlib.rc_context(_RC):
        paired = paired_curves(series_list, "random", x_key, metric) if x_key == "num_labeled" else {}
        fig = Figure(figsize=(7, 7.5 if paired else 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        if paired:
            ax, low_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        else:
            ax = fig.add_subplot()
        colours = {label: palette[i % len(palette)] for i, label in enumerate(curves)}
        for i, curve in enumerate(curves.values()):
            colour, marker = palette[i % len(palette)], _MARKERS[i % len(_MARKERS)]
            note = f"n={curve.seeds}"
            if curve.max_cycles > curve.cycles:
                note += f", {curve.cycles} of {curve.max_cycles} cycles"
            ax.plot(curve.x, curve.mean, color=colour, marker=marker, markersize=4, label=f"{curve.label} ({note})")
            ax.fill_between(curve.x, curve.mean - curve.std, curve.mean + curve.std, color=colour, alpha=0.2, lw=0)
        full = reference_map(reference, metric)
        if full is not None:
            ax.axhline(full, color="0.25", linestyle="--", linewidth=1.2, label=f"full data ({full:.3f})")
        (low_ax if paired else ax).set_xlabel(X_LABELS[x_key])
        y_label = y_label or Y_LABELS[metric]  # e.g. "test VOC07 AP@0.5" for a VOC-style run
        ax.set_ylabel(y_label)
        ax.set_title(f"{title}: {y_label}" if title else y_label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
        if paired:
            low_ax.axhline(0.0, color="0.25", linewidth=1.0)
            for label, curve in paired.items():
                i = list(curves).index(label)
                colour, marker = colours[label], _MARKERS[i % len(_MARKERS)]
                low_ax.plot(curve.x, curve.mean, color=colour, marker=marker, markersize=4, label=label)
                band = np.isfinite(curve.low)
                if band.any():
                    low_ax.fill_between(curve.x, curve.low, curve.high, where=band, color=colour, alpha=0.15, lw=0)
            low_ax.set_ylabel("minus random, same seed")
            low_ax.set_title("paired difference to random (95% interval over seeds)", fontsize="medium")
            low_ax.grid(True, alpha=0.3)
        stem = f"curves_{_STEMS[x_key]}" + ("" if metric == "mAP" else f"_{metric}")
        return _save(fig, Path(out_dir) / stem, formats)


def _save(fig: Any, stem: Path, formats: Sequence[str]) -> list[Path]:
    paths = []
    for fmt in formats:
        buffer = io.BytesIO()
        # no date in SVG, no matplotlib version in either: the bytes depend on the data only
        metadata = {"Date": None, "Creator": None} if fmt == "svg" else {"Software": None}
        fig.savefig(buffer, format=fmt, dpi=150, metadata=metadata)
        path = stem.with_name(f"{stem.name}.{fmt}")
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths


MAX_DIAGNOSTIC_SERIES = 8
"""At most this many (label, seed, run) series get a row in ``mgral_diagnostics``."""


def diagnostic_series(diagnostics: Sequence[MgralCycle]) -> dict[tuple[str, int, Path], list[MgralCycle]]:
    """The diagnostics grouped by series ``(label, seed, run_dir)``, in that order, cycles sorted."""
    groups: dict[tuple[str, int, Path], list[MgralCycle]] = {}
    for d in sorted(diagnostics, key=lambda d: (d.label, d.seed, str(d.run_dir), d.cycle)):
        groups.setdefault((d.label, d.seed, d.run_dir), []).append(d)
    return groups


def plot_mgral_diagnostics(
    diagnostics: Sequence[MgralCycle],
    out_dir: str | Path,
    *,
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Draw MGRAL's diagnostics and write ``mgral_diagnostics.<format>`` to ``out_dir``.

    One row per (label, seed) series (:func:`diagnostic_series`; the first
    :data:`MAX_DIAGNOSTIC_SERIES`): on the left the agent's mean reward per update (faint)
    and its :func:`~mgral.runs.reward_trend` (solid, starting and ending at the
    diagnostics table's "first → last"), one colour per cycle (lighter = later); on the right
    the reward model's leave-one-out Spearman correlation per cycle (its accuracy at ranking
    the table's combinations, -1..1). Same conventions as :func:`plot_curves` (reproducible SVG, no pyplot state).

    Returns:
        The written paths, in ``formats`` order.

    Raises:
        ValueError: no diagnostics, or an unknown format.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not diagnostics:
        raise ValueError("no MGRAL diagnostics to plot")
    if bad := [f for f in formats if f not in ("png", "svg")]:
        raise ValueError(f"unsupported formats {bad}; use png and/or svg")
    groups = diagnostic_series(diagnostics)
    shown = list(groups.items())[:MAX_DIAGNOSTIC_SERIES]
    several_runs = len({run for _, _, run in groups}) > 1
    cmap = matplotlib.colormaps["viridis"]
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(10, 0.6 + 2.8 * len(shown)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(shown), 2, squeeze=False, width_ratios=(3, 2))
        for (left, right), ((label, seed, run), cycles) in zip(axes, shown, strict=True):
            name = f"{label} seed {seed}" + (f" ({run.name})" if several_runs else "")
            last = max(d.cycle for d in cycles) or 1
            drawn = 0
            for d in cycles:
                rewards = d.agent.get("reward_mean")
                if rewards is None or not len(rewards):
                    continue
                updates = d.agent.get("update", np.arange(len(rewards)))
                colour = cmap(0.9 * d.cycle / last)
                left.plot(updates, rewards, color=colour, linewidth=0.8, alpha=0.3)
                left.plot(*reward_trend(updates, rewards), color=colour, linewidth=1.6, label=f"cycle {d.cycle}")
                drawn += 1
            if drawn:
                left.legend(fontsize="x-small", ncols=2 if drawn > 6 else 1, loc="best")
            else:
                left.text(0.5, 0.5, "no agent rewards", ha="center", va="center", transform=left.transAxes)
            left.xaxis.set_major_locator(MaxNLocator(integer=True))
            left.set_title(f"{name}: agent reward", fontsize="medium")
            left.set_xlabel("agent update")
            left.set_ylabel(f"mean reward\n(solid: running mean of {REWARD_WINDOW} updates)", fontsize="small")
            left.grid(True, alpha=0.3)
            points = [(d.cycle, d.loo_spearman) for d in cycles if d.loo_spearman is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                right.plot(xs, ys, color="C0", marker="o", markersize=4)
            else:
                right.text(0.5, 0.5, "no LOO Spearman", ha="center", va="center", transform=right.transAxes)
            right.axhline(0, color="0.4", linewidth=0.8)
            right.set_ylim(-1.05, 1.05)
            right.set_xticks(sorted({d.cycle for d in cycles}))
            right.set_title(f"{name}: reward model LOO Spearman", fontsize="medium")
            right.set_xlabel("cycle")
            right.set_ylabel("Spearman ρ")
            right.grid(True, alpha=0.3)
        if len(groups) > len(shown):
            fig.suptitle(f"MGRAL diagnostics: the first {len(shown)} of {len(groups)} series")
        return _save(fig, Path(out_dir) / "mgral_diagnostics", formats)
