"""Diversity of the chosen batches, for every strategy whose cycles cached predictions.

For each (strategy label, seed, cycle) with a ``predictions.npz`` in its cycle directory
(every strategy that asked for predictions or embeddings; MGRAL included), the batch the
cycle chose (``selected`` in its record) is described by:

* ``mean_pairwise_distance``: mean L2 distance between the batch's pooled embeddings (the
  same figure MGRAL writes in its ``summary.json``);
* ``top_class_share``: the share of the batch's confident boxes (score > 0.3) that belong
  to its most frequent predicted class (1 = a single-class batch); None when the batch has
  no confident box (a weak early model), and left out of that column's mean.

Cycle 0's model is the seed's shared one, whose pool predictions are cached once in
``RUN/_shared/seed-<s>/cycle-0/``: a series that caches predictions of its own reads its
cycle-0 batch there. A strategy whose cycles cached nothing (``random``) has no figures:
shown as "—". A series whose predictions were not kept (published records) may carry its
figures, by cycle, in ``RUN/<label>/seed-<s>/diversity.json`` (:func:`series_figures`
written down); cached predictions, where present, take precedence.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.spatial.distance import pdist

from mgral.detectors.cache import load_predictions
from mgral.errors import MgralError
from mgral.report.load import Series, predictions_dir
from mgral.runs import CycleDir, RunDir, read_cycle_records


def batch_figures(cycle_dir: Path, selected: Sequence) -> dict[str, float | None] | None:
    """The two figures of one batch, or None without cached predictions covering it."""
    path = CycleDir(Path(cycle_dir)).predictions
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
    share = float(np.bincount(np.unique(labels, return_inverse=True)[1]).max() / len(labels)) if len(labels) else None
    return {"mean_pairwise_distance": float(pdist(emb).mean()) if len(emb) > 1 else 0.0, "top_class_share": share}


def series_figures(run_dir: str | Path, label: str, seed: int) -> dict[int, dict[str, float]]:
    """The figures of every batch of one series that has them, by cycle: from cached
    predictions, else from the series' ``diversity.json``."""
    sdir = RunDir(run_dir).series(label, seed)
    try:
        saved = {int(k): v for k, v in json.loads(sdir.diversity.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, AttributeError):  # absent (the usual case) or unreadable: not used
        saved = {}
    own = any(c.predictions.exists() for c in sdir.cycles().values())  # it read predictions (random does not)
    out: dict[int, dict[str, float]] = {}
    for r in read_cycle_records(sdir.records):
        cdir = predictions_dir(Path(run_dir), sdir, r["cycle"]) if own else sdir.cycle(r["cycle"])
        fig = batch_figures(cdir.path, r.get("selected"))
        fig = fig if fig is not None else saved.get(r["cycle"])
        if fig is not None:
            out[r["cycle"]] = fig
    return out


def diversity_by_label(series: Sequence[Series]) -> dict[str, dict[str, float | None]]:
    """Per strategy label: each figure averaged over the batches that have it (a batch without
    confident boxes has no class share; NaN, as older records wrote it, counts as none), how
    many batches were described, and how many of them have a class share; a figure no batch
    has is None."""
    batches: dict[str, list[dict]] = {}
    for s in series:
        batches.setdefault(s.label, []).extend(series_figures(s.run_dir, s.label, s.seed).values())
    out: dict[str, dict] = {}
    for label, figs in batches.items():
        if not figs:
            continue
        kept = {
            k: [float(f[k]) for f in figs if f.get(k) is not None and math.isfinite(f[k])]
            for k in ("mean_pairwise_distance", "top_class_share")
        }
        out[label] = {k: float(np.mean(v)) if v else None for k, v in kept.items()}
        out[label].update(batches=len(figs), class_share_batches=len(kept["top_class_share"]))
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
        "boxes (score > 0.3) in its most frequent predicted class (lower = more balanced), over the batches "
        "that have confident boxes (how many, in brackets, where some have none: a batch with few boxes "
        "swings this figure). Embeddings come from each cycle's own model, so compare strategies within "
        "a run.",
        "",
        "| strategy | batches | mean pairwise distance | top-class share |",
        "|---|---:|---:|---:|",
    ]
    for label in sorted({s.label for s in series}):
        f = figures.get(label)
        if f is None:
            lines.append(f"| {label} | 0 | — | — |")
        else:
            dist = "—" if f["mean_pairwise_distance"] is None else f"{f['mean_pairwise_distance']:.3f}"
            share = "—" if f["top_class_share"] is None else f"{f['top_class_share']:.3f}"
            if f["top_class_share"] is not None and f["class_share_batches"] < f["batches"]:
                share += f" ({f['class_share_batches']} of {f['batches']})"
            lines.append(f"| {label} | {f['batches']} | {dist} | {share} |")
    return "\n".join(lines) + "\n"
