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


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n auto``), one torch thread per worker: the
    workers already share the cores, and torch's own threads spinning against another
    worker's make small ops many times slower (measured: 14x on 2 loaded cores)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


FIRST = ("tests/test_loop.py", "tests/test_hostile_runs.py", "tests/test_al_benchmark.py", "tests/test_disk_full.py")
"""The modules with the longest runs (whole experiments, in subprocesses, on process pools and Ray)."""


def pytest_collection_modifyitems(config, items) -> None:
    """The longest modules first: ``make test`` distributes whole files over pytest-xdist
    workers (``--dist loadfile``: a module's costly fixtures are built once, on one worker),
    and a long file started last would leave the other workers idle at the end."""
    rank = {name: k for k, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(FIRST)))
