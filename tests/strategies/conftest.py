"""A synthetic selection context: no detector, no files, just numbers shaped like the real thing.

Tests reach the builders through the ``make_context`` and ``for_strategy`` fixtures
(importing from a conftest is ambiguous when several test directories have one).
"""

from __future__ import annotations

import numpy as np
import pytest

from mgral.data.records import Category, Dataset, Detections, ImageRecord
from mgral.strategies import SelectionContext, Strategy


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def random_detections(rng: np.random.Generator, num_boxes: int, categories: list[Category]) -> Detections:
    """``num_boxes`` boxes whose ``probs`` rows (background first) sum to 1."""
    probs = softmax(rng.normal(scale=2.0, size=(num_boxes, len(categories) + 1)))
    best = probs[:, 1:].argmax(axis=1)
    xy = rng.uniform(0, 40, size=(num_boxes, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 20, size=(num_boxes, 2))], axis=1)
    labels = np.array([c.id for c in categories], dtype=np.int64)[best]
    return Detections(boxes, probs[np.arange(num_boxes), best + 1], labels, probs=probs)


def _make_context(
    *,
    num_pool: int = 40,
    num_labeled: int = 10,
    num_classes: int = 3,
    dim: int = 8,
    seed: int = 0,
    data_seed: int = 7,
    empty_every: int = 5,
) -> SelectionContext:
    """Pool and labeled images with int and str ids mixed; every ``empty_every``-th pool
    image has no detections. Predictions cover the pool, embeddings pool and labeled."""
    data_rng = np.random.default_rng(data_seed)
    ids = [i if i % 2 else f"img_{i:03d}" for i in range(num_labeled + num_pool)]
    categories = [Category(10 * (k + 1), f"class{k}") for k in range(num_classes)]
    dataset = Dataset("/nonexistent", categories, [ImageRecord(i, f"{i}.jpg", 64, 64, "train") for i in ids])
    labeled, pool = ids[:num_labeled], ids[num_labeled:]
    predictions = {
        i: random_detections(data_rng, 0 if j % empty_every == 0 else int(data_rng.integers(1, 6)), categories)
        for j, i in enumerate(pool)
    }
    embeddings = {i: data_rng.normal(size=dim).astype(np.float32) for i in ids}
    return SelectionContext(
        dataset, pool, labeled, np.random.default_rng(seed), predictions=predictions, embeddings=embeddings
    )


def _for_strategy(context: SelectionContext, strategy: Strategy | type[Strategy]) -> SelectionContext:
    """The context as the loop would fill it: only the inputs the strategy requires."""
    req = strategy.requires
    context.predictions = context.predictions if "predictions" in req else None
    context.embeddings = context.embeddings if "embeddings" in req else None
    context.detector = object() if "detector" in req else None
    return context


@pytest.fixture
def make_context():
    return _make_context


@pytest.fixture
def for_strategy():
    return _for_strategy
