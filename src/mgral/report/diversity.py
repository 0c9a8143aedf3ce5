"""Diversity of the chosen batches, for every strategy whose cycles cached predictions.

For each (strategy label, seed, cycle) with a ``predictions.npz`` in its cycle directory
(every strategy that asked for predictions or embeddings; MGRAL included), the batch the
cycle chose (``selected`` in its record) is described by:

* ``mean_pairwise_distance``: mean L2 distance between the batch's pooled embeddings (the
  same figure MGRAL writes in its ``summary.json``);
* ``top_class_share``: the share of the batch's confident boxes (score > 0.3) that belong
  to its most frequent predicted class (1 = a single-class batch).

A strategy whose cycles cached nothing (``random``) has no figures: shown as "—".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.spatial.distance import pdist

from mgral.detectors.cache import load_predictions
from mgral.errors import MgralError
from mgral.report.load import Series
from mgral.runs import CYCLES_FILE, read_cycle_records


def batch_figures(cycle_dir: Path, selected: Sequence) -> dict[str, float] | None:
    """The two figures of one batch, or None without cached predictions covering it."""
    path = cycle_dir / "predictions.npz"
    if not selected or not path.is_file():
        return None
    try:
        preds = load_predictions(path)
    except MgralError:
        return None
    dets = [preds.get(i) for i in selected]
    if any(d is None or d.embedding is None for d in dets):
        return None
    emb = np.stack([np.asarray(d.embedding, dtype=np.float64) for d in dets])
    labels = np.concatenate([d.labels[d.scores > 0.3] for d in dets])
    share = (
        float(np.bincount(np.unique(labels, return_inverse=True)[1]).max() / len(labels)) if len(labels) else math.nan
    )
    return {"mean_pairwise_distance": float(pdist(emb).mean()) if len(emb) > 1 else 0.0, "top_class_share": share}


def diversity_by_label(series: Sequence[Series]) -> dict[str, dict[str, float]]:
    """Per strategy label: the figures averaged over every batch that has them, and how many."""
    out: dict[str, dict[str, float]] = {}
    for s in series:
        records = read_cycle_records(s.run_dir / s.label / f"seed-{s.seed}" / CYCLES_FILE)
        for r in records:
            fig = batch_figures(s.run_dir / s.label / f"seed-{s.seed}" / f"cycle-{r['cycle']}", r.get("selected"))
            if fig is None:
                continue
            acc = out.setdefault(s.label, {"mean_pairwise_distance": 0.0, "top_class_share": 0.0, "batches": 0})
            acc["batches"] += 1
            for k in ("mean_pairwise_distance", "top_class_share"):
                acc[k] += fig[k]
    for acc in out.values():
        for k in ("mean_pairwise_distance", "top_class_share"):
            acc[k] /= acc["batches"]
    return out


def diversity_markdown(series: Sequence[Series]) -> str:
    """A Markdown section with one row per strategy label ("—" where nothing was cached)."""
    figures = diversity_by_label(series)
    lines = [
        "",
        "## Batch diversity",
        "",
        "Mean over every chosen batch (seeds × cycles) whose cycle cached predictions: mean pairwise L2 "
        "distance of the batch's image embeddings (higher = more diverse), and the share of its confident "
        "boxes (score > 0.3) in its most frequent predicted class (lower = more balanced). Embeddings come "
        "from each cycle's own model, so compare strategies within a run.",
        "",
        "| strategy | batches | mean pairwise distance | top-class share |",
        "|---|---:|---:|---:|",
    ]
    for label in sorted({s.label for s in series}):
        f = figures.get(label)
        if f is None:
            lines.append(f"| {label} | 0 | — | — |")
        else:
            lines.append(
                f"| {label} | {f['batches']} | {f['mean_pairwise_distance']:.3f} | {f['top_class_share']:.3f} |"
            )
    return "\n".join(lines) + "\n"
