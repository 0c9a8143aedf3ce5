"""A tiny on-disk dataset of coloured squares: fast enough to train detectors in tests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mgral.data.records import Category, Dataset, ImageRecord, Target


def make_squares(root, *, images: int = 16, size: int = 96, seed: int = 0, empty_every: int = 0) -> Dataset:
    """Images with 1-2 filled squares whose colour channel is the class (3 classes)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(images):
        img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        boxes, labels = [], []
        if not (empty_every and i % empty_every == 0):
            for _ in range(int(rng.integers(1, 3))):
                s = int(rng.integers(12, 30))
                x, y = (int(v) for v in rng.integers(0, size - s, 2))
                c = int(rng.integers(1, 4))
                img[y : y + s, x : x + s, c - 1] = 255
                boxes.append([x, y, x + s, y + s])
                labels.append(c * 10)  # sparse category ids on purpose
        Image.fromarray(img).save(root / f"{i}.png")
        recs.append(ImageRecord(i, f"{i}.png", size, size, "train" if i % 4 else "test", Target(boxes, labels)))
    return Dataset(root, [Category(10, "red"), Category(20, "green"), Category(30, "blue")], recs)


@pytest.fixture
def squares(tmp_path) -> Dataset:
    return make_squares(tmp_path / "squares")
