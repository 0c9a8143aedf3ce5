"""The scale benchmark's own code (benchmarks/bench_scale.py) on a tiny pool: the workload
looks like cached detections, every strategy selects exactly the budget of distinct pool ids
through the benchmark's seams, and the report files have the expected shape."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_scale", None)


SMALL_MGRAL = {"estimator": "finetune", "updates": 3, "hidden": 16, "chunk": 8, "orders": 1, "samples": 2}


def test_the_workload_looks_like_cached_detections(bench):
    w = bench.make_workload(200, views=("flip", "scale"), labeled_predictions=True, dim=16)
    assert len(w.pool_ids) == 200 and len(w.labeled_ids) == 10
    assert set(w.embeddings) == set(w.pool_ids) | set(w.labeled_ids)
    assert all(e.shape == (16,) and e.dtype == np.float32 for e in w.embeddings.values())
    dets = list(w.predictions.values())
    assert 10 < np.mean([len(d) for d in dets]) < 60 and max(len(d) for d in dets) <= bench.MAX_BOXES
    probs = np.concatenate([d.probs for d in dets])
    assert probs.shape[1] == 21 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    labels = np.concatenate([d.labels for d in dets])
    assert np.array_equal(labels, probs[:, 1:].argmax(axis=1) + 1)  # the label is the likeliest category
    scores = np.concatenate([d.scores for d in dets])
    assert scores.min() >= 0.05 and scores.max() < 1
    boxes = np.concatenate([d.boxes for d in dets])
    assert np.all(boxes[:, 2:] > boxes[:, :2]) and boxes[:, 2].max() <= bench.WIDTH
    assert set(w.views) == {"flip", "scale"} and set(w.views["flip"]) == set(w.pool_ids)
    assert set(w.labeled_predictions) == set(w.labeled_ids)
    assert all(len(w.dataset[i].target) > 0 for i in w.labeled_ids)
    again = bench.make_workload(200, views=("flip", "scale"), labeled_predictions=True, dim=16)
    assert all(np.array_equal(again.predictions[i].boxes, w.predictions[i].boxes) for i in w.pool_ids)  # seeded


@pytest.mark.parametrize(
    "name", ["random", "entropy", "least_confidence", "margin", "core_set", "cald", "ppal", "cdal"]
)
def test_every_baseline_selects_the_budget_through_the_benchmark(bench, name):
    row = bench.run_one(name, 200, dim=16, repeats=1)
    assert row["budget"] == 2 and row["selected"] == 2 and row["distinct"] == 2 and row["valid"]
    assert row["seconds"] > 0 and row["peak_mib"] is not None and row["peak_mib"] >= 0
    expected_calls = {"cald": [["flip", 200], ["scale", 200], ["color", 200]], "cdal": [["plain", 10]]}
    assert [list(c) for c in row["detector_calls"]] == expected_calls.get(name, [])


def test_mgral_selects_with_the_given_table(bench):
    row = bench.run_one("mgral", 200, dim=16, params=SMALL_MGRAL, repeats=1)
    assert row["selected"] == row["distinct"] == 2 and row["valid"]
    assert [list(c) for c in row["detector_calls"]] == [["flip", 40]]  # the mirrored pass over 20 x B candidates
    assert {"features", "table", "reward_model", "agent", "selection"} <= set(row["stage_seconds"])


def test_mgral_by_default_selects_the_priors_top_batch_without_a_table(bench):
    row = bench.run_one("mgral", 200, dim=16, repeats=1)
    assert row["selected"] == row["distinct"] == 2 and row["valid"]
    assert [list(c) for c in row["detector_calls"]] == [["flip", 8]]  # the mirrored pass over 4 x B candidates
    assert set(row["stage_seconds"]) == {"features"}


def test_the_given_table_is_a_planted_linear_reward(bench):
    work = bench.make_workload(400, views=("flip",), dim=16)
    strategy = bench.make_strategy("mgral", {**SMALL_MGRAL, "combinations": 12})
    sel = strategy.select(bench.make_context(work, strategy, 0), 4)
    assert sel.info["table_rows"] == 12 and sel.info["loo_spearman"] > 0.5  # the ridge recovers the planted credits


def test_growth_flags_and_the_report_files(bench, tmp_path):
    def row(label, n, seconds, strategy=None):
        return {"strategy": strategy or label, "label": label, "n": n, "budget": n // 100, "seconds": seconds}

    rows = [
        row("linear_nb", 1000, 0.01),
        row("linear_nb", 10000, 1.0),
        row("linear_nb", 100000, 100.0),  # slope 2 vs N = 1 vs N x B, but misses the 10 s target
        row("cubic", 1000, 0.001),
        row("cubic", 10000, 1.0),
        row("cubic", 100000, 1000.0),
        row("fast", 1000, 0.001),
        row("fast", 10000, 0.01),
        row("fast", 100000, 0.1),
        {**row("mgral", 100000, None), "timeout": 600.0},
        row("mgral[x=1]", 100000, 30.0, strategy="mgral"),
    ]
    grow = bench.growth(rows)
    assert grow["linear_nb"]["pairs"][-1]["slope_n"] == pytest.approx(2.0)
    assert grow["linear_nb"]["pairs"][-1]["slope_nb"] == pytest.approx(1.0)
    assert grow["linear_nb"]["flags"] == ["misses target (100.0 s > 10 s at 100000)"]
    assert any("super-linear" in f for f in grow["cubic"]["flags"])
    assert grow["fast"]["flags"] == []
    assert grow["mgral"]["flags"] == ["misses target (> 600.0 s timeout)"] and grow["mgral"]["target_s"] == 60
    assert grow["mgral[x=1]"]["flags"] == []

    real = [bench.run_one(name, 200, dim=16, repeats=1) for name in ("random", "core_set")]
    meta = {"seed": 0, "boxes": 30.0, "dim": 16, "classes": 20, "machine": ["- test"], "date": "d", "commands": ["c"]}
    md, js = bench.write_results(real, tmp_path, meta)
    data = json.loads(js.read_text())
    assert [r["strategy"] for r in data["rows"]] == ["random", "core_set"] and set(data["growth"]) == {
        "random",
        "core_set",
    }
    text = md.read_text()
    table = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| strategy | s @ 200 | peak MiB @ 200 |") and len(table) == 3
    assert all(ln.count("|") == table[0].count("|") for ln in table)
    assert "`core_set`: select: k-center greedy" in text
