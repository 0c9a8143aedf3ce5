"""Numerics shared by the detection-specific strategies (CALD, PPAL, CDAL).

* :func:`box_distributions`: every box's class distribution ``[N, K + 1]`` (background in
  column 0, then the dataset's categories in order), checked against the dataset.
* :func:`box_columns`: the distribution column of each box's predicted label.
* :func:`flatten_detections`: many images' detections as concatenated arrays (what the
  vectorized strategies work on), with the same checks as the per-image functions.
* :func:`box_iou`: pairwise IoU of xyxy boxes (``torchvision.ops.box_iou``).
* :func:`js_divergence`: Jensen-Shannon divergence in bits, in ``[0, 1]``.
* :func:`canonical_order`: pool ids in a fixed order, so that ``rng`` breaks ties the same
  way however the loop lists the pool.
* :func:`ordered_map`: independent tasks on the run's threads, results in order (so that
  what is added up from them is added in the same order as serially).
* ``check_*``: parameter checks that raise :class:`ConfigError` naming the parameter and
  its valid range.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from scipy.special import rel_entr
from threadpoolctl import threadpool_limits
from torchvision.ops import box_iou as _torch_box_iou

from mgral.data.records import Category, Detections, ImageId
from mgral.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")


def canonical_order(image_ids: Sequence[ImageId]) -> list[ImageId]:
    """The ids sorted (ints before strings): a strategy that works on this order breaks ties
    with ``rng`` independently of the order the pool was listed in."""
    return sorted(image_ids, key=lambda i: (isinstance(i, str), i))


def category_columns(categories: Sequence[Category]) -> dict[int, int]:
    """Category id -> column of a ``[K + 1]`` class distribution (column 0 is background)."""
    return {c.id: k + 1 for k, c in enumerate(categories)}


def box_columns(det: Detections, columns: dict[int, int], image_id: ImageId) -> np.ndarray:
    """int64 ``[N]``: the distribution column (1..K) of each box's predicted label.

    Raises:
        ConfigError: a label that is not one of the dataset's category ids (naming the image).
    """
    try:
        return np.fromiter((columns[int(label)] for label in det.labels), dtype=np.int64, count=len(det))
    except KeyError as err:
        raise ConfigError(
            f"predictions for image {image_id!r}: label {err.args[0]} is not a category id of the dataset "
            f"(ids: {sorted(columns)})"
        ) from None


def box_distributions(det: Detections, columns: dict[int, int], image_id: ImageId) -> np.ndarray:
    """float64 ``[N, K + 1]``: each box's class distribution, background in column 0.

    Where the detector gives no ``probs`` the box's score ``s`` stands in: ``s`` on its
    label's column, ``1 - s`` on background.

    Raises:
        ConfigError: ``probs`` of the wrong width, or a label that is not a category id
            (naming the image).
    """
    width = len(columns) + 1
    if det.probs is not None:
        if det.probs.shape[1] != width:
            raise ConfigError(
                f"predictions for image {image_id!r}: probs has {det.probs.shape[1]} columns, expected {width} "
                f"(background + the dataset's {width - 1} categories)"
            )
        return det.probs.astype(np.float64)
    s = det.scores.astype(np.float64)
    out = np.zeros((len(det), width))
    out[:, 0] = 1.0 - s
    out[np.arange(len(det)), box_columns(det, columns, image_id)] += s
    return out


@dataclass(frozen=True)
class FlatDetections:
    """Detections of ``P`` images concatenated image after image (``T`` boxes in all).

    Attributes:
        counts: int64 ``[P]`` boxes per image.
        boxes: float32 ``[T, 4]``; scores: float32 ``[T]``; cols: int64 ``[T]`` each box's
            distribution column (1..K, :func:`box_columns`).
        probs: ``[T, K + 1]`` (:func:`box_distributions` once cast to float64: the detectors'
            float32 rows are kept as they are), or None when not asked for.
    """

    counts: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    cols: np.ndarray
    probs: np.ndarray | None

    @property
    def starts(self) -> np.ndarray:
        """int64 ``[P]``: each image's first row."""
        return np.cumsum(self.counts) - self.counts

    @property
    def image(self) -> np.ndarray:
        """int64 ``[T]``: each box's image (0..P-1)."""
        return np.repeat(np.arange(len(self.counts)), self.counts)


