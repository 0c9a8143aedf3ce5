"""A split for the images a dataset leaves without one: seeded and stratified.

A COCO export without ``split`` fields, or a flat YOLO folder, has every image unassigned;
:func:`assign_splits` deals them into ``train`` / ``val`` / ``test`` and :func:`with_splits`
applies an assignment (a fresh one, or the one a run recorded) to a dataset.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np

from mgral.data.records import SPLITS, Dataset, ImageId
from mgral.errors import RunError


def _share(fraction: float, n: int) -> int:
    """Images of ``n`` that ``fraction`` asks for, rounded half up; at least one when it is positive."""
    return 0 if fraction == 0 else min(n, max(1, math.floor(fraction * n + 0.5)))


def assign_splits(dataset: Dataset, *, val: float, test: float, seed: int) -> dict[ImageId, str]:
    """A split for each image of ``dataset`` whose split is None; the others keep theirs.

    Of the ``n`` unassigned images, ``round(test * n)`` go to ``test`` and ``round(val * n)``
    to ``val`` (at least one each when the fraction is positive), the rest to ``train``.

    Stratified by each image's rarest class: the class of its boxes with the fewest boxes
    among the unassigned images (ties: the smaller category id; images without boxes form one
    stratum of their own). The images are ordered by stratum, rarest class first, in a seeded
    random order within each, and dealt one by one to the split furthest below its share so
    far. So every stratum, down to a class with a handful of images, is split in the same
    proportions (within one image): a plain random draw does not guarantee that, and
    scikit-learn's stratified splitters refuse a class with a single image.

    Args:
        val, test: fractions in ``[0, 1)`` with ``val + test < 1``.
        seed: the same seed and dataset give the same assignment.

    Returns:
        image id -> ``"train"`` / ``"val"`` / ``"test"``, in dataset order.
    """
    records = [r for r in dataset if r.split is None]
    n = len(records)
    n_test = _share(test, n)
    n_val = min(_share(val, n), n - n_test)
    sizes = np.array([n - n_val - n_test, n_val, n_test], dtype=np.float64)  # in SPLITS order
    boxes = Counter(label for r in records for label in r.target.labels.tolist())
    rarest = [min(((boxes[c], c) for c in r.target.labels.tolist()), default=(math.inf, 0)) for r in records]
    shuffle = np.random.default_rng(seed).permutation(n)
    taken = np.zeros(3)
    out: dict[ImageId, str] = {}
    for k, index in enumerate(sorted(range(n), key=lambda i: (rarest[i], shuffle[i])), start=1):
        split = int(np.argmax(np.where(taken < sizes, k * sizes / n - taken, -np.inf)))
        taken[split] += 1
        out[records[index].id] = SPLITS[split]
    return {r.id: out[r.id] for r in records}


def with_splits(
    dataset: Dataset, assigned: Mapping[ImageId, str] | Iterable[tuple[ImageId, str]], *, source: str = "splits"
) -> Dataset:
    """``dataset`` with its unassigned images in the splits of ``assigned`` (a fresh
    :func:`assign_splits`, or the pairs a run recorded); the records are copies.

    The images without a split must be exactly those of ``assigned``: a recorded assignment
    does not fit a dataset that gained, lost or split images since.

    Raises:
        RunError: naming ``source`` (the record), the first image that does not fit, and the fix.
    """
    assigned = dict(assigned)
    problem = _misfit(dataset, assigned)
    if problem is not None:
        unassigned = sum(r.split is None for r in dataset)
        raise RunError(
            f"{source}: {problem} ({len(assigned)} images had no split when the run started and were assigned one, "
            f"{unassigned} have none now): the dataset changed since the run started; restore it, or start a new run"
        )
    return Dataset(dataset.root, dataset.categories, (replace(r, split=assigned.get(r.id, r.split)) for r in dataset))


def _misfit(dataset: Dataset, assigned: Mapping[ImageId, str]) -> str | None:
    for image_id, split in assigned.items():
        if image_id not in dataset:
            return f"image {image_id!r} was assigned the split {split!r}, but the dataset has no image {image_id!r} now"
        if dataset[image_id].split is not None:
            return (
                f"image {image_id!r} had no split and was assigned {split!r}; the dataset gives it the split "
                f"{dataset[image_id].split!r} now"
            )
    missing = next((r.id for r in dataset if r.split is None and r.id not in assigned), None)
    return None if missing is None else f"image {missing!r} has no split and was not assigned one when the run started"
