"""Batch diversity in results.md: known figures from hand-written cycle caches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mgral.data.records import Detections
from mgral.detectors.cache import save_predictions
from mgral.report import load_series
from mgral.report.diversity import batch_figures, diversity_by_label, diversity_markdown, series_figures


def _det(embedding, labels, scores):
    n = len(labels)
    return Detections(
        np.tile(np.array([[0, 0, 5, 5]], np.float32), (n, 1)),
        np.array(scores, np.float32),
        np.array(labels, np.int64),
        embedding=np.array(embedding, np.float32),
    )


def _series(run, label, selected, preds):
    sdir = run / label / "seed-0"
    (sdir / "cycle-0").mkdir(parents=True)
    rec = {
        "cycle": 0,
        "num_labeled": 10,
        "num_boxes_labeled": 10,
        "labeling_cost": 10,
        "mAP": 0.1,
        "mAP50": 0.2,
        "strategy": label,
        "strategy_name": label,
        "seed": 0,
        "selected": selected,
        "seconds": {},
    }
    (sdir / "cycles.jsonl").write_text(json.dumps(rec) + "\n")
    if preds is not None:
        save_predictions(sdir / "cycle-0" / "predictions.npz", preds)


def test_batch_figures_and_the_markdown_section(tmp_path):
    preds = {
        "a": _det([0, 0], [1, 1], [0.9, 0.8]),
        "b": _det([3, 4], [2], [0.9]),
        7: _det([0, 8], [1], [0.2]),  # below 0.3: not counted in the class share
    }
    _series(tmp_path, "entropy", ["a", "b", 7], preds)
    _series(tmp_path, "random", ["a"], None)
    fig = batch_figures(tmp_path / "entropy" / "seed-0" / "cycle-0", ["a", "b", 7])
    assert fig["mean_pairwise_distance"] == pytest.approx((5 + 8 + 5) / 3)
    assert fig["top_class_share"] == pytest.approx(2 / 3)
    series = load_series([tmp_path])
    assert diversity_by_label(series) == {
        "entropy": {
            "mean_pairwise_distance": pytest.approx(6.0),
            "top_class_share": pytest.approx(2 / 3),
            "batches": 1,
            "class_share_batches": 1,
        }
    }
    md = diversity_markdown(series)
    assert "| entropy | 1 | 6.000 | 0.667 |" in md and "| random | 0 | — | — |" in md


def test_cycle0_batches_read_the_shared_cache_and_saved_figures_fill_in(tmp_path):
    preds = {"a": _det([0, 0], [1], [0.9]), "b": _det([6, 8], [2], [0.9])}
    save_predictions(tmp_path / "_shared" / "seed-0" / "cycle-0" / "predictions.npz", preds)
    for label in ("entropy", "random"):
        _series(tmp_path, label, ["a", "b"], None)  # cycle 0 chose a, b with the shared model
    sdir = tmp_path / "entropy" / "seed-0"
    rec = json.loads((sdir / "cycles.jsonl").read_text())
    with open(sdir / "cycles.jsonl", "a") as fh:
        fh.write(json.dumps({**rec, "cycle": 1, "selected": ["b", "a"]}) + "\n")
    save_predictions(
        sdir / "cycle-1" / "predictions.npz", {"a": _det([0, 0], [1], [0.9]), "b": _det([0, 3], [1], [0.9])}
    )

    assert series_figures(tmp_path, "entropy", 0) == {
        0: {"mean_pairwise_distance": pytest.approx(10.0), "top_class_share": pytest.approx(0.5)},
        1: {"mean_pairwise_distance": pytest.approx(3.0), "top_class_share": pytest.approx(1.0)},
    }
    assert series_figures(tmp_path, "random", 0) == {}  # random reads no predictions: its batches are not described

    # a series whose caches were not kept (published records) carries its figures
    (sdir / "diversity.json").write_text(json.dumps({"0": {"mean_pairwise_distance": 1.5, "top_class_share": 0.25}}))
    (sdir / "cycle-1" / "predictions.npz").unlink()
    (tmp_path / "_shared" / "seed-0" / "cycle-0" / "predictions.npz").unlink()
    assert series_figures(tmp_path, "entropy", 0) == {0: {"mean_pairwise_distance": 1.5, "top_class_share": 0.25}}


def test_a_batch_without_confident_boxes_has_no_class_share_and_does_not_poison_the_mean(tmp_path):
    preds = {"a": _det([0, 0], [1], [0.1]), "b": _det([3, 4], [2], [0.2])}  # a weak model: nothing above 0.3
    _series(tmp_path, "entropy", ["a", "b"], preds)
    sdir = tmp_path / "entropy" / "seed-0"
    rec = json.loads((sdir / "cycles.jsonl").read_text())
    with open(sdir / "cycles.jsonl", "a") as fh:
        fh.write(json.dumps({**rec, "cycle": 1}) + "\n")
    save_predictions(
        sdir / "cycle-1" / "predictions.npz", {"a": _det([0, 0], [1], [0.9]), "b": _det([0, 3], [2], [0.9])}
    )

    assert batch_figures(sdir / "cycle-0", ["a", "b"])["top_class_share"] is None
    series = load_series([tmp_path])
    assert diversity_by_label(series) == {
        "entropy": {
            "mean_pairwise_distance": pytest.approx(4.0),
            "top_class_share": pytest.approx(0.5),
            "batches": 2,
            "class_share_batches": 1,
        }
    }
    assert "| entropy | 2 | 4.000 | 0.500 (1 of 2) |" in diversity_markdown(series)
    (sdir / "cycle-1" / "predictions.npz").unlink()
    assert "| entropy | 1 | 5.000 | — |" in diversity_markdown(load_series([tmp_path]))
