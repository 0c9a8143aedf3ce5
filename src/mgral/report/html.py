"""``report.html``: the whole report in one self-contained page, readable offline.

The page holds the AL curves, the results table, the per-phase timings, MGRAL's
diagnostics (when a run has them: :func:`~mgral.report.load.load_mgral_diagnostics`) and a
gallery of each cycle's selected images with the boxes the cycle's model predicted on them.
Every figure and thumbnail is embedded as a ``data:`` URI, there is no script, and a
Content-Security-Policy forbids loading anything from elsewhere, so the file can be mailed
or archived alone. All text (labels, image ids, category names come from user files) is
HTML-escaped by the template engine (Jinja2 with autoescaping).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mgral._io import atomic_write_text
from mgral.data.records import Dataset, Detections, ImageId
from mgral.errors import MgralError
from mgral.report.load import (
    MGRAL_STAGES,
    DatasetCache,
    MgralCycle,
    Series,
    predictions_dir,
    run_dataset,
    run_title,
)
from mgral.report.metrics import by_label
from mgral.report.plots import diagnostic_series
from mgral.report.tables import FRACTIONS, Table, mean_std, results_table, vs_random_text
from mgral.runs import REFERENCE_LABEL, REWARD_WINDOW, RunDir, SeriesDir, read_cycle_records

log = logging.getLogger(__name__)

TEMPLATE = "templates/report.html.j2"
THUMBNAIL_SIZE = 160
"""Longest side of a gallery thumbnail, in pixels."""
GALLERY_PER_CYCLE = 6
"""The gallery shows the first this many selected images of each cycle."""
GALLERY_MAX_IMAGES = 300
"""At most this many thumbnails in all (about 8 KB each), so the page stays a few MB."""
BOX_SCORE = 0.3
"""Predicted boxes with at least this score are drawn on the thumbnails."""
MAX_BOXES = 20
"""At most this many boxes (the highest-scoring) are drawn on one thumbnail."""
TABLE_ROWS_SHOWN = 25
"""At most this many rows of each cycle's MGRAL table (the control row and the best dmAP)."""
PHASE_ORDER = ("train", "evaluate", "predict", "select", "label")
_PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
MGRAL_CAPTION = (
    f"Left: the agent's mean reward per update (faint) and its running mean over {REWARD_WINDOW} updates (solid; "
    "over half the updates when there are fewer than twice that), one colour per cycle: the solid line starts and "
    "ends at the table's first → last. Right: the reward model's leave-one-out Spearman correlation per cycle."
)
_MIME = {".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...``: a file embedded in the page."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure(caption: str, path: Path) -> dict[str, Any]:
    """A figure file (PNG or SVG) as the template shows it: caption, data URI and its size in
    CSS pixels (96 per inch), so a 150-dpi PNG and an SVG of one figure size show alike."""
    data = path.read_bytes()
    suffix = path.suffix.lower()
    width = height = None
    if suffix == ".svg":
        found = re.search(rb'<svg[^>]*?\swidth="([\d.]+)pt"[^>]*?\sheight="([\d.]+)pt"', data[:2000])
        if found:
            width, height = (round(float(v) * 96 / 72) for v in found.groups())
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            dpi = float(image.info.get("dpi", (96, 96))[0]) or 96
            width, height = (round(v * 96 / dpi) for v in image.size)
    return {"caption": caption, "uri": data_uri(data, _MIME[suffix]), "width": width, "height": height}


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


# -- results and timings ------------------------------------------------------------------


def _results(table: Table) -> dict[str, Any]:
    rows = []
    width = len(table.num_labeled)
    for r in table.rows:
        maps = [mean_std(r.map_mean[c], r.map_std[c]) if c < r.cycles else "" for c in range(width)]
        reach = []
        for f in FRACTIONS:
            value, k = r.reach[f]
            reach.append("—" if value is None else f"{value:.1f}" + ("" if k == r.seeds else f" ({k}/{r.seeds})"))
        rows.append(
            {
                "label": r.label,
                "strategy_name": r.strategy_name,
                "partial": r.in_progress,
                "progress": r.progress(),
                "cycles": r.cycles,
                "max_cycles": r.max_cycles,
                "seeds": r.seeds,
                "maps": maps,
                "auc": mean_std(r.auc_mean, r.auc_std),
                "vs_random": vs_random_text(r.vs_random),
                "reach": reach,
            }
        )
    return {
        "headings": [f"c{c}" for c in range(width)],
        "images": [f"{n:.0f} imgs" for n in table.num_labeled],
        "fractions": [round(f * 100) for f in FRACTIONS],
        "rows": rows,
    }


def _timings(series: Sequence[Series]) -> dict[str, Any]:
    """Mean wall seconds per cycle of every phase any series recorded, per label (common cycles)."""
    recorded = {p for s in series for p in s.seconds}
    phases = [p for p in PHASE_ORDER if p in recorded] + sorted(recorded - set(PHASE_ORDER))
    rows = []
    for label, group in by_label(series).items():
        n = min(len(s) for s in group)
        means = []
        for p in phases:
            values = np.concatenate([s.seconds.get(p, np.full(n, math.nan))[:n] for s in group])
            finite = values[np.isfinite(values)]
            means.append(float(finite.mean()) if finite.size else math.nan)
        total = sum(v for v in means if not math.isnan(v))
        rows.append({"label": label, "cells": [_num(v, ".2f") for v in means], "total": f"{total:.2f}"})
    return {"phases": phases, "rows": rows}


# -- MGRAL diagnostics --------------------------------------------------------------------


def _ids(ids: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f", … ({len(ids)} in all)" if len(ids) > limit else "")


def _mgral_cycle(d: MgralCycle, stages: Sequence[str]) -> dict[str, Any]:
    rows = sorted(d.table, key=lambda r: (not r.control, -r.dmAP if not math.isnan(r.dmAP) else math.inf))
    updates = d.agent.get("reward_mean", d.agent.get("update", np.zeros(0)))
    histogram = sorted(d.class_histogram.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "cycle": d.cycle,
        "loo": _num(d.loo_spearman, ".3f"),
        "table_rows": "—" if d.table_rows is None else str(d.table_rows),
        "updates": len(updates),
        "reward": f"{_num(d.reward_first)} → {_num(d.reward_last)}",
        "distance": _num(d.mean_pairwise_distance),
        "histogram": ", ".join(f"{name}: {count}" for name, count in histogram) or "—",
        "seconds": [_num(d.seconds.get(s), ".2f") for s in stages],
        "categories": d.categories,
        "rows": [
            {
                "control": r.control,
                "combination": "control" if r.control else _ids(r.combination),
                "dmAP": _num(r.dmAP, "+.4f"),
                "mAP": _num(r.mAP),
                "ap": [_num(r.ap.get(c)) for c in d.categories],
            }
            for r in rows[:TABLE_ROWS_SHOWN]
        ],
        "rows_total": len(d.table),
        "problems": d.problems,
    }


def _mgral(diagnostics: Sequence[MgralCycle]) -> list[dict[str, Any]]:
    groups = diagnostic_series(diagnostics)
    several_runs = len({run for _, _, run in groups}) > 1
    out = []
    for (label, seed, run), cycles in groups.items():
        stages = sorted(set(MGRAL_STAGES).union(*(d.seconds for d in cycles)), key=_stage_order)
        items = [_mgral_cycle(d, stages) for d in cycles]
        out.append(
            {"label": label, "seed": seed, "run": str(run) if several_runs else "", "stages": stages, "cycles": items}
        )
    return out


def _stage_order(stage: str) -> tuple[int, str]:
    return (MGRAL_STAGES.index(stage) if stage in MGRAL_STAGES else len(MGRAL_STAGES), stage)


# -- gallery ------------------------------------------------------------------------------


@dataclass
class _Budget:
    left: int


def _thumbnail(path: Path, dets: Detections | None, colours: dict[int, tuple[int, int, int]]) -> tuple[str, int]:
    """The image at ``path`` at most :data:`THUMBNAIL_SIZE` px with ``dets`` drawn: (data URI, the
    number of boxes scoring at least :data:`BOX_SCORE`; the first :data:`MAX_BOXES` of them are drawn)."""
    from PIL import Image, ImageDraw

    with Image.open(path) as image:
        width, height = image.size
        image.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))  # JPEG: decode at a reduced size
        image = image.convert("RGB")
        scale = min(1.0, THUMBNAIL_SIZE / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    drawn = 0
    if dets is not None and len(dets):
        draw = ImageDraw.Draw(image)
        order = [i for i in np.argsort(-dets.scores, kind="stable") if dets.scores[i] >= BOX_SCORE][:MAX_BOXES]
        for i in order[::-1]:  # the most confident box is drawn last, on top
            x1, y1, x2, y2 = (float(v) * scale for v in dets.boxes[i])
            colour = colours.get(int(dets.labels[i]), (255, 255, 255))
            draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=2)
        drawn = int(np.count_nonzero(dets.scores >= BOX_SCORE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    return data_uri(buffer.getvalue(), "image/jpeg"), drawn


def _detections_text(dets: Detections, names: dict[int, str]) -> str:
    order = [i for i in np.argsort(-dets.scores, kind="stable") if dets.scores[i] >= BOX_SCORE][:MAX_BOXES]
    return "; ".join(f"{names.get(int(dets.labels[i]), dets.labels[i])} {dets.scores[i]:.2f}" for i in order)


def _selections(sdir: SeriesDir) -> list[tuple[int, list[ImageId]]]:
    """(cycle, selected ids) of every cycle that made a selection, from ``cycles.jsonl`` and,
    for a cycle in progress, ``selection.json``."""
    records = read_cycle_records(sdir.records)
    found = [(r["cycle"], r["selected"]) for r in records if isinstance(r.get("selected"), list) and r["selected"]]
    pending = sdir.cycle(len(records)).selection
    if pending.is_file():
        try:
            ids = json.loads(pending.read_text(encoding="utf-8")).get("image_ids")
        except (OSError, ValueError, AttributeError) as err:
            log.warning("%s: unreadable selection (%s); left out of the gallery", pending, err)
        else:
            if isinstance(ids, list) and ids:
                found.append((len(records), ids))
    return found


def _gallery_cycle(
    cache: Path, cycle: int, ids: list[ImageId], dataset: Dataset, per_cycle: int, budget: _Budget
) -> dict[str, Any]:
    """One cycle's thumbnails with the boxes predicted in ``cache`` (the cycle model's ``predictions.npz``)."""
    from PIL import Image

    from mgral.detectors.cache import load_predictions

    colours = {c.id: _PALETTE[k % len(_PALETTE)] for k, c in enumerate(dataset.categories)}
    names = dataset.category_names
    preds: dict[ImageId, Detections] | None = None
    note = "no predictions cached"
    if cache.is_file():
        try:
            preds, note = load_predictions(cache), ""
        except MgralError as err:
            log.warning("%s", err)
            note = "the cached predictions are unreadable"
    shown = ids[: min(per_cycle, budget.left)]
    images = []
    for image_id in shown:
        item: dict[str, Any] = {"id": str(image_id), "uri": "", "caption": "", "title": ""}
        dets = None if preds is None else preds.get(image_id)
        if image_id not in dataset:
            item["caption"] = "not in the dataset"
            images.append(item)
            continue
        try:
            item["uri"], drawn = _thumbnail(dataset.image_path(image_id), dets, colours)
        except FileNotFoundError:
            item["caption"] = "image file missing"
            images.append(item)
            continue
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            log.warning("%s: cannot make a thumbnail (%s)", dataset.image_path(image_id), err)
            item["caption"] = "image unreadable"
            images.append(item)
            continue
        budget.left -= 1
        if preds is not None and dets is None:
            item["caption"] = "not in the cached predictions"
        elif dets is not None:  # without a cache the cycle's line says "no predictions cached"
            count = f"top {MAX_BOXES} of {drawn}" if drawn > MAX_BOXES else str(drawn)
            item["caption"] = f"{count} box{'es' if drawn != 1 else ''} ≥ {BOX_SCORE:g}"
            item["title"] = _detections_text(dets, names)
        images.append(item)
    return {"cycle": cycle, "selected": len(ids), "images": images, "note": note}


def _gallery(series: Sequence[Series], per_cycle: int, datasets: DatasetCache) -> tuple[list[dict[str, Any]], bool]:
    """Per label, its first series' (lowest seed) selections; and whether the total cap cut it."""
    budget = _Budget(GALLERY_MAX_IMAGES)
    out = []
    cut = False
    for label, group in by_label(series).items():
        if label == REFERENCE_LABEL:
            continue
        s = group[0]
        sdir = RunDir(s.run_dir).series(label, s.seed)
        entry: dict[str, Any] = {"label": label, "seed": s.seed, "message": "", "cycles": []}
        out.append(entry)
        selections = _selections(sdir)
        if not selections:
            entry["message"] = "no cycle has selected images yet"
            continue
        dataset, message = run_dataset(s.run_dir, datasets)
        if dataset is None:
            entry["message"] = message
            continue
        for cycle, ids in selections:
            if budget.left <= 0:
                cut = True
                break
            cache = predictions_dir(s.run_dir, sdir, cycle).predictions
            entry["cycles"].append(_gallery_cycle(cache, cycle, ids, dataset, per_cycle, budget))
    return out, cut


# -- the page -----------------------------------------------------------------------------


def _template() -> Any:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(resources.files("mgral.report").joinpath(TEMPLATE).read_text(encoding="utf-8"))


def render_html(
    run_dirs: Sequence[str | Path],
    series: Sequence[Series],
    *,
    reference: dict[int, dict[str, Any]] | None = None,
    table: Table | None = None,
    diagnostics: Sequence[MgralCycle] = (),
    figures: Sequence[tuple[str, Path]] = (),
    diagnostics_figure: Path | None = None,
    gallery_per_cycle: int = GALLERY_PER_CYCLE,
    datasets: DatasetCache | None = None,
) -> str:
    """The page as a string (see the module docstring).

    ``figures``: (caption, PNG or SVG file) of the curves, embedded in order;
    ``diagnostics_figure``: the drawing of ``diagnostics`` (:func:`plot_mgral_diagnostics`).
    ``table`` is computed from ``series`` and ``reference`` when not given. ``datasets``: the
    runs' datasets already read (:func:`mgral.report.load.run_dataset`), so a report reads each once.

    Raises:
        ValueError: no series.
    """
    if table is None:
        table = results_table(series, reference)
    gallery, cut = _gallery(series, gallery_per_cycle, {} if datasets is None else datasets)
    context = {
        "title": run_title(run_dirs),
        "runs": [str(d) for d in table.run_dirs],
        "strategies": [r.label if r.label == r.strategy_name else f"{r.label} ({r.strategy_name})" for r in table.rows],
        "seeds": ", ".join(map(str, table.seed_list)),
        "metric": table.metric,
        "reference": (
            "none"
            if table.reference_map is None
            else f"test {table.metric} {table.reference_map:.4f} (mean over {table.reference_seeds} seed(s))"
        ),
        "figures": [figure(caption, path) for caption, path in figures],
        "results": _results(table),
        "timings": _timings(series),
        "mgral": _mgral(diagnostics),
        "mgral_figure": None if diagnostics_figure is None else figure(MGRAL_CAPTION, diagnostics_figure),
        "gallery": gallery,
        "gallery_cut": cut,
        "gallery_per_cycle": gallery_per_cycle,
        "gallery_max": GALLERY_MAX_IMAGES,
        "box_score": f"{BOX_SCORE:g}",
        "reward_window": REWARD_WINDOW,
        "thumbnail_size": THUMBNAIL_SIZE,
    }
    return _template().render(**context)


def write_html(path: str | Path, run_dirs: Sequence[str | Path], series: Sequence[Series], **kwargs: Any) -> Path:
    """Write :func:`render_html` to ``path`` atomically and return ``path``."""
    atomic_write_text(path, render_html(run_dirs, series, **kwargs))
    return Path(path)
