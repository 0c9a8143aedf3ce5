"""The ``Detector`` protocol: what the loop and the strategies may ask of any detector.

``TorchvisionDetector`` is the reference implementation; ``PredictionsDetector`` reads the
results files of a model trained elsewhere (Ultralytics, Detectron2, MMDetection, ...). A
kind is registered in :data:`mgral.detectors.KINDS`. Image ids are the dataset's own;
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

CAPABILITIES = {
    "augment": "predict(..., augment=fn): predictions on transformed views of an image",
    "clone": "to_bytes() / from_bytes(): ship the trained model to a worker",
    "self_training": "short fine-tunes of the model itself with an extra unsupervised term",
    "head_cache": "last-layer inputs cached once, head-only fine-tunes on them (mgral.detectors.heads)",
}
"""What some strategies need of a detector beyond the protocol (``Strategy.detector_needs``),
and what each means; a detector kind says which it has (``capabilities(spec)``)."""


@runtime_checkable
class Detector(Protocol):
    categories: list[Category]

    @classmethod
    def from_config(cls, spec: Any, categories: Sequence[Category], *, seed: int, train: dict[str, Any]) -> Detector:
        """A fresh detector from the config's ``detector`` section (``spec``), for a series
        cycle whose training seed is ``seed``, with the training overrides ``train``."""

    @classmethod
    def check_config(cls, spec: Any, categories: Sequence[Category], trainings: Sequence[dict[str, Any]]) -> None:
        """Refuse (``ConfigError``) a spec that would fail only when the first model is built
        or trained; ``trainings``: every training override set the run will use."""

    @classmethod
    def capabilities(cls, spec: Any) -> frozenset[str]:
        """The :data:`CAPABILITIES` a detector of this spec has."""

    def start_from(self, other: Detector) -> None:
        """Take ``other``'s weights (a warm start from the previous cycle's model)."""

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
