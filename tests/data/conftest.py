"""Small synthetic datasets with real image files, built in tmp_path, and builders for
bad inputs (exposed as fixtures so test modules need not import this file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgral.data.records import Category, Dataset, ImageRecord, Target


def _make_image(path: Path, width: int, height: int, *, seed: int = 0) -> Path:
    """A tiny real image (format from the suffix) with seeded noise pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return path


def _write_json(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _coco_dict(**overrides: object) -> dict:
    """A minimal valid COCO dict (one 40x30 image 'a.png', one box); ``overrides`` replace top-level keys."""
    obj = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5]}],
        "categories": [{"id": 7, "name": "cat"}],
    }
    obj.update(overrides)
    return obj


@pytest.fixture
def make_image():
    return _make_image


@pytest.fixture
def write_json():
    return _write_json


@pytest.fixture
def coco_dict():
    return _coco_dict


@pytest.fixture
def small_dataset(tmp_path: Path) -> Dataset:
    """Five images under ``tmp_path/src``: splits train/val/test/None, a negative image, two
    images sharing the stem ``x`` in different folders, .png and .JPG files, sparse category
    ids, difficult and iscrowd flags, integer-valued and fractional boxes."""
    root = tmp_path / "src"
    specs = [
        (10, "train/x.png", 64, 48, "train"),
        (11, "val/x.JPG", 50, 40, "val"),
        (12, "test/y.png", 32, 32, "test"),
        (13, "misc/z.png", 40, 30, None),
        (14, "train/neg.png", 20, 20, "train"),
    ]
    for k, (_, rel, w, h, _) in enumerate(specs):
        _make_image(root / rel, w, h, seed=k)
    targets = {
        10: Target([[0, 0, 64, 48], [10.5, 4.25, 30.75, 20.5]], [3, 9], difficult=[False, True], iscrowd=[True, False]),
        11: Target([[1, 2, 11, 12]], [5]),
        12: Target([[3, 3, 4, 4], [0, 10, 32, 32]], [9, 3], difficult=[True, False]),
        13: Target([[5, 5, 25, 15]], [3]),
        14: Target(),
    }
    images = [ImageRecord(i, rel, w, h, split, targets[i]) for i, rel, w, h, split in specs]
    return Dataset(root, [Category(3, "dog"), Category(9, "cat"), Category(5, "bird")], images)


@pytest.fixture
def deadline():
    """Fail (TimeoutError) instead of hanging: a blocked ``open`` of a FIFO is interrupted after 10 s."""
    import signal

    def expired(signum, frame):
        raise TimeoutError("still blocked after 10 s (a reader waits on a FIFO?)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def isolated():
    """Run Python code in a child process under a time and an address-space limit, so that a
    runaway (minutes, gigabytes) fails the test instead of the machine; returns the CompletedProcess."""
    import resource
    import subprocess
    import sys

    def run(code: str, *, timeout: float = 60, memory: int = 4 << 30):
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

        try:
            return subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, preexec_fn=limit
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"the child process did not finish within {timeout} s")

    return run