def flatten_detections(
    dets: Sequence[Detections],
    image_ids: Sequence[ImageId],
    columns: dict[int, int],
    *,
    distributions: bool = True,
) -> FlatDetections:
    """``dets`` (of ``image_ids``) as one :class:`FlatDetections`: the rows equal what
    :func:`box_columns` and :func:`box_distributions` give image by image (``probs`` after a
    cast to float64; left float32 when every image has float32 ``probs``).

    Raises:
        ConfigError: as :func:`box_columns` / :func:`box_distributions` would, naming the image.
    """
    counts = np.fromiter((len(d) for d in dets), dtype=np.int64, count=len(dets))
    boxes = np.concatenate([d.boxes for d in dets]) if dets else np.zeros((0, 4), np.float32)
    scores = np.concatenate([d.scores for d in dets]) if dets else np.zeros(0, np.float32)
    labels = np.concatenate([d.labels for d in dets]) if dets else np.zeros(0, np.int64)
    keys = np.array(sorted(columns), dtype=np.int64)
    values = np.array([columns[int(k)] for k in keys], dtype=np.int64)
    pos = np.minimum(np.searchsorted(keys, labels), max(len(keys) - 1, 0))
    known = keys[pos] == labels if len(keys) else np.zeros(len(labels), dtype=bool)
    if not known.all():
        k = int(np.searchsorted(np.cumsum(counts), np.flatnonzero(~known)[0], side="right"))
        box_columns(dets[k], columns, image_ids[k])  # raises, naming the image
    cols = values[pos] if len(keys) else np.zeros(0, np.int64)
    probs = None
    if distributions:
        width = len(columns) + 1
        if all(d.probs is not None and d.probs.shape[1] == width for d in dets):
            probs = np.concatenate([d.probs for d in dets]) if dets else np.zeros((0, width))
        else:
            parts = [box_distributions(d, columns, i) for d, i in zip(dets, image_ids, strict=True)]
            probs = np.concatenate(parts) if parts else np.zeros((0, width))
    return FlatDetections(counts, boxes, scores, cols, probs)


def hflip(image: torch.Tensor) -> torch.Tensor:
    """The horizontal mirror of a ``[3, H, W]`` image (a picklable ``augment`` for predict)."""
    return image.flip(-1)


def unflip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """xyxy boxes found on the mirrored image, mapped back to the original (``x -> W - x``)."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 ``[N, M]`` IoU of xyxy boxes ``a`` ``[N, 4]`` and ``b`` ``[M, 4]``."""
    ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64).reshape(-1, 4))
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64).reshape(-1, 4))
    return torch.nan_to_num(_torch_box_iou(ta, tb), nan=0.0).numpy()  # 0/0 for degenerate boxes: no overlap


def js_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence in bits (``[0, 1]``) between distributions along ``axis``.

    ``p`` and ``q`` broadcast against each other; each is normalized to sum 1 first (rows
    must be non-negative with a positive sum). Rounding below 0 is clipped.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum(axis=axis, keepdims=True)
    q = q / q.sum(axis=axis, keepdims=True)
    m = 0.5 * (p + q)
    js = 0.5 * (rel_entr(p, m).sum(axis=axis) + rel_entr(q, m).sum(axis=axis)) / math.log(2.0)
    return np.clip(js, 0.0, 1.0)


def thread_limit() -> int:
    """Threads a strategy's numpy work may use: torch's thread count (the run's ``threads``; 1 in
    the process and Ray executors' workers), at most the CPUs this process may run on."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], tasks: int) -> Iterator[R]:
    """``fn(item)`` for each of the ``tasks`` ``items``, yielded in order.

    With :func:`thread_limit` above 1 the calls run on ``min(tasks, thread_limit())`` threads
    (numpy and BLAS release the GIL in their loops; BLAS then uses one thread per call),
    otherwise one after the other on this thread with no pool. ``items`` is iterated on this
    thread as the threads take them (computing an item there overlaps the threads' work), and
    at most one result more than there are threads waits to be taken, so only a few tasks'
    memory is held at once. Each call computes what it would serially, bit for bit.
    """
    workers = min(tasks, thread_limit())
    if workers <= 1:
        yield from map(fn, items)
        return
    # one BLAS thread per call: the calls share the cores (BLAS threads on top of them only wait)
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers, thread_name_prefix="mgral") as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_number(owner: str, name: str, value: object, low: float, high: float = math.inf) -> float:
    """``value`` as a float if it is a finite number in ``[low, high]``, else ConfigError."""
    if not _is_number(value) or not low <= value <= high:  # type: ignore[operator]
        where = f"a number >= {low:g}" if high == math.inf else f"a number in [{low:g}, {high:g}]"
        raise ConfigError(f"{owner}: {name} must be {where}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_int(owner: str, name: str, value: object, low: int) -> int:
    """``value`` if it is an int ``>= low``, else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    return value
