"""The whole report of one or more runs: curves, tables, selections and ``report.html``.

This module only puts the pieces together; :mod:`mgral.report.tables` computes the tables,
:mod:`mgral.report.plots` draws, :mod:`mgral.report.html` renders the page.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from mgral._io import atomic_write_text
from mgral.report.diversity import diversity_markdown
from mgral.report.html import write_html
from mgral.report.load import dataset_of, load_mgral_diagnostics, load_reference, load_series, run_title
from mgral.report.plots import plot_curves, plot_mgral_diagnostics
from mgral.report.tables import markdown_text, results_table, write_csv
from mgral.runs import RunDir, read_cycle_records

SELECTION_COLUMNS = ("strategy", "strategy_name", "seed", "cycle", "rank", "image_id", "file_name", "score")


def write_selections(run_dirs: Sequence[str | Path], path: str | Path, datasets: dict | None = None) -> int:
    """Write every image each series chose, as CSV (:data:`SELECTION_COLUMNS`): ``cycle`` is
    the cycle whose model chose it (it is labeled from cycle + 1 on), ``rank`` its place in
    that batch (0 = first), ``score`` the strategy's score, ``file_name`` from the run's
    dataset when it can be read (``datasets``: a cache shared with the HTML report's gallery,
    :data:`mgral.report.load.DatasetCache`). Returns the number of rows.

    Raises:
        RunError: as :func:`load_series`.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SELECTION_COLUMNS)
    n = 0
    for run_dir in map(Path, run_dirs):
        dataset = dataset_of(run_dir, datasets)
        for sdir in RunDir(run_dir).list_series():
            for record in read_cycle_records(sdir.records):
                scores = record.get("scores") or []
                for rank, image_id in enumerate(record.get("selected") or []):
                    file_name = dataset[image_id].file_name if dataset is not None and image_id in dataset else ""
                    score = scores[rank] if rank < len(scores) else ""
                    name = record.get("strategy_name", sdir.label)
                    writer.writerow([sdir.label, name, sdir.seed, record["cycle"], rank, image_id, file_name, score])
                    n += 1
    atomic_write_text(path, buffer.getvalue())
    return n


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Load the runs and write the curves, the results table and the HTML report into ``out_dir``.

    Writes ``curves_images.{png,svg}``, ``curves_boxes.{png,svg}``, ``curves_images_mAP50.png``,
    ``results.csv``, ``results.md``, ``selections.csv`` (every chosen image), ``report.html``
    (everything in one self-contained page: :mod:`mgral.report.html`) and, when a run has MGRAL diagnostics,
    ``mgral_diagnostics.{png,svg}``. Returns the path of ``results.md``.

    Raises:
        RunError: as :func:`load_series` and :func:`load_reference`.
    """
    series, reference = load_series(run_dirs), load_reference(run_dirs)
    out, title = Path(out_dir), run_title(run_dirs)
    table = results_table(series, reference)
    label = f"test {table.metric}"
    images = plot_curves(series, out, x_key="num_labeled", reference=reference, title=title, y_label=label)
    boxes = plot_curves(series, out, x_key="num_boxes_labeled", reference=reference, title=title, y_label=label)
    map50 = plot_curves(series, out, metric="mAP50", reference=reference, title=title, formats=("png",))
    write_csv(table, out / "results.csv")
    datasets: dict = {}  # each run's dataset, read once for the selections and the gallery
    write_selections(run_dirs, out / "selections.csv", datasets)
    atomic_write_text(out / "results.md", markdown_text(table) + diversity_markdown(series))
    diagnostics = load_mgral_diagnostics(run_dirs)
    drawing = plot_mgral_diagnostics(diagnostics, out)[-1] if diagnostics else None
    figures = [
        (f"{label} vs labeled images", images[-1]),
        (f"{label} vs labeled boxes", boxes[-1]),
        ("test mAP50 vs labeled images", map50[-1]),
    ]
    write_html(
        out / "report.html",
        run_dirs,
        series,
        reference=reference,
        table=table,
        diagnostics=diagnostics,
        figures=figures,
        diagnostics_figure=drawing,
        datasets=datasets,
    )
    return out / "results.md"
