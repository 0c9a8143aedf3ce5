"""The ``Detector`` protocol: what the loop and the strategies may ask of any detector.

``TorchvisionDetector`` is the reference implementation; other frameworks (Ultralytics,
mmdetection, detectron2) plug in behind the same methods. Image ids are the dataset's own;
``Detections`` follow the contract in :mod:`mgral.data.records` (boxes xyxy pixels, scores,
category-id labels, per-box class distributions with background in column 0, an image
embedding).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mgral.data.records import Category, Dataset, Detections, ImageId


@runtime_checkable
class Detector(Protocol):
    categories: list[Category]

    def fit(self, dataset: Dataset, image_ids: Sequence[ImageId], **settings: Any) -> dict[str, Any]:
        """Train on the labeled ``image_ids``; return a summary (losses per epoch, ...)."""

    def predict(self, dataset: Dataset, image_ids: Sequence[ImageId], **options: Any) -> dict[ImageId, Detections]:
        """Detections per image id, in the order of ``image_ids``."""

    def embed(self, dataset: Dataset, image_ids: Sequence[ImageId], **options: Any) -> dict[ImageId, np.ndarray]:
        """One pooled feature vector (float32 ``[D]``) per image."""

    def evaluate(self, dataset: Dataset, image_ids: Sequence[ImageId], *, style: str = "coco") -> Any:
        """``mgral.evaluation.EvalResult`` of the predictions on ``image_ids``."""

    def save(self, path: str | Path) -> None:
        """Write everything needed to rebuild the detector (atomically)."""

    @classmethod
    def load(cls, path: str | Path, **options: Any) -> Detector:
        """Rebuild a detector written by ``save``."""
