"""A synthetic selection context: numbers shaped like the real thing; real image files and a
real (untrained) detector only for strategies that require the detector or the true labels.

Tests reach the builders through the ``make_context`` and ``for_strategy`` fixtures
(importing from a conftest is ambiguous when several test directories have one).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgral.data.records import Category, Dataset, Detections, ImageRecord, Target
from mgral.strategies import SelectionContext, Strategy
from mgral.strategies.core_set import prepare_embeddings


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


def _materialize(context: SelectionContext, image_dir: Path) -> tuple[Dataset, Dataset]:
    """Real image files for the context's records (1-2 coloured squares each, class = colour
    channel), written once per id and size: the visible dataset (pool images without boxes,
    as the loop gives it) and the oracle's (every image with its boxes)."""
    visible, truth = [], []
    labeled = set(context.labeled_ids)
    cats = context.dataset.categories
    for rec in context.dataset:
        rng = np.random.default_rng(zlib.crc32(str(rec.id).encode()))
        name = f"{rec.id}_{rec.width}x{rec.height}.png"
        img = (rng.random((rec.height, rec.width, 3)) * 60).astype(np.uint8)
        boxes, labels = [], []
        for _ in range(int(rng.integers(1, 3))):
            s = int(rng.integers(10, max(11, min(rec.width, rec.height) // 2)))
            x, y = int(rng.integers(0, rec.width - s)), int(rng.integers(0, rec.height - s))
            k = int(rng.integers(0, len(cats)))
            img[y : y + s, x : x + s, k % 3] = 255
            boxes.append([x, y, x + s, y + s])
            labels.append(cats[k].id)
        if not (image_dir / name).exists():
            Image.fromarray(img).save(image_dir / name)
        target = Target(boxes, labels)
        truth.append(replace(rec, file_name=name, target=target))
        visible.append(replace(rec, file_name=name, target=target if rec.id in labeled else Target()))
    return Dataset(image_dir, cats, visible), Dataset(image_dir, cats, truth)


@functools.cache
def _detector(categories: tuple[Category, ...]):
    """An untrained tiny detector (random but real outputs), built once per category set."""
    from mgral.detectors.torchvision_detector import TorchvisionDetector

    return TorchvisionDetector("tiny", list(categories), device="cpu", seed=0, pretrained=False, min_size=64)


def _for_strategy(
    context: SelectionContext, strategy: Strategy | type[Strategy], *, image_dir: Path | None = None
) -> SelectionContext:
    """The context as the loop would fill it: only the inputs the strategy requires. A strategy
    that needs the detector or the true labels gets real image files and a real (untrained)
    tiny detector."""
    req = strategy.requires
    context.predictions = context.predictions if "predictions" in req else None
    context.embeddings = context.embeddings if "embeddings" in req else None
    context.detector = None
    context.oracle_dataset = None
    if req & {"detector", "oracle"}:
        assert image_dir is not None, "use the for_strategy fixture"
        visible, truth = _materialize(context, image_dir)
        context.dataset = visible
        if "detector" in req:
            context.detector = _detector(tuple(visible.categories))
        if "oracle" in req:
            context.oracle_dataset = truth
    return context


def _reference_k_center(pool, centers, n, rng, normalize):
    """The plain loop that k_center_greedy must reproduce pick for pick: float64 distances
    summed from the differences of the prepared embeddings, every point updated at every
    pick, ties to the first in the ``rng`` permutation."""
    x = prepare_embeddings(pool, normalize).astype(np.float64)
    c = prepare_embeddings(centers, normalize).astype(np.float64).reshape(-1, x.shape[1])
    perm = rng.permutation(len(x))
    x = x[perm]

    def sq_dist(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)

    min_d = sq_dist(x, c).min(axis=1) if len(c) else np.full(len(x), np.inf)
    picked, dist = [], []
    for t in range(n):
        i = 0 if (t == 0 and not len(c)) else int(np.argmax(min_d))
        picked.append(i)
        dist.append(min_d[i])
        min_d = np.minimum(min_d, sq_dist(x, x[i : i + 1])[:, 0])
        min_d[i] = -np.inf
        if t == 0 and not len(c):
            dist[0] = min_d.max() if len(x) > 1 else 0.0
    return perm[picked], np.sqrt(dist)


@pytest.fixture
def reference_k_center():
    return _reference_k_center


@pytest.fixture
def make_context():
    return _make_context


@pytest.fixture(scope="session")
def strategy_image_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("strategy-images")


@pytest.fixture
def for_strategy(strategy_image_dir):
    return functools.partial(_for_strategy, image_dir=strategy_image_dir)
