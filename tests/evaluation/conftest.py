"""Fixtures of the evaluation tests: the shared detection-metric fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def metrics_fixtures(shared_data: Path) -> Path:
    """``../shared/data/detection-metrics-fixtures`` (skips where it is absent)."""
    path = shared_data / "detection-metrics-fixtures"
    if not path.is_dir():
        pytest.skip(f"{path} not found; set MGRAL_SHARED_DATA to a directory holding it")
    return path
