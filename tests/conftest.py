"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("MGRAL_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real datasets); skips where it is absent (a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            "../shared/data not found (a fresh clone has no shared data); set MGRAL_SHARED_DATA to run this test"
        )
    return SHARED_DATA
