"""benchmarks/bench_train_step.py on one measured step: its figures add up and its report
says what they are (the figures themselves are the benchmark's, not the test's)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_one_step_is_measured_and_reported(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if not (bench.SHARED / "bccd").exists():
        pytest.skip(f"{bench.SHARED / 'bccd'} is not on this machine")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    assert bench.main(["--steps", "1"]) == 0
    r = json.loads((tmp_path / "train_step.json").read_text())
    assert r["full_s"] > 0 and r["frozen_trunk_s"] > 0 and r["trunk_forward_s"] > 0
    assert r["cached_trunk_s"] == pytest.approx(r["frozen_trunk_s"] - r["trunk_forward_s"])
    parts = r["parts_s"]
    assert set(parts) == {"trunk", "FPN", "RPN", "RoI heads", "box head (in RoI heads)", "backward + step"}
    assert parts["box head (in RoI heads)"] < parts["RoI heads"]  # nested: the box head runs inside
    # the step's own parts cannot exceed it (forwards of disjoint modules plus the backward)
    disjoint = ("trunk", "FPN", "RPN", "RoI heads", "backward + step")
    assert sum(parts[k] for k in disjoint) <= r["frozen_trunk_s"] * 1.05
    text = (tmp_path / "train_step.md").read_text()
    assert "Machine:" in text and f"{r['full_s'] / r['cached_trunk_s']:.1f}x cheaper at most" in text
