"""AL curves and results tables from run directories.

``write_report([RUN, ...], OUT)`` does everything: it loads every (strategy label, seed)
series (:func:`load_series`) and the full-data reference (:func:`load_reference`), draws
the curves (:func:`plot_curves`), writes the results table (:func:`results_table`,
:func:`write_csv`, :func:`write_markdown`), draws MGRAL's diagnostics when a run has them
(:func:`load_mgral_diagnostics`, :func:`plot_mgral_diagnostics`) and writes it all into one
self-contained page, ``report.html`` (:func:`write_html`). The metric functions
(:func:`normalized_auc`, :func:`labels_to_reach`, :func:`aggregate`) are pure and documented
with their definitions.
matplotlib is imported only when a plot is drawn.
"""

from mgral.report.html import render_html, write_html
from mgral.report.load import MgralCycle, Series, TableRow, load_mgral_diagnostics, load_reference, load_series
from mgral.report.metrics import Curve, aggregate, labels_to_reach, normalized_auc
from mgral.report.plots import plot_curves, plot_mgral_diagnostics
from mgral.report.tables import Row, Table, results_table, write_csv, write_markdown
from mgral.report.write import write_report

__all__ = [
    "Curve",
    "MgralCycle",
    "Row",
    "Series",
    "Table",
    "TableRow",
    "aggregate",
    "labels_to_reach",
    "load_mgral_diagnostics",
    "load_reference",
    "load_series",
    "normalized_auc",
    "plot_curves",
    "plot_mgral_diagnostics",
    "render_html",
    "results_table",
    "write_csv",
    "write_html",
    "write_markdown",
    "write_report",
]
