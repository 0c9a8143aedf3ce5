"""Oracles: who answers "what is in these images?".

Every oracle follows one protocol: ``request(image_ids)`` hands the images over, then
``collect()`` returns the answer — labels for the images that were labeled and the ids the
annotator skipped. The simulated oracle answers at once from the dataset's hidden labels;
a human oracle (labeling in an annotation tool) differs only in how long the wait is: with
``oracle.kind: human`` the request is the labeling package ``mgral query`` writes and the
answer is what ``mgral import-labels`` reads, in two processes (see :mod:`mgral.human`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mgral.data.records import Dataset, ImageId, Target
from mgral.errors import PoolError


@dataclass
class OracleAnswer:
    """Labels for the labeled images (id -> target, in request order) and the skipped ids."""

    labels: dict[ImageId, Target] = field(default_factory=dict)
    skipped: list[ImageId] = field(default_factory=list)


def _id_key(image_id: ImageId) -> int:
    # a stable integer per id (Python's hash of a str changes between processes)
    return image_id if isinstance(image_id, int) else zlib.crc32(str(image_id).encode())


class SimulatedOracle:
    """Reveals the dataset's own labels, optionally with annotation noise.

    Args:
        dataset: the dataset whose targets are the truth.
        seed: seeds the noise; an image's noisy labels depend only on (seed, image id), so
            a resumed run sees exactly the labels an uninterrupted run saw.
        label_noise: fraction of boxes whose class is replaced by another class.
        drop_boxes: fraction of boxes the annotator misses.
    """

    def __init__(self, dataset: Dataset, *, seed: int = 0, label_noise: float = 0.0, drop_boxes: float = 0.0) -> None:
        self.dataset, self.seed = dataset, seed
        self.label_noise, self.drop_boxes = label_noise, drop_boxes
        self._requested: list[ImageId] = []
        self.requests = 0  # how often the oracle was asked (tests assert label-free steps never ask)

    def labels_for(self, image_id: ImageId) -> Target:
        """The target an annotator returns for ``image_id`` (deterministic for the seed)."""
        truth = self.dataset[image_id].target
        if (self.label_noise == 0 and self.drop_boxes == 0) or len(truth) == 0:
            return truth
        rng = np.random.default_rng([self.seed, _id_key(image_id), 7])
        keep = rng.random(len(truth)) >= self.drop_boxes
        labels = truth.labels.copy()
        flip = rng.random(len(truth)) < self.label_noise
        cat_ids = np.array([c.id for c in self.dataset.categories])
        if len(cat_ids) > 1:
            for k in np.flatnonzero(flip):
                others = cat_ids[cat_ids != labels[k]]
                labels[k] = others[rng.integers(len(others))]
        return Target(truth.boxes[keep], labels[keep], truth.difficult[keep], truth.iscrowd[keep])

    def request(self, image_ids: Sequence[ImageId]) -> None:
        """Hand ``image_ids`` over for labeling.

        Raises:
            PoolError: an id that is not in the dataset.
        """
        missing = [i for i in image_ids if i not in self.dataset]
        if missing:
            raise PoolError(f"oracle: image ids {missing[:5]} are not in the dataset")
        self._requested = list(image_ids)
        self.requests += 1

    def collect(self) -> OracleAnswer:
        """The labels of every requested image (the simulated annotator skips nothing)."""
        answer = OracleAnswer({i: self.labels_for(i) for i in self._requested})
        self._requested = []
        return answer
